"""Talking raw HTTP/1.1 over a socket, for requests no well-behaved client library would send."""

from __future__ import annotations

import asyncio

# Every response read here, for the secret search at the end of each test.
RECEIVED: list[str] = []


async def raw_request(
    port: int, head: str, body: bytes = b"", *, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (request line and headers, ending in a blank line) and ``body``.

    Returns (status, lower-cased headers, body) of the first response; the connection is closed.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await read_response(reader)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed without a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        if not line:
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    else:
        body = await reader.read()
    RECEIVED.append(f"{status} {headers} {body.decode('utf-8', 'replace')}")
    return status, headers, body
