"""The upstream token: where it comes from, and a type that will not print it.

Sources, first match wins:
1. ``upstream.token_file``, when the config names one;
2. the systemd credential ``$CREDENTIALS_DIRECTORY/tokencheap`` (``LoadCredential=``);
3. the environment variable named by ``upstream.token_env`` (``TOKENCHEAP_API_KEY``).

This module is the only reader of token files. The token is resolved once, at start-up and on
reload, into a ``Secret``; nothing else ever sees the string except the header builder.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from tcproxy.config.model import UpstreamConfig

CREDENTIAL_NAME = "tokencheap"


class Secret:
    """A string that prints as asterisks: in reprs, f-strings, logs and tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class TokenError(Exception):
    """No usable token; the message says where we looked and how to fix it."""


@dataclass(frozen=True, slots=True)
class ResolvedToken:
    secret: Secret
    source: str  # where it came from, for the start-up log ("environment variable X", a path)
    warnings: list[str] = field(default_factory=list)


def resolve_token(upstream: UpstreamConfig, env: Mapping[str, str] | None = None) -> ResolvedToken:
    env = os.environ if env is None else env
    if upstream.token_file:
        return _from_file(Path(upstream.token_file), "upstream.token_file")
    looked = []
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        path = Path(cred_dir) / CREDENTIAL_NAME
        if path.exists():
            return _from_file(path, "systemd credential")
        looked.append(f"systemd credential {path} (absent)")
    else:
        looked.append(
            "systemd credential $CREDENTIALS_DIRECTORY/tokencheap (not running under one)"
        )
    value = env.get(upstream.token_env)
    if value is not None:
        where = f"environment variable {upstream.token_env}"
        return ResolvedToken(_clean(value, where), where)
    looked.insert(0, f"environment variable {upstream.token_env} (not set)")
    raise TokenError(
        "no upstream token found. Looked at: "
        + "; ".join(looked)
        + f". Export {upstream.token_env}=<your TokenCheap key>, or set upstream.token_file in the"
        " config, or under systemd use LoadCredential=tokencheap:/etc/tcproxy/token."
    )


def _from_file(path: Path, what: str) -> ResolvedToken:
    where = f"{what} {path}"
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise TokenError(f"cannot read the token from {where}: {exc.strerror}") from None
    warnings = []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(
            f"token file {path} can be read by group or others (mode {stat.S_IMODE(mode):o});"
            f" run: chmod 600 {path}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenError(f"the token in {where} is not UTF-8 text") from None
    return ResolvedToken(_clean(text, where), where, warnings)


def _clean(value: str, where: str) -> Secret:
    # A trailing newline (or CRLF from an editor on another system) is never part of a key.
    token = value.strip()
    if not token:
        raise TokenError(f"the token from {where} is empty")
    if any(ch.isspace() or not ch.isprintable() or not ch.isascii() for ch in token):
        raise TokenError(
            f"the token from {where} contains spaces, control or non-ASCII characters,"
            " which cannot go in an Authorization header; check the value"
        )
    return Secret(token)
