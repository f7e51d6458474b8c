"""The usage ledger: one SQLite row per finished request, written off the event loop.

The request path only appends a tuple to a queue. A writer thread owns the SQLite connection
and commits what is queued in batches (every half second, or sooner when many are waiting), in
WAL mode so ``tcproxy usage`` can read while the service writes. ``close()`` writes everything
still queued before it returns: nothing is lost on a clean shutdown. If the disk cannot keep up
and the queue fills, rows are counted as lost and an error is logged, rather than letting memory
grow or a request wait.

Rows never hold prompts, answers, headers or keys: who, which model, what status, how many
tokens, how long.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import structlog

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

_INSERT = "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_BATCH_SECONDS = 0.5
_BATCH_ROWS = 1000
_MAX_QUEUED = 200_000

Row = tuple[Any, ...]


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
        self._queue: queue.Queue[Row | None] = queue.Queue(maxsize=_MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self.written = 0
        self.lost = 0

    def open(self) -> tuple[dict[str, int], dict[str, int]]:
        """Create the file if needed, start the writer; returns tokens used per client today
        and this month (UTC), for the budgets. Blocking: call it in a thread."""
        connection = connect(self.path)
        now = time.time()
        totals = []
        for since in (day_start(now), month_start(now)):
            cursor = connection.execute(
                "SELECT client, SUM(total_tokens) FROM requests WHERE ts >= ? GROUP BY client",
                (since,),
            )
            totals.append({client: int(total or 0) for client, total in cursor})
        self._thread = threading.Thread(
            target=self._write, args=(connection,), name="tcproxy-ledger", daemon=True
        )
        self._thread.start()
        return totals[0], totals[1]

    def record(self, record: RequestRecord) -> None:
        """Queue a finished request (never blocks)."""
        if not record.path.startswith("/v1/"):
            return
        try:
            self._queue.put_nowait(row(record, time.time()))
        except queue.Full:
            self.lost += 1
            if self.lost == 1 or self.lost % 10_000 == 0:
                log.error("usage ledger cannot keep up; rows are being lost", lost=self.lost)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop. Blocking: call it in a thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("usage ledger did not finish writing in time", queued=self._queue.qsize())
        self._thread = None

    def _write(self, connection: sqlite3.Connection) -> None:
        stop = False
        try:
            while not stop:
                batch: list[Row] = []
                deadline = time.monotonic() + _BATCH_SECONDS
                while len(batch) < _BATCH_ROWS:
                    try:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        # Whatever arrived before the stop marker is written too.
                        while True:
                            try:
                                rest = self._queue.get_nowait()
                            except queue.Empty:
                                break
                            if rest is not None:
                                batch.append(rest)
                        break
                    batch.append(item)
                if batch:
                    self._commit(connection, batch)
        finally:
            connection.close()

    def _commit(self, connection: sqlite3.Connection, batch: list[Row]) -> None:
        try:
            with connection:
                connection.executemany(_INSERT, batch)
            self.written += len(batch)
        except sqlite3.Error as exc:
            self.lost += len(batch)
            log.error("usage ledger write failed", error=str(exc), rows=len(batch))
