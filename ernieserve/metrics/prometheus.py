"""Prometheus metrics of the API server, with FastDeploy's names (`fastdeploy:` -> `ernieserve:`).

Every server owns its own `CollectorRegistry`, so two servers (or a server and a test) in one
process never share or clash over metrics. The front end's engine client feeds it: scheduler
stats from every engine message, and per-request timings when a request sees its first token
and when it finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from ernieserve.engine.protocol import EngineReady, SchedulerStats

PREFIX = "ernieserve:"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)
_RATIO_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass(slots=True)
class RequestTiming:
    """One user request's life as the front end sees it (wall-clock seconds, time.time())."""

    arrival_time: float
    num_prompt_tokens: int
    max_tokens: int | None
    num_samples: int = 1  # n: the tokens of all samples count in num_generation_tokens
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_generation_tokens: int = 0


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._preempted_seen = 0
        self._max_num_seqs = 0
        self._block_size = 0
        self._define_request_metrics()
        self._define_latency_metrics()
        self._define_token_metrics()
        self._define_cache_metrics()

    # ---- definitions ------------------------------------------------------------------------
    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(PREFIX + name, doc, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(PREFIX + name, doc, labelnames=labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(PREFIX + name, doc, buckets=buckets, registry=self.registry)

    def _define_request_metrics(self) -> None:
        self.requests_number = self._counter("requests_number", "Total number of received requests")
        self.request_success = self._counter("request_success_total", "Number of successfully processed requests")
        self.request_preempted = self._counter("request_preempted_total", "Number of preempted requests")
        self.num_requests_running = self._gauge("num_requests_running", "Number of requests currently running")
        self.num_requests_waiting = self._gauge("num_requests_waiting", "Number of requests currently waiting")
        self.batch_size = self._gauge("batch_size", "Actual batch size during inference")
        self.max_batch_size = self._gauge("max_batch_size", "Maximum batch size configured at service startup")
        self.available_batch_size = self._gauge("available_batch_size",
                                                "Number of additional requests that can be inserted during Decode")

    def _define_latency_metrics(self) -> None:
        h = self._histogram
        self.ttft = h("time_to_first_token_seconds", "Time to generate the first token (TTFT)", _LATENCY_BUCKETS)
        self.tpot = h("time_per_output_token_seconds", "Time interval between generated tokens (TPOT)", _TPOT_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "End-to-end request latency distribution", _LATENCY_BUCKETS)
        self.inference_time = h("request_inference_time_seconds", "Time spent in the RUNNING phase",
                                _LATENCY_BUCKETS)
        self.queue_time = h("request_queue_time_seconds", "Time spent in the WAITING phase", _LATENCY_BUCKETS)
        self.prefill_time = h("request_prefill_time_seconds", "Time spent in the Prefill phase", _LATENCY_BUCKETS)
        self.decode_time = h("request_decode_time_seconds", "Time spent in the Decode phase", _LATENCY_BUCKETS)

    def _define_token_metrics(self) -> None:
        self.prompt_tokens = self._counter("prompt_tokens_total", "Total number of processed prompt tokens")
        self.generation_tokens = self._counter("generation_tokens_total", "Total number of generated tokens")
        self.request_prompt_tokens = self._histogram("request_prompt_tokens", "Prompt token count per request",
                                                     _TOKEN_BUCKETS)
        self.request_generation_tokens = self._histogram("request_generation_tokens",
                                                         "Generation token count per request", _TOKEN_BUCKETS)
        self.request_params_max_tokens = self._histogram("request_params_max_tokens",
                                                         "Distribution of max_tokens per request", _TOKEN_BUCKETS)
        self.request_token_ratio = self._histogram("request_token_ratio",
                                                   "Token generation rate per request (tokens/s)", _RATIO_BUCKETS)

    def _define_cache_metrics(self) -> None:
        g = self._gauge
        self.gpu_cache_usage = g("gpu_cache_usage_perc", "GPU KV cache utilization")
        self.available_gpu_block_num = g("available_gpu_block_num",
                                         "Available GPU blocks in cache (including unreleased prefix blocks)")
        self.free_gpu_block_num = g("free_gpu_block_num", "Number of free GPU blocks in cache")
        self.max_gpu_block_num = g("max_gpu_block_num", "Total number of GPU blocks initialized at startup")
        self.available_gpu_resource = g("available_gpu_resource", "Ratio of available GPU blocks to total GPU blocks")
        self.hit_token_rate = g("hit_token_rate", "Prefix cache hit rate at the token level")
        self.hit_req_rate = g("hit_req_rate", "Prefix cache hit rate at the request level")
        self.gpu_hit_token_rate = g("gpu_hit_token_rate", "Prefix cache hit rate of tokens found on the GPU")
        self.cpu_hit_token_rate = g("cpu_hit_token_rate",
                                    "Prefix cache hit rate of tokens found on the CPU tier (--swap-space)")
        self.prefix_gpu_cache_token_num = g("prefix_gpu_cache_token_num", "Tokens held by cached GPU blocks")
        self.prefix_cpu_cache_token_num = g("prefix_cpu_cache_token_num", "Tokens held by cached CPU-tier blocks")
        self.cache_config_info = g("cache_config_info", "Cache configuration info of the inference engine",
                                   ("block_size", "num_gpu_blocks", "max_model_len", "max_num_seqs",
                                    "max_num_batched_tokens"))

    # ---- updates ------------------------------------------------------------------------------
    def set_engine_info(self, ready: EngineReady) -> None:
        self._max_num_seqs = ready.max_num_seqs
        self._block_size = ready.block_size
        self.max_batch_size.set(ready.max_num_seqs)
        self.available_batch_size.set(ready.max_num_seqs)
        self.max_gpu_block_num.set(ready.num_gpu_blocks)
        self.free_gpu_block_num.set(ready.num_gpu_blocks)
        self.available_gpu_block_num.set(ready.num_gpu_blocks)
        self.available_gpu_resource.set(1.0)
        self.cache_config_info.labels(str(ready.block_size), str(ready.num_gpu_blocks), str(ready.max_model_len),
                                      str(ready.max_num_seqs), str(ready.max_num_batched_tokens)).set(1)

    def on_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.batch_size.set(stats.num_running_reqs)
        self.available_batch_size.set(max(0, self._max_num_seqs - stats.num_running_reqs))
        self.gpu_cache_usage.set(stats.kv_cache_usage)
        self.free_gpu_block_num.set(stats.num_free_blocks)
        self.available_gpu_block_num.set(stats.num_free_blocks)
        if stats.num_total_blocks:
            self.max_gpu_block_num.set(stats.num_total_blocks)
            self.available_gpu_resource.set(stats.num_free_blocks / stats.num_total_blocks)
        if stats.prefix_cache_queries:
            q = stats.prefix_cache_queries
            self.hit_token_rate.set(stats.prefix_cache_hits / q)
            self.gpu_hit_token_rate.set((stats.prefix_cache_hits - stats.prefix_cache_host_hits) / q)
            self.cpu_hit_token_rate.set(stats.prefix_cache_host_hits / q)
        if stats.prefix_cache_requests:
            self.hit_req_rate.set(stats.prefix_cache_hit_requests / stats.prefix_cache_requests)
        self.prefix_gpu_cache_token_num.set(stats.num_cached_blocks * self._block_size)
        self.prefix_cpu_cache_token_num.set(stats.num_host_cached_blocks * self._block_size)
        if stats.num_preempted_total > self._preempted_seen:
            self.request_preempted.inc(stats.num_preempted_total - self._preempted_seen)
            self._preempted_seen = stats.num_preempted_total

    def on_request_received(self, timing: RequestTiming) -> None:
        self.requests_number.inc()
        self.request_prompt_tokens.observe(timing.num_prompt_tokens)
        if timing.max_tokens is not None:
            self.request_params_max_tokens.observe(timing.max_tokens)

    def on_generation_tokens(self, count: int) -> None:
        self.generation_tokens.inc(count)

    def on_first_token(self, timing: RequestTiming) -> None:
        """The prompt is prefilled: count its tokens and observe TTFT, queue and prefill times."""
        assert timing.first_token_time is not None
        self.prompt_tokens.inc(timing.num_prompt_tokens)
        self.ttft.observe(max(0.0, timing.first_token_time - timing.arrival_time))
        if timing.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, timing.first_scheduled_time - timing.arrival_time))
            self.prefill_time.observe(max(0.0, timing.first_token_time - timing.first_scheduled_time))

    def on_request_finished(self, timing: RequestTiming, success: bool) -> None:
        if not success or timing.finish_time is None:
            return
        self.request_success.inc()
        e2e = max(0.0, timing.finish_time - timing.arrival_time)
        self.e2e.observe(e2e)
        self.request_generation_tokens.observe(timing.num_generation_tokens)
        if e2e > 0:
            self.request_token_ratio.observe(timing.num_generation_tokens / e2e)
        if timing.first_scheduled_time is not None:
            self.inference_time.observe(max(0.0, timing.finish_time - timing.first_scheduled_time))
        if timing.first_token_time is not None:
            decode = max(0.0, timing.finish_time - timing.first_token_time)
            self.decode_time.observe(decode)
            per_sample = timing.num_generation_tokens / max(1, timing.num_samples)
            if per_sample > 1:
                self.tpot.observe(decode / (per_sample - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
