"""Logging: structlog configured once, lines written off the event loop.

- JSON lines when the output is not a terminal, readable colourless-or-coloured console lines on
  one; under journald (``JOURNAL_STREAM`` set) JSON without our own timestamp (journald stamps
  every line) and with a ``<N>`` syslog priority prefix, so ``journalctl -p err`` works.
- Lines are handed to a writer thread through a bounded queue: a stdout pipe that is full, or a
  disk that is full, never stalls a request. Lines that cannot be queued or written are counted,
  and the count is reported once the sink recovers.
- Every rendered line passes a last filter that masks registered secrets, so even a bug that puts
  the upstream token into an event cannot print it.
- The level can change at run time (reload) without rebuilding loggers.

This module knows nothing about HTTP; it is configured by the CLI and used everywhere through
``structlog.get_logger()``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog

from tcproxy.batching import BatchWriter

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
MASK = "**********"


class LineSink:
    """Writes lines to a stream from a thread, in batches; ``write`` never blocks."""

    def __init__(self, stream: TextIO, max_pending: int = 20_000) -> None:
        self._stream = stream
        self.dropped = 0  # lines refused because too many waited (the stream is stuck)
        self.failed = 0  # lines whose write raised (disk full, closed pipe)
        self.lost = 0  # both, since start
        self._writer: BatchWriter[str] = BatchWriter(
            self._write, interval=0.05, max_pending=max_pending, name="tcproxy-log"
        )

    def write(self, line: str) -> None:
        if not self._writer.put(line):
            self.dropped += 1
            self.lost += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every line so far was written (or failed). False if that took too long."""
        return self._writer.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then end the writer thread."""
        self._writer.close(timeout)

    def _write(self, lines: list[str]) -> None:
        if self.dropped or self.failed:
            lines.insert(0, self._loss_report())
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            self.failed += len(lines)
            self.lost += len(lines)

    def _loss_report(self) -> str:
        report = {
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "level": "error",
            "event": "log lines lost",
            "dropped": self.dropped,
            "failed": self.failed,
        }
        self.dropped = self.failed = 0
        return orjson.dumps(report).decode()


class _SinkLogger:
    """The structlog 'logger' at the end of the chain: hands the rendered line to the sink."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write(message)

    debug = info = warning = warn = error = err = critical = exception = fatal = msg


_active_filter: LevelFilter | None = None


def enabled(level: str) -> bool:
    """Would an event at ``level`` be written? Lets a caller skip building one that would not."""
    return _active_filter is None or LEVELS[level] >= _active_filter.threshold


class LevelFilter:
    """Drops events below a level that can change at run time."""

    def __init__(self, level: str) -> None:
        self.threshold = LEVELS[level]

    def set_level(self, level: str) -> None:
        self.threshold = LEVELS[level]

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if LEVELS.get(_level_name(method_name), 20) < self.threshold:
            raise structlog.DropEvent
        return event_dict


class SecretMask:
    """Masks registered secrets in the rendered line: the last line of defence, not the first."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def add(self, secret: str) -> None:
        # As written, and as it appears inside a JSON string (quotes and backslashes escaped).
        for form in (secret, orjson.dumps(secret).decode()[1:-1]):
            if form and form not in self._secrets:
                # Longest first, so a secret that contains another is masked whole.
                self._secrets = tuple(sorted((*self._secrets, form), key=len, reverse=True))

    def __call__(self, logger: Any, method_name: str, line: str) -> str:
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, MASK)
        return line


class _Timestamp:
    """``timestamp`` as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it, with the part
    up to the second formatted once a second rather than for every line."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")  # one attribute: threads log too

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second, prefix = self._second
        if int(now) != second:
            second = int(now)
            prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._second = (second, prefix)
        event_dict["timestamp"] = f"{prefix}{int((now - second) * 1e6):06d}Z"
        return event_dict


def _render_json(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
    """One JSON line, with the fields a reader scans for first. orjson: rendering every request's
    line with the standard library cost more than the rest of the logging (bench/perf.py)."""
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    head.update(event_dict)
    return orjson.dumps(head, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class _SyslogPrefix:
    def __call__(self, logger: Any, method_name: str, line: str) -> str:
        return f"<{_SYSLOG_PRIORITY.get(_level_name(method_name), 6)}>{line}"


def _level_name(method_name: str) -> str:
    return {"warn": "warning", "err": "error", "exception": "error", "fatal": "critical"}.get(
        method_name, method_name
    )


class LogControl:
    """What the running service can still change about logging: level, secrets, flushing."""

    def __init__(self, sink: LineSink, level: LevelFilter, secrets: SecretMask) -> None:
        self.sink = sink
        self._level = level
        self._secrets = secrets

    def set_level(self, level: str) -> None:
        self._level.set_level(level)
        logging.getLogger().setLevel(LEVELS[level])

    def add_secret(self, secret: str) -> None:
        self._secrets.add(secret)

    def flush(self, timeout: float = 5.0) -> bool:
        return self.sink.flush(timeout)

    def close(self) -> None:
        self.sink.close()


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> LogControl:
    """Configure structlog (and route the standard library's logging into it)."""
    stream = sys.stdout if stream is None else stream
    env = os.environ if env is None else env
    journald = bool(env.get("JOURNAL_STREAM")) and fmt == "auto"
    if fmt == "auto":
        fmt = "console" if _isatty(stream) and not journald else "json"
    global _active_filter
    sink = LineSink(stream)
    level_filter = _active_filter = LevelFilter(level)
    secrets = SecretMask()
    processors: list[Any] = [level_filter, structlog.processors.add_log_level]
    if not journald:
        processors.append(_Timestamp())
    if fmt == "json":
        # Tracebacks as data, without frame locals: a local can hold a header with the token.
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        processors += [tracebacks, _render_json]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=_isatty(stream)))
    processors.append(secrets)
    if journald:
        processors.append(_SyslogPrefix())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.BoundLogger,
        logger_factory=lambda *args: _SinkLogger(sink),
        cache_logger_on_first_use=True,
    )
    _route_stdlib_logging(LEVELS[level])
    return LogControl(sink, level_filter, secrets)


class _ToStructlog(logging.Handler):
    """Sends records of the standard library's loggers (asyncio, aiohttp) through structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(record.name)
            name = logging.getLevelName(record.levelno).lower()
            method = getattr(logger, name if name in LEVELS else "info")
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            method(record.getMessage(), **fields)
        except Exception:  # a broken log record must never take the service down
            self.handleError(record)


def _route_stdlib_logging(level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ToStructlog):
            root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    root.setLevel(level)
    # aiohttp's own access log is replaced by our one line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
