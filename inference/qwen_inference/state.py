"""The server's state, shared by every API: settings, metrics, the loaded model and readiness.

The model loads in a background thread after the server starts listening, so `/health` answers 503 with
the reason until the engine runs, and `/livez` answers at once.
"""

from __future__ import annotations

import logging
import threading
import time

from .metrics import ServerMetrics
from .settings import ServeSettings

log = logging.getLogger("qwen_inference.server")


class ServerState:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics(settings.model_name)
        self.model = None
        self.status = "loading"
        self.reason = "the model is loading"
        self.permanent = False  # the load failed for good: the model cannot be served here
        self.shutting_down = False
        self.load_thread: threading.Thread | None = None
        self.api_keys = [k.encode() for k in settings.api_keys()]
        self._on_stop: list = []

    def health(self) -> tuple[bool, str]:
        if self.shutting_down:
            return False, "the server is shutting down"
        if self.status != "ready":
            return False, self.reason
        engine = self.model.engine
        if not engine.alive:
            return False, engine.fatal_error or "the generation loop is not running"
        return True, "ok"

    def load(self) -> None:
        """Load the model (the engine loop is started by the caller)."""
        from .engine.weights import UnsupportedModel
        from .loader import load

        started = time.monotonic()
        try:
            self.model = load(self.settings, metrics=self.metrics)
        except UnsupportedModel as exc:  # never servable here: one line, no traceback
            log.error("the model cannot be served: %s", exc)
            self.status, self.reason, self.permanent = "failed", f"model not supported: {exc}", True
            return
        except Exception as exc:  # noqa: BLE001: reported by /health and the log
            log.exception("loading the model failed")
            self.status, self.reason = "failed", f"loading the model failed: {exc}"
            return
        m = self.model
        self.metrics.info.labels(self.settings.model_name, m.dtype, m.device).set(1)
        self.metrics.on_cache_config(m.engine.block_size, m.engine.kv_capacity_tokens // m.engine.block_size,
                                     m.engine.prefix_caching)
        self.metrics.model_loaded.set(1)
        self.metrics.prefix_caching.set(1 if m.engine.prefix_caching else 0)
        self.status, self.reason = "ready", "ok"
        log.info("model ready", extra={"model": self.settings.model_name, "path": str(m.path), "dtype": m.dtype,
                                       "device": m.device, "max_model_len": m.max_model_len,
                                       "load_seconds": round(time.monotonic() - started, 2)})

    def start_loading(self) -> None:
        """One thread loads the model and then runs the engine loop: all model work stays on one thread."""

        def load_and_run() -> None:
            self.load()
            if self.model is not None:
                self.model.engine.run()

        self.load_thread = threading.Thread(target=load_and_run, name="qwen-engine", daemon=True)
        self.load_thread.start()

    def on_stop(self, fn) -> None:
        """Call `fn` when the server stops (after the engine)."""
        self._on_stop.append(fn)

    def stop(self) -> None:
        self.shutting_down = True
        self.metrics.model_loaded.set(0)
        if self.model is not None:
            self.model.engine.stop()
        for fn in self._on_stop:
            fn()
