"""Prometheus metrics of the engine, named as vLLM names them (``qwen3serve_`` prefix) so dashboards carry over.

Metric objects are module-level (prometheus_client's default registry, served by
``service_common.metrics.start_metrics_server``); ``EngineMetrics`` binds them to one model name.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from engine_service.protocol import EngineStats

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_M = ["model_name"]

TIME_TO_FIRST_TOKEN = Histogram(
    "qwen3serve_time_to_first_token_seconds", "Time from request to first token", _M, buckets=_LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "qwen3serve_inter_token_latency_seconds",
    "Time between a request's tokens after its first message (a message of n tokens: its gap / n, n times)",
    _M,
    buckets=_LATENCY_BUCKETS,
)
E2E_REQUEST_LATENCY = Histogram(
    "qwen3serve_e2e_request_latency_seconds", "Request latency, first byte to last", _M, buckets=_LATENCY_BUCKETS
)
REQUEST_QUEUE_TIME = Histogram(
    "qwen3serve_request_queue_time_seconds", "Time waiting before first scheduled", _M, buckets=_LATENCY_BUCKETS
)
NUM_REQUESTS_RUNNING = Gauge("qwen3serve_num_requests_running", "Requests holding KV cache", _M)
NUM_REQUESTS_WAITING = Gauge("qwen3serve_num_requests_waiting", "Requests waiting to be scheduled", _M)
KV_CACHE_USAGE = Gauge("qwen3serve_kv_cache_usage_perc", "Fraction of KV cache blocks in use", _M)
NUM_PREEMPTIONS = Gauge("qwen3serve_num_preemptions", "Preemptions since start", _M)
PREFIX_CACHE_HIT_RATE = Gauge("qwen3serve_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache", _M)
PROMPT_TOKENS = Counter("qwen3serve_prompt_tokens", "Prompt tokens of finished requests", _M)
GENERATION_TOKENS = Counter("qwen3serve_generation_tokens", "Tokens generated", _M)
REQUEST_SUCCESS = Counter("qwen3serve_request_success", "Finished requests by finish reason", [*_M, "finish_reason"])


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.time_to_first_token = TIME_TO_FIRST_TOKEN.labels(model_name)
        self.inter_token_latency = INTER_TOKEN_LATENCY.labels(model_name)
        self.e2e_request_latency = E2E_REQUEST_LATENCY.labels(model_name)
        self.request_queue_time = REQUEST_QUEUE_TIME.labels(model_name)
        self.generation_tokens = GENERATION_TOKENS.labels(model_name)
        self.prompt_tokens = PROMPT_TOKENS.labels(model_name)

    def finished(self, reason: str) -> None:
        REQUEST_SUCCESS.labels(self.model_name, reason).inc()

    def update_load(self, stats: EngineStats) -> None:
        NUM_REQUESTS_RUNNING.labels(self.model_name).set(stats.num_running)
        NUM_REQUESTS_WAITING.labels(self.model_name).set(stats.num_waiting)
        KV_CACHE_USAGE.labels(self.model_name).set(stats.kv_cache_usage)
        NUM_PREEMPTIONS.labels(self.model_name).set(stats.num_preemptions_total)
        PREFIX_CACHE_HIT_RATE.labels(self.model_name).set(stats.prefix_cache_hit_rate)
