"""Prometheus metrics of one server: its own counters and histograms, plus the engine's stats at scrape time.

Each app owns a registry (no process-global state), so several servers in one process, as in
tests, do not share numbers. Engine numbers are read from `engine.stats()` when /metrics is
scraped; a key the engine does not report counts as 0, and numeric keys beyond the known ones
are exported as `llavakit_engine_<key>` gauges.
"""

from __future__ import annotations

import re
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; TTFT on a CPU spans milliseconds (cached tiny models) to minutes (7B with images)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# engine stats key -> (metric name, help, kind)
_ENGINE_KEYS = {
    "requests_running": ("llavakit_running_requests", "Requests in the running batch", "gauge"),
    "requests_waiting": ("llavakit_waiting_requests", "Requests queued for the engine", "gauge"),
    "image_cache_hits": ("llavakit_image_cache_hits", "Images whose features came from the cache", "counter"),
    "image_cache_misses": ("llavakit_image_cache_misses", "Images encoded by the vision tower", "counter"),
    "prefix_cache_hit_tokens": ("llavakit_prefix_cache_hit_tokens", "Prompt tokens reused from the prefix cache",
                                "counter"),
    "prompt_tokens_total": ("llavakit_engine_prompt_tokens", "Prompt tokens the engine received", "counter"),
    "generation_tokens_total": ("llavakit_engine_generation_tokens", "Tokens the engine generated", "counter"),
    "vision_seconds_total": ("llavakit_vision_seconds", "Seconds spent in the vision tower and projector", "counter"),
}


class _EngineCollector:
    """Reads engine.stats() at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        """Metric families from one engine.stats() snapshot."""
        try:
            stats = dict(self.stats() or {})
        except Exception:  # a scrape must not fail because the engine is busy stopping
            stats = {}
        for key, (name, text, kind) in _ENGINE_KEYS.items():
            value = float(stats.get(key, 0) or 0)
            family = GaugeMetricFamily(name, text) if kind == "gauge" else CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family
        hits, misses = float(stats.get("image_cache_hits", 0) or 0), float(stats.get("image_cache_misses", 0) or 0)
        rate = GaugeMetricFamily("llavakit_image_cache_hit_rate", "Image-feature cache hits / lookups")
        rate.add_metric([], hits / (hits + misses) if hits + misses else 0.0)
        yield rate
        prompt = float(stats.get("prompt_tokens_total", 0) or 0)
        prefix = GaugeMetricFamily("llavakit_prefix_cache_hit_rate", "Prompt tokens reused / prompt tokens")
        prefix.add_metric([], float(stats.get("prefix_cache_hit_tokens", 0) or 0) / prompt if prompt else 0.0)
        yield prefix
        for key, value in stats.items():
            if key in _ENGINE_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            extra = GaugeMetricFamily("llavakit_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", key), f"engine stat {key}")
            extra.add_metric([], float(value))
            yield extra


class Metrics:
    """The server's metrics. Record with the attributes; `render()` is the /metrics body."""

    def __init__(self, engine_stats: Callable[[], dict]):
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("llavakit_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("llavakit_prompt_tokens", "Prompt tokens of answered requests (images included)",
                                     registry=r)
        self.generation_tokens = Counter("llavakit_generation_tokens", "Tokens generated for clients", registry=r)
        self.finished = Counter("llavakit_choices_finished", "Choices finished, by finish reason", ["reason"],
                                registry=r)
        self.in_flight = Gauge("llavakit_choices_in_flight", "Choices admitted and not yet finished", registry=r)
        self.ttft = Histogram("llavakit_time_to_first_token_seconds", "From request arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("llavakit_inter_token_latency_seconds", "Between consecutive tokens of a choice",
                                     buckets=_TOKEN_BUCKETS, registry=r)
        self.request_latency = Histogram("llavakit_request_latency_seconds", "From arrival to the last token",
                                         buckets=_REQUEST_BUCKETS, registry=r)
        self.encode_latency = Histogram("llavakit_encode_seconds", "Media decoding and tokenization per request",
                                        buckets=_REQUEST_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
