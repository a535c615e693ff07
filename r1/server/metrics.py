"""Prometheus metrics for the server, in prometheus_client's text format at /metrics.

Owns what is counted (HTTP requests by route and status, finished requests by reason, prompt and
generated tokens), the latency histograms (time to first token, inter-token latency, end to end),
and the engine gauges, read at scrape time from the engine's latest stats snapshot. Each app has
its own registry, so several servers (tests) can live in one process. It does not own serving
the endpoint (app.py).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from r1.engine import EngineStats, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Routes counted by name; any other path counts as "other" so random URLs cannot grow the labels.
ROUTES = (
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "r1_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.finished = Counter(
            "r1_requests_finished", "Generation requests finished, by finish reason", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("r1_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("r1_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "r1_time_to_first_token_seconds",
            "From arrival to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "r1_inter_token_latency_seconds", "Between successive generated tokens", buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "r1_request_latency_seconds", "From arrival to the last token", buckets=_E2E_BUCKETS, registry=r
        )
        r.register(_EngineCollector(stats))

    def count_http(self, path: str, status: int) -> None:
        self.http_requests.labels(_route(path), str(status)).inc()

    def observe(self, out: RequestOutput, last_decode: dict[str, float]) -> None:
        """Account one engine output; `last_decode` holds each request's previous decode clock."""
        n = len(out.new_token_ids)
        if n:
            self.generation_tokens.inc(n)
            previous = last_decode.get(out.request_id)
            if previous is None:  # the first token: its wait is the time to it
                self.ttft.observe(out.time_to_first_token)
                # The rest of an output of several (a request that does not stream gets one
                # output) came over its decode seconds.
                previous, n = 0.0, n - 1
            if n and out.decode_seconds > previous:
                gap = (out.decode_seconds - previous) / n
                for _ in range(n):
                    self.itl.observe(gap)
            last_decode[out.request_id] = out.decode_seconds
        if out.finished:
            last_decode.pop(out.request_id, None)
            self.finished.labels(out.finish_reason).inc()
            self.prompt_tokens.inc(out.num_prompt_tokens)
            self.e2e.observe(out.time_to_first_token + out.decode_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _route(path: str) -> str:
    if path in ROUTES:
        return path
    for prefix in ("/static/", "/v1/models/"):
        if path.startswith(prefix):
            return prefix.rstrip("/")
    return "other"


class _EngineCollector:
    """Scheduler and KV-cache numbers, as of the engine's latest step."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("r1_requests_running", "Sequences in the running batch", value=s.num_running)
        yield GaugeMetricFamily("r1_requests_waiting", "Sequences waiting to be scheduled", value=s.num_waiting)
        yield GaugeMetricFamily("r1_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", value=s.kv_cache_usage)
        yield GaugeMetricFamily("r1_kv_cache_blocks", "KV-cache blocks in the pool", value=s.num_blocks)
        yield GaugeMetricFamily("r1_kv_cache_free_blocks", "KV-cache blocks no sequence holds", value=s.num_free_blocks)
        yield CounterMetricFamily(
            "r1_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", value=s.prefix_queries
        )
        yield CounterMetricFamily(
            "r1_prefix_cache_hits", "Prompt tokens found in the prefix cache", value=s.prefix_hits
        )
        rate = s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0
        yield GaugeMetricFamily("r1_prefix_cache_hit_rate", "Prefix-cache hits over queries, in tokens", value=rate)
        yield CounterMetricFamily(
            "r1_spec_decode_rounds", "Speculative decoding: a request's guesses verified in a step", value=s.spec_rounds
        )
        yield CounterMetricFamily("r1_spec_decode_draft_tokens", "Tokens guessed", value=s.spec_proposed)
        yield CounterMetricFamily("r1_spec_decode_accepted_tokens", "Guessed tokens kept", value=s.spec_accepted)
        yield GaugeMetricFamily(
            "r1_spec_decode_acceptance_rate", "Guessed tokens kept over guessed", value=s.spec_acceptance_rate
        )
        yield GaugeMetricFamily(
            "r1_spec_decode_mean_accepted_length",
            "Tokens a verifying step gives a request (kept guesses + 1)",
            value=s.spec_mean_accepted,
        )
