"""Prometheus metrics of one server: HTTP metrics operators expect, `qwen_*` engine metrics, and the
model-server protocol of the Gateway API Inference Extension under vLLM's names (`vllm:*`), which its
endpoint picker, KEDA recipes and existing vLLM dashboards read.

Each server has its own registry, so two servers in one process (as in tests) never share series.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

import sys

from prometheus_client.core import CounterMetricFamily

from .engine.engine import EngineMetrics

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
                   90.0, 120.0, 180.0, 300.0, 600.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

ERROR_REASONS = ("validation", "auth", "queue_full", "timeout", "cancelled", "generation", "not_ready",
                 "context_length", "not_found", "internal", "peer")


class _StructuredOutputTime:
    """qwen_structured_output_seconds_total: read from the grammar code's clock when it is scraped (0 until a
    request first asks for structured output; the module is not imported for a scrape)."""

    def collect(self):
        mod = sys.modules.get("qwen_inference.structured")
        c = CounterMetricFamily("qwen_structured_output_seconds", "Time the engine spent on constrained decoding: "
                                "filling and applying token masks and advancing grammars.")
        c.add_metric([], mod.GRAMMAR_TIME.seconds if mod is not None else 0.0)
        yield c


class ServerMetrics(EngineMetrics):
    def __init__(self, model: str) -> None:
        """`model`: the served model name, the `model_name` label of the vLLM-named series."""
        disable_created_metrics()  # no *_created series: they double the scrape for nothing here
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        r.register(_StructuredOutputTime())
        PlatformCollector(registry=r)
        self.http_requests = Counter(
            "http_requests_total", "HTTP requests by method, route template and status code.",
            ["method", "endpoint", "status_code"], registry=r,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds", "HTTP request duration, until the last byte of the response.",
            ["method", "endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.active_connections = Gauge("active_connections", "HTTP requests being served now.", registry=r)
        self.inference = Histogram(
            "model_inference_duration_seconds", "Time a request spends in the engine after leaving the queue.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram("qwen_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("qwen_time_per_output_token_seconds", "Mean time between generated tokens of a request.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("qwen_e2e_request_latency_seconds", "Time from arrival to the end of generation.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("qwen_request_queue_seconds", "Time requests wait for a slot.",
                               buckets=QUEUE_BUCKETS, registry=r)
        self.image_encode = Histogram("qwen_image_encode_seconds", "Time the engine spent encoding an image with the "
                                      "model's vision tower (one observation an image).",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.running = Gauge("qwen_requests_running", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge("qwen_requests_waiting", "Requests waiting for a slot.", registry=r)
        self.kv_usage = Gauge("qwen_kv_cache_usage_ratio", "Share of KV cache blocks in use (0 to 1).", registry=r)
        self.state_usage = Gauge("qwen_recurrent_state_usage_ratio", "Share of recurrent-state slots in use (0 to 1; "
                                 "models with linear-attention layers, 0 for others).", registry=r)
        self.prefix_caching = Gauge("qwen_prefix_caching_enabled", "1 when prompt prefixes are cached (off for models "
                                    "with a recurrent state per sequence under --state-checkpoints 0).", registry=r)
        self.prompt_tokens = Counter("qwen_prompt_tokens", "Prompt tokens of admitted requests, computed or found in "
                                     "the prefix cache.", registry=r)
        self.prefix_hits = Counter("qwen_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache, not "
                                   "computed again.", registry=r)
        self.generation_tokens = Counter("qwen_generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter("qwen_request_success", "Requests that finished, by finish reason.",
                               ["finish_reason"], registry=r)
        self.errors = Counter("qwen_request_errors", "Requests that failed, by reason.", ["reason"], registry=r)
        self.model_loaded = Gauge("qwen_model_loaded", "1 when the model is loaded and the engine runs.", registry=r)
        self.info = Gauge("qwen_model_info", "The served model.", ["model", "dtype", "device"], registry=r)
        # vLLM's names and labels: the same gauges as qwen_requests_*, qwen_kv_cache_usage_ratio
        self.vllm_running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                                  ["model_name"], registry=r).labels(model)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                  ["model_name"], registry=r).labels(model)
        self.vllm_kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                   ["model_name"], registry=r).labels(model)
        self.vllm_cache_config = Gauge("vllm:cache_config_info", "Information of the KV cache: block size in "
                                       "tokens, number of blocks, prefix caching.",
                                       ["block_size", "num_gpu_blocks", "enable_prefix_caching"], registry=r)
        for reason in ("stop", "length", "tool_calls"):
            self.success.labels(reason)
        for reason in ERROR_REASONS:
            self.errors.labels(reason)

    # engine callbacks (called from the engine thread; prometheus_client is thread-safe)
    def on_admit(self, queue_seconds: float) -> None:
        self.queue.observe(queue_seconds)

    def on_first_token(self, ttft_seconds: float) -> None:
        self.ttft.observe(ttft_seconds)

    def on_tokens(self, prompt: int, generated: int) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)

    def on_prefix_hit(self, tokens: int) -> None:
        self.prefix_hits.inc(tokens)

    def on_image(self, seconds: float) -> None:
        self.image_encode.observe(seconds)

    def on_finish(self, reason: str, e2e: float, tpot: float | None, inference: float) -> None:
        if reason in ("stop", "length"):
            self.e2e.observe(e2e)
            self.inference.observe(inference)
            if tpot is not None:
                self.tpot.observe(tpot)

    def on_step(self, running: int, waiting: int, kv_usage: float, state_usage: float = 0.0) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        self.state_usage.set(state_usage)
        self.vllm_running.set(running)
        self.vllm_waiting.set(waiting)
        self.vllm_kv_usage.set(kv_usage)

    def on_cache_config(self, block_size: int, num_blocks: int, prefix_caching: bool) -> None:
        """The KV cache as sized at load, for an endpoint picker's prefix-cache scorer (one series, value 1)."""
        self.vllm_cache_config.clear()
        self.vllm_cache_config.labels(str(block_size), str(num_blocks), str(prefix_caching)).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
