"""The configuration as typed, immutable values.

Everything that decides what a config *means* lives here; reading YAML lives in ``loader``.
Defaults here are the defaults a user gets for a key they leave out, and the ones
``config.example.yaml`` documents.

    >>> cfg = Config()
    >>> cfg.limits.for_model("gpt-4").rpm
    500
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

MiB = 1024 * 1024

# The upstream's documented limits (tokencheap-api.md, "Rate limits").
DOCUMENTED_RPM: Mapping[str, int] = MappingProxyType(
    {"gpt-4": 500, "gpt-3.5-turbo": 3500, "claude-2": 500}
)


@dataclass(frozen=True, slots=True)
class ModelLimit:
    """How fast requests for one model may leave for the upstream.

    ``burst`` is how many requests may go at once after an idle spell. Left unset, it is the
    largest burst that still fits a per-second bucket of ``rpm/60`` (the strictest way the
    upstream might count), less the safety margin; see ``tcproxy.pacing.pacer``.
    """

    rpm: int
    burst: float | None = None


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8787
    tls: TLSConfig | None = None
    # Client networks allowed to connect; empty: any. Loopback is always allowed (probes).
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """After ``failures`` upstream failures in a row (5xx answers, connections that fail) for a
    model, its requests fail fast with 503 for ``cooldown`` seconds; then one is let through to
    try again. ``failures: 0`` turns this off."""

    failures: int = 5
    cooldown: float = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str = "https://api.tokencheap.com"
    token_env: str = "TOKENCHEAP_API_KEY"
    token_file: str | None = None
    connect_timeout: float = 10.0
    # Longest silence allowed while waiting for the upstream's next bytes. There is no total
    # timeout: a stream may legitimately run for many minutes.
    read_timeout: float = 600.0
    # A non-streamed answer larger than this is cut off (streams are not capped).
    max_response_size: int = 64 * MiB
    circuit_breaker: BreakerConfig = BreakerConfig()


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    default: ModelLimit = ModelLimit(rpm=500)
    models: Mapping[str, ModelLimit] = field(
        default_factory=lambda: MappingProxyType(
            {name: ModelLimit(rpm) for name, rpm in DOCUMENTED_RPM.items()}
        )
    )
    queue_timeout: float = 600.0
    max_queue: int = 10_000
    # Seconds of arrival jitter (network, connection set-up) the pacing leaves room for.
    safety_margin: float = 0.25
    max_retries: int = 5
    # "memory", or redis://[:password@]host:port/db to share the limits with other instances.
    # Left out of repr: the URL may carry a password.
    backend: str = field(default="memory", repr=False)
    redis_prefix: str = "tcproxy"
    redis_timeout: float = 0.5
    instances: int = 1  # how many tcproxy instances share the key (for the fallback share)
    redis_fallback_share: float | None = None  # None: 1/instances

    def for_model(self, model: str) -> ModelLimit:
        return self.models.get(model, self.default)

    @property
    def fallback_share(self) -> float:
        """The share of each rpm an instance uses alone while Redis does not answer."""
        if self.redis_fallback_share is not None:
            return self.redis_fallback_share
        return 1.0 / self.instances


@dataclass(frozen=True, slots=True)
class ServerConfig:
    max_body_size: int = 32 * MiB
    # A body that has not fully arrived this many seconds after its headers gets 408.
    body_timeout: float = 60.0
    # Idle keep-alive connections, and connections whose headers never complete, close after this.
    keepalive_timeout: float = 75.0
    shutdown_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto: console on a terminal, JSON lines otherwise


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A teammate: their key (stored as a hash only) and optional caps.

    ``tokens_per_day`` and ``tokens_per_month`` count the upstream's reported usage per UTC
    calendar day and month.
    """

    name: str
    key_sha256: str
    rpm: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None


@dataclass(frozen=True, slots=True)
class ManagementConfig:
    # Who may read /-/status and /metrics: "local" (peers on loopback), "any", or "key" (a
    # request bearing the key whose hash is key_sha256). /-/healthy and /-/ready stay open.
    access: str = "local"
    key_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    enabled: bool = True
    # None: usage.db under $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/tcproxy or
    # ~/.local/state/tcproxy.
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig = ListenConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    server: ServerConfig = ServerConfig()
    log: LogConfig = LogConfig()
    clients: Mapping[str, ClientConfig] = field(default_factory=lambda: MappingProxyType({}))
    management: ManagementConfig = ManagementConfig()
    ledger: LedgerConfig = LedgerConfig()


def exposure_problem(config: Config) -> str | None:
    """Why this config must not run: reachable from the network with no client keys.

    Checked when a file is loaded, and again on whatever finally runs (command-line overrides,
    a reload that keeps a restart-only ``listen``), so no path leads to an open proxy.
    """
    if config.listen.is_loopback or config.clients:
        return None
    return (
        f"{config.listen} is reachable from the network, and without client keys anyone who can"
        " reach it could spend the TokenCheap balance; listen on 127.0.0.1, or add client keys"
        " (tcproxy keys new NAME prints one and the config lines)"
    )
