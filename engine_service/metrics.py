"""Prometheus metrics of the engine service, named as vLLM names them so dashboards carry over."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)


class EngineMetrics:
    """One instance per server; a private registry so tests can build several servers in one process."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)

        self.time_to_first_token = hist("qwen3serve_time_to_first_token_seconds", "Time to first token")
        self.inter_token_latency = hist("qwen3serve_inter_token_latency_seconds", "Time between streamed tokens")
        self.e2e_request_latency = hist("qwen3serve_e2e_request_latency_seconds", "Request latency, end to end")
        self.request_queue_time = hist("qwen3serve_request_queue_time_seconds", "Time waiting before first scheduled")
        self.num_requests_running = Gauge("qwen3serve_num_requests_running", "Requests holding KV cache", labels,
                                          registry=self.registry).labels(model_name)
        self.num_requests_waiting = Gauge("qwen3serve_num_requests_waiting", "Requests waiting to be scheduled",
                                          labels, registry=self.registry).labels(model_name)
        self.kv_cache_usage = Gauge("qwen3serve_kv_cache_usage_perc", "Fraction of KV blocks in use", labels,
                                    registry=self.registry).labels(model_name)
        self.prompt_tokens = Counter("qwen3serve_prompt_tokens", "Prompt tokens received", labels,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("qwen3serve_generation_tokens", "Tokens generated", labels,
                                         registry=self.registry).labels(model_name)
        self.num_preemptions = Gauge("qwen3serve_num_preemptions", "Preemptions since start", labels,
                                     registry=self.registry).labels(model_name)
        self.requests_finished = Counter("qwen3serve_request_success", "Finished requests by reason",
                                         ["model_name", "finish_reason"], registry=self.registry)
        self._model_name = model_name

    def finished(self, reason: str) -> None:
        self.requests_finished.labels(self._model_name, reason).inc()
