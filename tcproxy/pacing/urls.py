"""Redis URLs carry passwords (in the user part or as ``?password=``): mask them, list them."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

_SECRET_PARAM = re.compile(r"(?i)([?&](?:password|username)=)[^&#]*")


def masked(url: str) -> str:
    """The URL with every password replaced by ****, fit for logs and /-/status."""
    parts = urlsplit(url)
    if parts.password is not None:
        url = url.replace(f":{parts.password}@", ":****@", 1)
    return _SECRET_PARAM.sub(r"\1****", url)


def url_passwords(url: str) -> list[str]:
    """Every password a URL holds, so the log mask can learn them."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    return found
