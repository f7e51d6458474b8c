"""``tcproxy usage``: who used what, from the usage ledger, as a table, JSON or CSV.

Reads the SQLite file read-only, so it can run while the service writes to it.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tcproxy.ledger import connect
from tcproxy.quotas import day_start, month_start

GROUPINGS = {"client": ("client",), "model": ("model",), "client,model": ("client", "model")}
_COLUMNS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "avg_queue_ms",
    "avg_upstream_ms",
)


class ReportError(Exception):
    """Bad arguments or an unreadable ledger; the message says what to do."""


@dataclass(frozen=True)
class Period:
    start: float
    end: float
    label: str


def period(
    name: str | None, since: str | None, until: str | None, now: float | None = None
) -> Period:
    """The time span to report: a named period, or --since/--until dates (UTC)."""
    now = time.time() if now is None else now
    if since or until:
        start = _date(since, "--since") if since else 0.0
        end = _date(until, "--until") if until else now
        return Period(start, end, f"{since or 'the start'} to {until or 'now'} (UTC)")
    name = name or "month"
    if name == "today":
        return Period(day_start(now), now, "today (UTC)")
    if name == "yesterday":
        return Period(day_start(now) - 86400, day_start(now), "yesterday (UTC)")
    if name == "month":
        return Period(month_start(now), now, "this month (UTC)")
    if name == "last-month":
        end = month_start(now)
        return Period(month_start(end - 1), end, "last month (UTC)")
    if name == "all":
        return Period(0.0, now, "all time")
    match = re.fullmatch(r"(\d{1,4})d", name)
    if match:
        return Period(now - int(match[1]) * 86400, now, f"the last {match[1]} days")
    raise ReportError(
        f"unknown period {name!r}: use today, yesterday, month, last-month, all, or Nd (e.g. 7d)"
    )


def _date(text: str, flag: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{flag} takes a date like 2026-11-01 (UTC), got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def summarise(path: Path, span: Period, by: str) -> list[dict[str, Any]]:
    keys = GROUPINGS.get(by)
    if keys is None:
        raise ReportError(f"--by takes one of {', '.join(GROUPINGS)}, got {by!r}")
    if not path.is_file():
        raise ReportError(f"no usage ledger at {path} (is ledger.path or --db right?)")
    group = ", ".join(keys)  # from the fixed table above, never from input
    query = (
        f"SELECT {group}, COUNT(*), SUM(status >= 400), SUM(prompt_tokens),"
        " SUM(completion_tokens), SUM(total_tokens), AVG(queue_ms), AVG(upstream_ms)"
        f" FROM requests WHERE ts >= ? AND ts < ? GROUP BY {group}"
        f" ORDER BY SUM(total_tokens) DESC, {group}"
    )
    try:
        connection = connect(path, readonly=True)
        try:
            rows = connection.execute(query, (span.start, span.end)).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise ReportError(f"cannot read the usage ledger at {path}: {exc}") from None
    report = []
    for row in rows:
        entry: dict[str, Any] = dict(zip(keys, row[: len(keys)], strict=True))
        values = row[len(keys) :]
        entry.update(
            {
                "requests": values[0],
                "errors": values[1] or 0,
                "prompt_tokens": values[2] or 0,
                "completion_tokens": values[3] or 0,
                "total_tokens": values[4] or 0,
                "avg_queue_ms": round(values[5] or 0.0, 1),
                "avg_upstream_ms": round(values[6] or 0.0, 1),
            }
        )
        if entry.get("model") is None and "model" in keys:
            entry["model"] = "(none)"
        report.append(entry)
    return report


def render(report: list[dict[str, Any]], by: str, span: Period, fmt: str) -> str:
    keys = GROUPINGS[by]
    if fmt == "json":
        return json.dumps(
            {
                "period": {"start": _iso(span.start), "end": _iso(span.end)},
                "by": list(keys),
                "rows": report,
            },
            indent=2,
        )
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[*keys, *_COLUMNS], lineterminator="\n")
        writer.writeheader()
        writer.writerows(report)
        return out.getvalue().rstrip("\n")
    return _table(report, keys, span)


def _table(report: list[dict[str, Any]], keys: Sequence[str], span: Period) -> str:
    header = [
        *keys,
        "requests",
        "errors",
        "prompt",
        "completion",
        "total tokens",
        "avg queue",
        "avg upstream",
    ]
    lines = [[str(r[k]) for k in keys] + _numbers(r) for r in report]
    totals = {
        c: sum(r[c] for r in report)
        for c in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")
    }
    weight = totals["requests"] or 1
    totals["avg_queue_ms"] = sum(r["avg_queue_ms"] * r["requests"] for r in report) / weight
    totals["avg_upstream_ms"] = sum(r["avg_upstream_ms"] * r["requests"] for r in report) / weight
    footer = ["total"] + [""] * (len(keys) - 1) + _numbers(totals)
    widths = [max(len(row[i]) for row in [header, *lines, footer]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [
            cell.ljust(width) if i < len(keys) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    if span.start > 0:
        title = f"usage for {span.label}: {_iso(span.start)} to {_iso(span.end)}"
    else:
        title = f"usage for {span.label}, to {_iso(span.end)} UTC"
    if not report:
        return f"{title}\n(no requests in this period)"
    return "\n".join([title, "", fmt(header), rule, *map(fmt, lines), rule, fmt(footer)])


def _numbers(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['requests']:,}",
        f"{row['errors']:,}",
        f"{row['prompt_tokens']:,}",
        f"{row['completion_tokens']:,}",
        f"{row['total_tokens']:,}",
        f"{row['avg_queue_ms']:,.0f} ms",
        f"{row['avg_upstream_ms']:,.0f} ms",
    ]


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M")


__all__ = ["GROUPINGS", "Period", "ReportError", "period", "render", "summarise"]
