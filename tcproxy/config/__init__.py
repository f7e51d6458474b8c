"""Configuration: typed values (``model``), the YAML loader (``loader``), the token (``token``)."""

from tcproxy.config.loader import (
    ConfigInvalid,
    ConfigProblem,
    load_config,
    parse_config,
    parse_listen,
)
from tcproxy.config.model import (
    Config,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    ModelLimit,
    ServerConfig,
    UpstreamConfig,
)
from tcproxy.config.token import ResolvedToken, Secret, TokenError, resolve_token

__all__ = [
    "Config",
    "ConfigInvalid",
    "ConfigProblem",
    "LimitsConfig",
    "ListenConfig",
    "LogConfig",
    "ModelLimit",
    "ResolvedToken",
    "Secret",
    "ServerConfig",
    "TokenError",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "parse_listen",
    "resolve_token",
]
