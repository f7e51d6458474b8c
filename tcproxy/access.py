"""Who may connect at all, and who may read the management pages.

- ``listen.allow``: client networks (CIDR) allowed to talk to tcproxy; anything else gets 403
  before its request is read. Loopback is always allowed, so local probes keep working.
- ``management.access``: who may read ``/-/status`` and ``/metrics`` (they name models, clients
  and traffic): ``local`` peers on loopback (the default), ``any`` peer, or requests bearing the
  management key. ``/-/healthy`` and ``/-/ready`` say nothing private and stay open.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

from tcproxy.clients import bearer, key_digest, matching
from tcproxy.config.model import ManagementConfig
from tcproxy.errors import Forbidden, Unauthorized

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(remote: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not remote:
        return None
    try:
        address = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(remote: str | None) -> bool:
    address = _address(remote)
    return address is not None and address.is_loopback


def check_network(request: web.BaseRequest, allow: Sequence[Network]) -> None:
    if not allow or is_loopback(request.remote):
        return
    address = _address(request.remote)
    if address is None or not any(address in network for network in allow):
        raise Forbidden(
            "network_not_allowed",
            f"connections from {request.remote} are not allowed here (listen.allow)",
        )


def check_management(request: web.BaseRequest, management: ManagementConfig) -> None:
    if management.access == "any":
        return
    if management.access == "local":
        if not is_loopback(request.remote):
            raise Forbidden(
                "management_local_only",
                "/-/status and /metrics answer only on loopback here (management.access: local)",
            )
        return
    key = bearer(request.headers.get("Authorization"))
    expected = {"management": management.key_sha256 or ""}
    if key is None or matching(key_digest(key), expected) is None:
        raise Unauthorized(
            "invalid_management_key",
            "/-/status and /metrics need the management key: send 'Authorization: Bearer <key>'",
        )
