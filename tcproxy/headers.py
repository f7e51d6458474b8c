"""Which headers cross the proxy, both ways. Pure functions: no I/O, no config.

Hop-by-hop headers (RFC 9110 §7.6.1) and any header a ``Connection`` header names describe one
connection, not the message, and are dropped in both directions. Towards the upstream the
client's credentials are replaced by the stored token; nothing else about auth lives here.
"""

from __future__ import annotations

import functools

from multidict import CIMultiDict, CIMultiDictProxy, istr

HOP_BY_HOP = frozenset(
    istr(name)
    for name in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)

# Set by the client library for the hop to the upstream, never copied from the client.
_REQUEST_OWN = frozenset(
    istr(name) for name in ("Host", "Content-Length", "Expect", "Authorization", "Accept-Encoding")
)

# Encodings the proxy can read to find the `usage` of a response while relaying it unchanged.
READABLE_ENCODINGS = ("gzip", "deflate")


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[istr]:
    tokens: set[istr] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(istr(token.strip()) for token in value.split(",") if token.strip())
    return tokens


_DROP_TOWARDS_UPSTREAM = HOP_BY_HOP | _REQUEST_OWN


def _copy_end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: frozenset[istr]
) -> CIMultiDict[str]:
    if "Connection" in headers:  # rare with HTTP/1.1 clients: the names it lists go too
        drop = drop | _connection_tokens(headers)
    return CIMultiDict([(name, value) for name, value in headers.items() if name not in drop])


def to_upstream(
    headers: CIMultiDictProxy[str], authorization: str, request_id: str, has_body: bool
) -> CIMultiDict[str]:
    """Headers for the upstream request: the client's end-to-end ones, our token, our request id.

    Accept-Encoding and a body's Content-Type are always set here, so the client library never
    adds defaults of its own (gzip a client did not ask for; octet-stream for a JSON body).
    """
    out = _copy_end_to_end(headers, _DROP_TOWARDS_UPSTREAM)
    out["Authorization"] = authorization
    out["X-Request-Id"] = request_id
    out["Accept-Encoding"] = accept_encoding(headers.get("Accept-Encoding", "")) or "identity"
    if has_body and "Content-Type" not in out:
        out["Content-Type"] = "application/json"  # a body that reached here parsed as JSON
    return out


def from_upstream(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Headers relayed to the client: the end-to-end ones.

    Content-Length stays: the body is relayed byte for byte, encoding included, so the length
    the upstream announced is the length the client receives.
    """
    return _copy_end_to_end(headers, HOP_BY_HOP)


@functools.lru_cache(maxsize=256)  # clients send the same few values again and again
def accept_encoding(client_value: str) -> str:
    """The client's Accept-Encoding narrowed to encodings we can read for usage accounting.

    The response bytes are relayed unchanged with their Content-Encoding; narrowing only stops
    the upstream from choosing an encoding (br, zstd) we could not look into. A client that asked
    for nothing gets nothing: the client library would otherwise add its own default.
    """
    wanted: list[str] = []
    for item in client_value.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        name = name.lower()
        if name not in READABLE_ENCODINGS or name in wanted:
            continue
        refused = False
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    refused = float(value) <= 0
                except ValueError:
                    refused = True
        if not refused:
            wanted.append(name)
    return ", ".join(wanted)
