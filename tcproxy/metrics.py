"""Prometheus metrics for ``/metrics``, with prometheus-client (its text format and histogram
arithmetic are exactly what a scraper expects; writing them by hand buys nothing).

One registry per application, never the global one: two proxies in one process (tests) do not
share counters. Request counters are fed by the access-line observer; the pacing state (queue
depth, pace, pauses) is read from the limiter at scrape time.

Model names come from clients, so label values are bounded: models in the config keep their
name, the first ``_MAX_UNLISTED`` others too, and any beyond that count as ``other``. Client
labels are the configured client names (or ``-`` without keys): bounded by the config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tcproxy import __version__
from tcproxy.record import RequestRecord

__all__ = ["CONTENT_TYPE_LATEST", "METRICS", "Metrics"]

_MAX_UNLISTED = 100
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_UPSTREAM_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(
        self, snapshot: Callable[[], dict[str, Any]], listed: Callable[[], set[str]]
    ) -> None:
        """``snapshot`` gives the live state (``State.snapshot``), ``listed`` configured models."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._listed = listed
        self._unlisted: set[str] = set()
        r = self.registry
        self.requests = Counter(
            "tcproxy_requests",
            "Requests answered, by client, model, status and who produced the answer"
            " (upstream or tcproxy)",
            ["client", "model", "status", "source"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "tcproxy_queue_wait_seconds", "Time requests waited for their slot", ["model"],
            buckets=_QUEUE_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_latency = Histogram(
            "tcproxy_upstream_latency_seconds",
            "Time from sending a request upstream to the last byte of its answer",
            ["model"], buckets=_UPSTREAM_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "tcproxy_tokens",
            "Tokens the upstream reported using",
            ["client", "model", "kind"],
            registry=r,
        )
        self.upstream_responses = Counter(
            "tcproxy_upstream_responses",
            "Final upstream answers by status (402: balance spent, 5xx: upstream trouble)",
            ["model", "status"],
            registry=r,
        )
        r.register(_LiveState(snapshot, self.label))

    def label(self, model: str | None) -> str:
        if model is None:
            return "none"
        if model in self._listed() or model in self._unlisted:
            return model
        if len(self._unlisted) < _MAX_UNLISTED:
            self._unlisted.add(model)
            return model
        return "other"

    def observe(self, record: RequestRecord) -> None:
        if record.path.startswith("/-/") or record.path == "/metrics":
            return
        model = self.label(record.model)
        source = "tcproxy" if record.error and record.upstream_status is None else "upstream"
        self.requests.labels(record.client, model, str(record.status), source).inc()
        if record.model is not None:
            self.queue_wait.labels(model).observe(record.queue_s)
        if record.upstream_s is not None:
            self.upstream_latency.labels(model).observe(record.upstream_s)
        if record.upstream_status is not None:
            self.upstream_responses.labels(model, str(record.upstream_status)).inc()
        if record.usage is not None:
            tokens = self.tokens
            tokens.labels(record.client, model, "prompt").inc(record.usage.prompt_tokens)
            tokens.labels(record.client, model, "completion").inc(record.usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState:
    """Gauges read at scrape time from the running parts."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], label: Callable[[str], str]) -> None:
        self._snapshot = snapshot
        self._label = label
        self._started = time.time()

    def describe(self) -> list[Metric]:
        return []  # dynamic; prometheus-client then calls collect() when it needs names

    def collect(self) -> Iterator[Metric]:
        state = self._snapshot()
        info = GaugeMetricFamily("tcproxy_info", "tcproxy version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "tcproxy_uptime_seconds", "Seconds since start", value=time.time() - self._started
        )
        yield GaugeMetricFamily(
            "tcproxy_draining", "1 while shutting down", value=float(state["draining"])
        )
        yield CounterMetricFamily(
            "tcproxy_log_lines_lost", "Log lines dropped or failed (stuck or full output)",
            value=state["log_lines_lost"],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "tcproxy_pacing_fallback",
            "1 while Redis-shared pacing runs on the local fallback (Redis not answering)",
            value=1.0 if state["pacing"] == "local fallback" else 0.0,
        )
        reachable = state["upstream_reachable"]
        yield GaugeMetricFamily(
            "tcproxy_upstream_up", "0 if the last connection to the upstream failed",
            value=0.0 if reachable is False else 1.0,
        )  # fmt: skip
        failures = CounterMetricFamily(
            "tcproxy_upstream_failures",
            "Requests the upstream failed, by tcproxy error code",
            labels=["code"],
        )
        for code, count in sorted(state["upstream_failures"].items()):
            failures.add_metric([code], float(count))
        yield failures
        gauges = {
            key: GaugeMetricFamily(name, text, labels=["model"])
            for key, name, text in (
                ("queue_depth", "tcproxy_queue_depth", "Requests waiting for a slot"),
                (
                    "oldest_wait_s",
                    "tcproxy_queue_oldest_wait_seconds",
                    "Oldest queued request's wait",
                ),
                ("rpm", "tcproxy_limit_rpm", "Configured requests per minute"),
                ("released_last_60s", "tcproxy_released_last_minute", "Released in the last 60 s"),
                ("paused_for_s", "tcproxy_paused_seconds", "Seconds until a paused model resumes"),
            )
        }
        refusals = CounterMetricFamily(
            "tcproxy_upstream_rate_limited",
            "Upstream 429 answers (each retried or passed on)",
            labels=["model"],
        )
        # Several unlisted models may share the label "other": add them up.
        totals: dict[str, dict[str, float]] = {key: {} for key in (*gauges, "upstream_429")}
        for model, entry in state["models"].items():
            label = self._label(model)
            for key, values in totals.items():
                if key in entry:
                    values[label] = values.get(label, 0.0) + float(entry[key])
        for key, family in gauges.items():
            for label, value in totals[key].items():
                family.add_metric([label], value)
        for label, value in totals["upstream_429"].items():
            refusals.add_metric([label], value)
        yield from gauges.values()
        yield refusals


METRICS = web.AppKey("tcproxy_metrics", Metrics)
