"""Prometheus metrics for ``/metrics``.

The request path only bumps plain counters and histogram buckets kept here (a dict increment and
a bisect: no locks, no label lookups); prometheus-client turns them into its text format at
scrape time, through a custom collector, with the pacing state read from the limiter then.
prometheus-client's own Counter/Histogram objects cost several label lookups and locks per
request, which bench/perf.py showed in the profile; its exposition is kept because it gets the
format right.

One registry per application, never the global one: two proxies in one process (tests) do not
share counters. Model names come from clients, so label values are bounded: models in the config
keep their name, the first ``_MAX_UNLISTED`` others too, and any beyond that count as ``other``.
Client labels are the configured client names (or ``-`` without keys): bounded by the config.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from tcproxy import __version__
from tcproxy.record import RequestRecord

__all__ = ["CONTENT_TYPE_LATEST", "METRICS", "Metrics"]

_MAX_UNLISTED = 100
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_UPSTREAM_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        out: list[tuple[str, float]] = []
        labels = (*map(floatToGoString, self.bounds), "+Inf")
        for bound, count in zip(labels, self.counts, strict=True):
            cumulative += count
            out.append((bound, cumulative))
        return out


class Metrics:
    def __init__(
        self, snapshot: Callable[[], dict[str, Any]], listed: Callable[[], Mapping[str, Any]]
    ) -> None:
        """``snapshot`` gives the live state (``State.snapshot``), ``listed`` configured models."""
        self._snapshot = snapshot
        self._listed = listed
        self._unlisted: set[str] = set()
        self._started = time.time()
        self.requests: Counter[tuple[str, str, str, str]] = (
            Counter()
        )  # client, model, status, source
        self.tokens: Counter[tuple[str, str, str]] = Counter()  # client, model, kind
        self.upstream_responses: Counter[tuple[str, str]] = Counter()  # model, status
        self.queue_wait: dict[str, _Histogram] = {}
        self.upstream_latency: dict[str, _Histogram] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def label(self, model: str | None) -> str:
        if model is None:
            return "none"
        model = model.strip().lower()
        if model in self._unlisted or model in self._listed():
            return model
        if len(self._unlisted) < _MAX_UNLISTED:
            self._unlisted.add(model)
            return model
        return "other"

    def observe(self, record: RequestRecord) -> None:
        """Observer: count one finished request."""
        if record.path.startswith("/-/") or record.path == "/metrics":
            return
        model = self.label(record.model)
        source = "tcproxy" if record.error and record.upstream_status is None else "upstream"
        self.requests[(record.client, model, str(record.status), source)] += 1
        if record.model is not None:
            _histogram(self.queue_wait, model, _QUEUE_BUCKETS).observe(record.queue_s)
        if record.upstream_s is not None:
            _histogram(self.upstream_latency, model, _UPSTREAM_BUCKETS).observe(record.upstream_s)
        if record.upstream_status is not None:
            self.upstream_responses[(model, str(record.upstream_status))] += 1
        usage = record.usage
        if usage is not None:
            self.tokens[(record.client, model, "prompt")] += usage.prompt_tokens
            self.tokens[(record.client, model, "completion")] += usage.completion_tokens

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- the collector prometheus-client calls at scrape time ----------------------------------

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._traffic()
        yield from self._live(self._snapshot())

    def _traffic(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "tcproxy_requests",
            "Requests answered, by client, model, status and who produced the answer"
            " (upstream or tcproxy)",
            labels=["client", "model", "status", "source"],
        )
        for key, count in sorted(self.requests.items()):
            requests.add_metric(list(key), count)
        tokens = CounterMetricFamily(
            "tcproxy_tokens",
            "Tokens the upstream reported using",
            labels=["client", "model", "kind"],
        )
        for kind, count in sorted(self.tokens.items()):
            tokens.add_metric(list(kind), count)
        responses = CounterMetricFamily(
            "tcproxy_upstream_responses",
            "Final upstream answers by status (402: balance spent, 5xx: upstream trouble)",
            labels=["model", "status"],
        )
        for answer, count in sorted(self.upstream_responses.items()):
            responses.add_metric(list(answer), count)
        yield from (requests, tokens, responses)
        for name, text, histograms in (
            ("tcproxy_queue_wait_seconds", "Time requests waited for their slot", self.queue_wait),
            (
                "tcproxy_upstream_latency_seconds",
                "Time from sending a request upstream to the last byte of its answer",
                self.upstream_latency,
            ),
        ):
            family = HistogramMetricFamily(name, text, labels=["model"])
            for model, histogram in sorted(histograms.items()):
                family.add_metric([model], histogram.buckets(), histogram.total)
            yield family

    def _live(self, state: dict[str, Any]) -> Iterator[Metric]:
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
            "tcproxy_log_lines_lost",
            "Log lines dropped or failed (stuck or full output)",
            value=state["log_lines_lost"],
        )
        yield GaugeMetricFamily(
            "tcproxy_pacing_fallback",
            "1 while Redis-shared pacing runs on the local fallback (Redis not answering)",
            value=1.0 if state["pacing"] == "local fallback" else 0.0,
        )
        yield GaugeMetricFamily(
            "tcproxy_upstream_up",
            "0 if the last connection to the upstream failed",
            value=0.0 if state["upstream_reachable"] is False else 1.0,
        )
        failures = CounterMetricFamily(
            "tcproxy_upstream_failures",
            "Requests the upstream failed, by tcproxy error code",
            labels=["code"],
        )
        for code, count in sorted(state["upstream_failures"].items()):
            failures.add_metric([code], float(count))
        yield failures
        yield from self._pacing(state["models"])

    def _pacing(self, models: dict[str, dict[str, Any]]) -> Iterator[Metric]:
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
        for model, entry in models.items():
            label = self.label(model)
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


def _histogram(
    histograms: dict[str, _Histogram], model: str, bounds: tuple[float, ...]
) -> _Histogram:
    histogram = histograms.get(model)
    if histogram is None:
        histogram = histograms[model] = _Histogram(bounds)
    return histogram


METRICS = web.AppKey("tcproxy_metrics", Metrics)
