"""/metrics: the engine's counters in Prometheus' text format (prometheus_client)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["render"]


class _EngineCollector:
    def __init__(self, engine, http: dict):
        self.engine, self.http = engine, http

    def collect(self):
        e, s = self.engine, self.engine.stats
        req = CounterMetricFamily("onebit_requests", "engine requests by how they finished",
                                  labels=["finish_reason"])
        for reason, n in s.finished.items():
            req.add_metric([reason], n)
        yield req
        yield CounterMetricFamily("onebit_requests_submitted", "engine requests accepted", value=s.requests)
        yield CounterMetricFamily("onebit_requests_rejected_busy", "requests answered 503 (queue full)",
                                  value=s.rejected_busy)
        http = CounterMetricFamily("onebit_http_responses", "HTTP responses", labels=["route", "status"])
        for (route, status), n in sorted(self.http.items()):
            http.add_metric([route, str(status)], n)
        yield http
        yield GaugeMetricFamily("onebit_queue_depth", "requests waiting for a slot", value=e.queue_depth)
        yield GaugeMetricFamily("onebit_active_sequences", "sequences in slots", value=e.active)
        yield GaugeMetricFamily("onebit_slots", "sequences held at once (--parallel)", value=e.slots)
        yield CounterMetricFamily("onebit_prompt_tokens", "prompt tokens prefilled", value=s.prompt_tokens)
        yield CounterMetricFamily("onebit_prompt_tokens_reused", "prompt tokens served from a cached prefix",
                                  value=s.reused_tokens)
        yield CounterMetricFamily("onebit_generated_tokens", "tokens generated", value=s.generated_tokens)
        yield CounterMetricFamily("onebit_engine_steps", "forward steps", value=s.steps)
        yield CounterMetricFamily("onebit_engine_busy_seconds", "time spent in forward steps",
                                  value=s.busy_seconds)
        yield GaugeMetricFamily("onebit_tokens_per_second", "tokens generated per second over the last 10 s",
                                value=s.tokens_per_second(time.perf_counter()))
        buckets, acc = [], 0
        for le, n in zip(list(s.ttft_buckets) + [float("inf")], s.ttft_counts):
            acc += n
            buckets.append(("+Inf" if le == float("inf") else repr(le), acc))
        yield HistogramMetricFamily("onebit_time_to_first_token_seconds", "submit to first token",
                                    buckets=buckets, sum_value=s.ttft_sum)


def render(engine, http: dict) -> tuple[bytes, str]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_EngineCollector(engine, http))
    return generate_latest(reg), CONTENT_TYPE_LATEST
