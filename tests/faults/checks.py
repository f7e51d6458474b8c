"""Assertions the fault tests share."""

from __future__ import annotations

from typing import Any


async def expect_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """A tcproxy error: the status, the code in the header and the body, a message to act on."""
    assert response.status == status, await response.text()
    assert response.headers["X-TCProxy-Error"] == code
    body: dict[str, Any] = await response.json()
    assert body["error"]["code"] == code
    assert body["error"]["type"]
    assert len(body["error"]["message"]) > 20  # says what to fix
    return body
