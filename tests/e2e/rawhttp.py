"""A minimal HTTP/1.1 keep-alive client for tests that send thousands of requests.

httpx costs about a millisecond of client CPU per request here (httpcore retries a missing
`sniffio` import on every call), which would dominate a test that measures the server.
"""

from __future__ import annotations

import asyncio
from typing import Self
from urllib.parse import urlsplit


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class Pool:
    """`size` keep-alive connections; `request` waits for a free one."""

    def __init__(self, base_url: str, size: int) -> None:
        parts = urlsplit(base_url)
        self.host, self.port, self.size = parts.hostname or "127.0.0.1", parts.port or 80, size
        self.free: asyncio.Queue[Connection] = asyncio.Queue()
        self.all: list[Connection] = []

    async def __aenter__(self) -> Self:
        for _ in range(self.size):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            connection = Connection(reader, writer, f"{self.host}:{self.port}")
            self.all.append(connection)
            self.free.put_nowait(connection)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for connection in self.all:
            connection.close()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        connection = await self.free.get()
        try:
            return await connection.request(method, path, body)
        finally:
            self.free.put_nowait(connection)
