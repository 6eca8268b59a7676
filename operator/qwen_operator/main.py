"""`qwen-operator`: parse the settings, set up logging, run kopf. Nothing happens at import time."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError
from pydantic_settings import CliApp


def main(argv: list[str] | None = None) -> int:
    import kopf

    from qwen_inference.logs import setup as setup_logging

    from . import handlers
    from .settings import OperatorSettings

    try:
        settings = CliApp.run(OperatorSettings, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"qwen-operator: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    logging.getLogger("kopf").setLevel(logging.WARNING if settings.log_level != "debug" else logging.DEBUG)
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    handlers.SETTINGS = settings
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    try:
        kopf.run(
            standalone=True,
            clusterwide=settings.clusterwide,
            namespaces=settings.namespaces,
            liveness_endpoint=liveness,
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
