"""Who a request comes from: client keys, checked against the hashes in the config.

A key is shown once, when ``tcproxy keys new NAME`` makes it; the config keeps only its SHA-256,
so neither the config file nor anything tcproxy writes can give a key away. A presented key is
hashed and compared with every client's hash in constant time, without stopping at a match.

With no ``clients`` configured (one person on loopback), requests need no key: whatever
Authorization a tool sends is ignored and replaced by the upstream token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

from tcproxy.config.model import ClientConfig
from tcproxy.errors import Unauthorized

KEY_PREFIX = "tcp_"
ANONYMOUS = "-"


def new_key() -> tuple[str, str]:
    """A fresh client key and its SHA-256 (what goes in the config)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key_digest(key)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(authorization: str | None) -> str | None:
    """The token of a ``Bearer`` Authorization header, if there is one."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def matching(digest: str, candidates: Mapping[str, str]) -> str | None:
    """The name whose hash equals ``digest``, comparing against all of them in constant time."""
    found = None
    for name, expected in candidates.items():
        if hmac.compare_digest(expected, digest):
            found = name
    return found


class ClientTable:
    def __init__(self, clients: Mapping[str, ClientConfig]) -> None:
        self.clients = dict(clients)
        self._digests = {name: client.key_sha256 for name, client in clients.items()}

    @property
    def required(self) -> bool:
        return bool(self.clients)

    def identify(self, authorization: str | None) -> ClientConfig | None:
        """The client a request's key belongs to; None when keys are not in use.

        Raises ``Unauthorized`` when keys are in use and the request has none or a wrong one.
        """
        if not self.clients:
            return None
        key = bearer(authorization)
        if key is None:
            raise Unauthorized(
                "missing_client_key",
                "this tcproxy needs a client key: send 'Authorization: Bearer <your tcproxy key>'"
                " (whoever runs it makes one with 'tcproxy keys new NAME')",
            )
        name = matching(key_digest(key), self._digests)
        if name is None:
            raise Unauthorized(
                "invalid_client_key",
                "the client key is not valid here (mistyped, or revoked); ask whoever runs"
                " tcproxy for a current one",
            )
        return self.clients[name]
