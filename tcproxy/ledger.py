"""The usage ledger: one SQLite row per finished request, written off the event loop.

The request path only appends a tuple to a deque. A writer thread (``batching``) commits what
piled up every half second in one transaction, in WAL mode so ``tcproxy usage`` can read while
the service writes. ``close()`` writes everything
still queued before it returns: nothing is lost on a clean shutdown. If the disk cannot keep up
and the queue fills, rows are counted as lost and an error is logged, rather than letting memory
grow or a request wait.

Rows never hold prompts, answers, headers or keys: who, which model, what status, how many
tokens, how long.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from tcproxy.batching import BatchWriter
from tcproxy.pacing.pacer import ReleaseLog
from tcproxy.quotas import day_start, month_start
from tcproxy.record import RequestRecord

log = structlog.get_logger("tcproxy.ledger")

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    ts                REAL NOT NULL,   -- unix time the request ended
    request_id        TEXT,
    client            TEXT NOT NULL,
    model             TEXT,
    method            TEXT,
    path              TEXT,
    status            INTEGER,
    error             TEXT,            -- tcproxy's error code when it answered itself
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    total_tokens      INTEGER,
    queue_ms          REAL,
    upstream_ms       REAL,
    total_ms          REAL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
PRAGMA user_version = 1;
"""

_ROWS_PER_INSERT = 256  # a power of two; 3,584 parameters, well under SQLite's 32,766
_BATCH_SECONDS = 0.5
_RECENT_SECONDS = 75.0  # a pacing window and its largest margin: all a restart must still count


@dataclass(frozen=True)
class Remembered:
    today: dict[str, int]  # tokens per client this UTC day
    this_month: dict[str, int]
    recent_releases: list[tuple[str, float, int]]  # (model, unix time went upstream, how many)


_MAX_QUEUED = 200_000

Row = tuple[Any, ...]


@functools.cache
def _insert(rows: int) -> str:
    return "INSERT INTO requests VALUES " + ",".join(["(" + ",".join("?" * 14) + ")"] * rows)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    connection = sqlite3.connect(path, timeout=10, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SCHEMA)
    return connection


def row(record: RequestRecord, ended: float) -> Row:
    usage = record.usage
    return (
        ended,
        record.request_id,
        record.client,
        record.model,
        record.method,
        record.path,
        record.status,
        record.error,
        usage.prompt_tokens if usage else None,
        usage.completion_tokens if usage else None,
        usage.total_tokens if usage else None,
        round(record.queue_s * 1000, 1),
        None if record.upstream_s is None else round(record.upstream_s * 1000, 1),
        round(record.total_s * 1000, 1),
    )


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: BatchWriter[Row] | None = None
        self._connection: sqlite3.Connection | None = None
        self.written = 0
        self.lost = 0

    def open(self) -> Remembered:
        """Create the file if needed and start the writer; return what the ledger remembers that
        the service needs again after a restart. Blocking: call it in a thread."""
        connection = self._connection = connect(self.path)
        now = time.time()
        totals = []
        for since in (day_start(now), month_start(now)):
            cursor = connection.execute(
                "SELECT client, SUM(total_tokens) FROM requests WHERE ts >= ? GROUP BY client",
                (since,),
            )
            totals.append({client: int(total or 0) for client, total in cursor})
        # When requests of the last minute went upstream: the moment a request ended less its
        # upstream time, which is when it was sent (or, if anything, a little after). Counted
        # per model in grains of a few milliseconds (the pacing's own grain), each stamped with
        # its latest time, so a busy minute comes back as thousands of rows, not millions.
        cursor = connection.execute(
            "SELECT lower(trim(model)), MAX(sent), COUNT(*) FROM ("
            "  SELECT model, ts - upstream_ms / 1000.0 AS sent FROM requests"
            "  WHERE ts >= ? AND model IS NOT NULL AND upstream_ms IS NOT NULL"
            ") GROUP BY lower(trim(model)), CAST(sent / ? AS INTEGER)",
            (now - _RECENT_SECONDS, ReleaseLog.GRAIN),
        )
        recent = [(model, float(sent), int(count)) for model, sent, count in cursor]
        self._writer = BatchWriter(
            self._commit, interval=_BATCH_SECONDS, max_pending=_MAX_QUEUED, name="tcproxy-ledger"
        )
        return Remembered(today=totals[0], this_month=totals[1], recent_releases=recent)

    def record(self, record: RequestRecord) -> None:
        """Queue a finished request (never blocks)."""
        if self._writer is None or not record.path.startswith("/v1/"):
            return
        if not self._writer.put(row(record, time.time())):
            self.lost += 1
            if self.lost == 1 or self.lost % 10_000 == 0:
                log.error("usage ledger cannot keep up; rows are being lost", lost=self.lost)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop. Blocking: call it in a thread."""
        writer, self._writer = self._writer, None
        if writer is not None and not writer.close(timeout):
            log.error("usage ledger did not finish writing in time", queued=writer.pending)
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _commit(self, batch: list[Row]) -> None:
        assert self._connection is not None
        try:
            with self._connection:
                # Many rows per statement: executemany releases and retakes the GIL for every
                # row, and each of those hand-overs steals time from the event loop. Chunks
                # are powers of two, so SQLite's statement cache holds a handful of statements.
                start = 0
                while start < len(batch):
                    size = min(_ROWS_PER_INSERT, 1 << ((len(batch) - start).bit_length() - 1))
                    rows = batch[start : start + size]
                    self._connection.execute(_insert(size), [v for r in rows for v in r])
                    start += size
            self.written += len(batch)
        except Exception as exc:  # the writer thread must outlive any one bad batch
            self.lost += len(batch)
            log.error(
                "usage ledger write failed", error=f"{type(exc).__name__}: {exc}", rows=len(batch)
            )
