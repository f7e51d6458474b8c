"""YAML in, ``Config`` out — or every problem found, each with its key path and line.

This is the only module that reads YAML. It never stops at the first problem: a user running
``tcproxy check-config`` sees all of them at once.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from tcproxy.config.model import (
    BreakerConfig,
    ClientConfig,
    Config,
    LedgerConfig,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    ManagementConfig,
    MiB,
    ModelLimit,
    ServerConfig,
    TLSConfig,
    UpstreamConfig,
    exposure_problem,
)

T = TypeVar("T")
KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"


class ConfigInvalid(Exception):
    """The config could not be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = sorted(problems, key=lambda p: p.line or 0)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(f"{self.source}: {p}" for p in self.problems)


class _Invalid(Exception):
    """Raised by a check; the reader records it against the key being read."""


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigInvalid(
            str(path), [ConfigProblem("", f"cannot read: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError:
        raise ConfigInvalid(str(path), [ConfigProblem("", "is not UTF-8 text")]) from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate YAML text. Raises ``ConfigInvalid`` listing every problem found."""
    reader = _Reader()
    tree = reader.parse(text)
    config = reader.build(tree) if not reader.problems else None
    if reader.problems or config is None:
        raise ConfigInvalid(source, reader.problems)
    return config


def parse_listen(text: str, source: str = "--listen") -> ListenConfig:
    """A HOST:PORT given on the command line, checked like the config key."""
    try:
        return _listen(text)
    except _Invalid as exc:
        raise ConfigInvalid(source, [ConfigProblem("", str(exc))]) from None


class _Reader:
    def __init__(self) -> None:
        self.problems: list[ConfigProblem] = []
        self._lines: dict[KeyPath, int] = {}

    # -- YAML to plain values, remembering the line of every key --------------------------

    def parse(self, text: str) -> Any:
        loader: yaml.SafeLoader | None = None
        try:
            loader = yaml.SafeLoader(text)
            node = loader.get_single_node()
            return self._plain(loader, node, ()) if node is not None else {}
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            self.problems.append(ConfigProblem("", f"not valid YAML: {exc.problem}", line))
        except yaml.reader.ReaderError as exc:
            self.problems.append(
                ConfigProblem("", f"not valid YAML: character #x{exc.character:04x} is not allowed")
            )
        except yaml.YAMLError as exc:
            self.problems.append(ConfigProblem("", f"not valid YAML: {exc}"))
        except RecursionError:
            self.problems.append(ConfigProblem("", "not valid YAML: nested too deeply"))
        finally:
            if loader is not None:
                loader.dispose()
        return None

    def _plain(self, loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath) -> Any:
        self._lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    self._add(path, f"keys must be text, got {key!r}", line)
                    continue
                if key in result:
                    self._add((*path, key), "appears twice; keep one", line)
                    continue
                self._lines[(*path, key)] = line
                result[key] = self._plain(loader, value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._plain(loader, item, (*path, i)) for i, item in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    # -- recording problems ---------------------------------------------------------------

    def _add(self, path: KeyPath, message: str, line: int | None = None) -> None:
        if line is None:
            line = self._line_of(path)
        self.problems.append(ConfigProblem(_dotted(path), message, line))

    def _line_of(self, path: KeyPath) -> int | None:
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None

    # -- reading sections -----------------------------------------------------------------

    def section(self, tree: Any, path: KeyPath, known: set[str]) -> dict[str, Any]:
        """The mapping at ``path`` (empty if absent), with unknown keys reported."""
        if tree is None:
            return {}
        if not isinstance(tree, dict):
            self._add(path, f"must be a mapping of keys, got {_kind(tree)}")
            return {}
        for key in sorted(set(tree) - known):
            hint = _closest(key, known)
            self._add((*path, key), "unknown key" + (f"; did you mean '{hint}'?" if hint else ""))
        return tree

    def take(
        self,
        mapping: dict[str, Any],
        path: KeyPath,
        key: str,
        check: Callable[[Any], T],
        default: T,
    ) -> T:
        if key not in mapping:
            return default
        try:
            return check(mapping[key])
        except _Invalid as exc:
            self._add((*path, key), str(exc))
            return default

    # -- the schema -----------------------------------------------------------------------

    def build(self, tree: Any) -> Config | None:
        known = {"listen", "upstream", "limits", "server", "log", "clients", "management", "ledger"}
        top = self.section(tree, (), known)
        defaults = Config()
        listen = (
            self._listen(top.get("listen"), defaults.listen) if "listen" in top else defaults.listen
        )
        upstream = self._upstream(top.get("upstream"), defaults.upstream)
        limits = self._limits(top.get("limits"), defaults.limits)
        server = self._server(top.get("server"), defaults.server)
        log = self._log(top.get("log"), defaults.log)
        clients = self._clients(top.get("clients"))
        management = self._management(top.get("management"), defaults.management)
        ledger = self._ledger(top.get("ledger"), defaults.ledger)
        if self.problems:
            return None
        config = Config(
            listen=listen,
            upstream=upstream,
            limits=limits,
            server=server,
            log=log,
            clients=MappingProxyType(clients),
            management=management,
            ledger=ledger,
        )
        problem = exposure_problem(config)
        if problem:
            self._add(("listen",), problem)
            return None
        return config

    def _listen(self, tree: Any, d: ListenConfig) -> ListenConfig:
        p: KeyPath = ("listen",)
        if not isinstance(tree, dict):
            return self.take({"listen": tree}, (), "listen", _listen, d)
        s = self.section(tree, p, {"address", "tls", "allow"})
        if "address" not in s:
            self._add(p, "needs 'address' (HOST:PORT), e.g. address: 0.0.0.0:8787")
        address = self.take(s, p, "address", _listen, d)
        tls = None
        if "tls" in s:
            t = self.section(s["tls"], (*p, "tls"), {"cert", "key"})
            for key in ("cert", "key"):
                if key not in t:
                    self._add((*p, "tls"), f"needs '{key}' (a PEM file)")
            cert = self.take(t, (*p, "tls"), "cert", _readable_file, "")
            key = self.take(t, (*p, "tls"), "key", _readable_file, "")
            if cert and key:
                tls = TLSConfig(cert=cert, key=key)
        allow = self.take(s, p, "allow", _networks, d.allow)
        return ListenConfig(host=address.host, port=address.port, tls=tls, allow=allow)

    def _clients(self, tree: Any) -> dict[str, ClientConfig]:
        p: KeyPath = ("clients",)
        if tree is None:
            return {}
        if not isinstance(tree, dict):
            self._add(p, f"must map client names to their settings, got {_kind(tree)}")
            return {}
        clients: dict[str, ClientConfig] = {}
        seen: dict[str, str] = {}
        for name, value in tree.items():
            path = (*p, name)
            if not _CLIENT_NAME.fullmatch(name):
                self._add(path, "client names are 1-64 letters, digits, '.', '_' or '-'")
                continue
            s = self.section(
                value, path, {"key_sha256", "rpm", "tokens_per_day", "tokens_per_month"}
            )
            if "key_sha256" not in s:
                self._add(path, "needs 'key_sha256' (tcproxy keys new NAME prints it)")
                continue
            before = len(self.problems)
            digest = self.take(s, path, "key_sha256", _sha256, "")
            if digest in seen:
                self._add((*path, "key_sha256"), f"is the same key as client '{seen[digest]}'")
            seen[digest] = name
            client = ClientConfig(
                name=name,
                key_sha256=digest,
                rpm=self.take(s, path, "rpm", _optional(_rpm), None),
                tokens_per_day=self.take(s, path, "tokens_per_day", _optional(_positive_int), None),
                tokens_per_month=self.take(
                    s, path, "tokens_per_month", _optional(_positive_int), None
                ),
            )
            if len(self.problems) == before:
                clients[name] = client
        return clients

    def _management(self, tree: Any, d: ManagementConfig) -> ManagementConfig:
        p: KeyPath = ("management",)
        s = self.section(tree, p, {"access", "key_sha256"})
        access = self.take(s, p, "access", _choice("local", "any", "key"), d.access)
        digest = self.take(s, p, "key_sha256", _optional(_sha256), d.key_sha256)
        if access == "key" and digest is None:
            self._add((*p, "access"), "is 'key' but management.key_sha256 is not set")
        return ManagementConfig(access=access, key_sha256=digest)

    def _ledger(self, tree: Any, d: LedgerConfig) -> LedgerConfig:
        p: KeyPath = ("ledger",)
        if tree is False:
            return LedgerConfig(enabled=False)
        s = self.section(tree, p, {"enabled", "path"})
        return LedgerConfig(
            enabled=self.take(s, p, "enabled", _bool, d.enabled),
            path=self.take(s, p, "path", _optional(_nonempty_text), d.path),
        )

    def _upstream(self, tree: Any, d: UpstreamConfig) -> UpstreamConfig:
        p: KeyPath = ("upstream",)
        s = self.section(
            tree,
            p,
            {
                "base_url",
                "token_env",
                "token_file",
                "connect_timeout",
                "read_timeout",
                "max_response_size",
                "circuit_breaker",
            },
        )
        b = self.section(
            s.get("circuit_breaker"), (*p, "circuit_breaker"), {"failures", "cooldown"}
        )
        bp: KeyPath = (*p, "circuit_breaker")
        breaker = BreakerConfig(
            failures=self.take(b, bp, "failures", _count, d.circuit_breaker.failures),
            cooldown=self.take(b, bp, "cooldown", _seconds, d.circuit_breaker.cooldown),
        )
        return UpstreamConfig(
            base_url=self.take(s, p, "base_url", _base_url, d.base_url),
            token_env=self.take(s, p, "token_env", _env_name, d.token_env),
            token_file=self.take(s, p, "token_file", _optional(_nonempty_text), d.token_file),
            connect_timeout=self.take(s, p, "connect_timeout", _seconds, d.connect_timeout),
            read_timeout=self.take(s, p, "read_timeout", _seconds, d.read_timeout),
            max_response_size=self.take(s, p, "max_response_size", _size, d.max_response_size),
            circuit_breaker=breaker,
        )

    def _limits(self, tree: Any, d: LimitsConfig) -> LimitsConfig:
        p: KeyPath = ("limits",)
        s = self.section(
            tree,
            p,
            {
                "default",
                "models",
                "queue_timeout",
                "max_queue",
                "safety_margin",
                "max_retries",
                "backend",
                "redis_prefix",
                "redis_timeout",
                "instances",
                "redis_fallback_share",
            },
        )
        models = dict(d.models)
        if "models" in s:
            given = s["models"] or {}
            if not isinstance(given, dict):
                self._add((*p, "models"), f"must map model names to limits, got {_kind(given)}")
                given = {}
            models = {}
            for name, value in given.items():
                limit = self._model_limit(value, (*p, "models", name))
                key = name.strip().lower()  # as the pacing matches names (pacing.model_key)
                if key in models:
                    self._add((*p, "models", name), f"is the same model as '{key}' (case aside)")
                elif limit is not None:
                    models[key] = limit
        default = d.default
        if "default" in s:
            default = self._model_limit(s["default"], (*p, "default")) or d.default
        return LimitsConfig(
            default=default,
            models=MappingProxyType(models),
            queue_timeout=self.take(s, p, "queue_timeout", _seconds, d.queue_timeout),
            max_queue=self.take(s, p, "max_queue", _positive_int, d.max_queue),
            safety_margin=self.take(s, p, "safety_margin", _margin, d.safety_margin),
            max_retries=self.take(s, p, "max_retries", _count, d.max_retries),
            backend=self.take(s, p, "backend", _backend, d.backend),
            redis_prefix=self.take(s, p, "redis_prefix", _prefix, d.redis_prefix),
            redis_timeout=self.take(s, p, "redis_timeout", _seconds, d.redis_timeout),
            instances=self.take(s, p, "instances", _positive_int, d.instances),
            redis_fallback_share=self.take(
                s, p, "redis_fallback_share", _optional(_share), d.redis_fallback_share
            ),
        )

    def _model_limit(self, tree: Any, path: KeyPath) -> ModelLimit | None:
        if isinstance(tree, int) and not isinstance(tree, bool):
            tree = {"rpm": tree}  # `gpt-4: 500` is read as `gpt-4: {rpm: 500}`
        if not isinstance(tree, dict):
            self._add(path, f"must be {{rpm: N}} (optionally with burst), got {_kind(tree)}")
            return None
        s = self.section(tree, path, {"rpm", "burst"})
        before = len(self.problems)
        if "rpm" not in s:
            self._add(path, "needs 'rpm' (requests per minute the upstream allows)")
        rpm = self.take(s, path, "rpm", _rpm, 0)
        burst = self.take(s, path, "burst", _optional(_burst), None)
        if len(self.problems) > before:
            return None
        return ModelLimit(rpm=rpm, burst=burst)

    def _server(self, tree: Any, d: ServerConfig) -> ServerConfig:
        p: KeyPath = ("server",)
        s = self.section(
            tree, p, {"max_body_size", "body_timeout", "keepalive_timeout", "shutdown_timeout"}
        )
        return ServerConfig(
            max_body_size=self.take(s, p, "max_body_size", _size, d.max_body_size),
            body_timeout=self.take(s, p, "body_timeout", _seconds, d.body_timeout),
            keepalive_timeout=self.take(s, p, "keepalive_timeout", _seconds, d.keepalive_timeout),
            shutdown_timeout=self.take(s, p, "shutdown_timeout", _seconds, d.shutdown_timeout),
        )

    def _log(self, tree: Any, d: LogConfig) -> LogConfig:
        p: KeyPath = ("log",)
        s = self.section(tree, p, {"level", "format"})
        return LogConfig(
            level=self.take(s, p, "level", _choice("debug", "info", "warning", "error"), d.level),
            format=self.take(s, p, "format", _choice("auto", "json", "console"), d.format),
        )


# -- checks: each returns the clean value or raises _Invalid with what to fix -------------------


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    names = {bool: "true/false", int: "a number", float: "a number", str: "text"}
    names.update({list: "a list", dict: "a mapping"})
    return names.get(type(value), type(value).__name__)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise _Invalid("must be a finite number")
    return float(value)


def _seconds(value: Any) -> float:
    seconds = _number(value)
    if seconds <= 0:
        raise _Invalid(f"must be a number of seconds above 0, got {value}")
    return seconds


def _margin(value: Any) -> float:
    seconds = _number(value)
    if not 0 <= seconds <= 10:
        raise _Invalid(f"must be between 0 and 10 seconds, got {value}")
    return seconds


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be a whole number, got {_kind(value)}")
    return value


def _positive_int(value: Any) -> int:
    number = _integer(value)
    if number < 1:
        raise _Invalid(f"must be 1 or more, got {number}")
    return number


def _count(value: Any) -> int:
    number = _integer(value)
    if number < 0:
        raise _Invalid(f"must be 0 or more, got {number}")
    return number


def _rpm(value: Any) -> int:
    rpm = _integer(value)
    if not 1 <= rpm <= 10_000_000:
        raise _Invalid(f"must be a whole number of requests per minute from 1 up, got {rpm}")
    return rpm


def _burst(value: Any) -> float:
    burst = _number(value)
    if burst < 1:
        raise _Invalid(f"must be 1 or more (requests at once), got {value}")
    return burst


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": MiB, "gb": 1000**3, "gib": 1024**3}


def _size(value: Any) -> int:
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise _Invalid(f"must be a size like 32MiB or a number of bytes, got {value!r}")
        size = int(float(match[1]) * _UNITS[(match[2] or "b").lower()])
    else:
        size = _integer(value)
    if not 1024 <= size <= 4 * 1024**3:
        raise _Invalid(f"must be between 1KiB and 4GiB, got {value}")
    return size


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be text, got {_kind(value)}")
    return value


def _nonempty_text(value: Any) -> str:
    text = _text(value).strip()
    if not text:
        raise _Invalid("must not be empty")
    return text


def _optional(check: Callable[[Any], T]) -> Callable[[Any], T | None]:
    def optional(value: Any) -> T | None:
        return None if value is None else check(value)

    return optional


def _choice(*choices: str) -> Callable[[Any], str]:
    def choice(value: Any) -> str:
        text = _text(value).lower()
        if text not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}; got {value!r}")
        return text

    return choice


def _env_name(value: Any) -> str:
    name = _text(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise _Invalid(
            f"must be an environment variable name like TOKENCHEAP_API_KEY, got {name!r}"
        )
    return name


def _base_url(value: Any) -> str:
    url = _text(value).strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _Invalid(f"is not a URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(f"must be an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise _Invalid("must not carry a query, fragment or credentials (the token is injected)")
    return url.rstrip("/")


_CLIENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _backend(value: Any) -> str:
    text = _text(value).strip()
    if text == "memory":
        return text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _Invalid("is not a URL") from None  # never echo it: it may hold a password
    if parts.scheme in ("redis", "rediss") and parts.hostname:
        if parts.path not in ("", "/") and not parts.path.strip("/").isdigit():
            raise _Invalid("the path of a redis:// URL is the database number, e.g. /0")
        return text
    if parts.scheme == "unix" and parts.path:
        return text
    raise _Invalid("must be 'memory' or a Redis URL like redis://127.0.0.1:6379/0")


def _prefix(value: Any) -> str:
    text = _text(value)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text):
        raise _Invalid("must be 1-64 letters, digits or . _ : -")
    return text


def _share(value: Any) -> float:
    share = _number(value)
    if not 0 < share <= 1:
        raise _Invalid(f"must be a fraction above 0 and at most 1, got {value}")
    return share


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_kind(value)}")
    return value


def _sha256(value: Any) -> str:
    digest = _text(value).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise _Invalid(
            "must be the 64 hex digits of a key's SHA-256 (tcproxy keys new NAME prints it);"
            " never the key itself"
        )
    return digest


def _readable_file(value: Any) -> str:
    path = _nonempty_text(value)
    if not Path(path).is_file():
        raise _Invalid(f"{path} is not a file that exists")
    return path


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of networks like 192.168.1.0/24, got {_kind(value)}")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(_text(item).strip(), strict=False))
        except ValueError:
            raise _Invalid(f"{item!r} is not a network like 192.168.1.0/24 or 10.0.0.5") from None
    return tuple(networks)


def _listen(value: Any) -> ListenConfig:
    text = _text(value).strip()
    match = re.fullmatch(
        r"(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\s]+)):(?P<port>\d{1,5})", text
    )
    if not match:
        raise _Invalid(f"must be HOST:PORT, like 127.0.0.1:8787 or [::1]:8787; got {text!r}")
    port = int(match["port"])
    if port > 65535:
        raise _Invalid(f"port must be 0-65535, got {port}")
    return ListenConfig(host=match["v6"] or match["host"], port=port)


def _dotted(path: KeyPath) -> str:
    return ".".join(str(part) for part in path)


def _closest(key: str, known: set[str]) -> str | None:
    matches = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
    return matches[0] if matches else None
