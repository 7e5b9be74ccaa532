"""A minimal asyncio upstream for machines without nginx: `python -m bench.upstream`.

Serves the same three things as the nginx upstream: the JSON body, the download file, and
PUT uploads written to `<dir>/uploads/<path>` (HTTP/1.1 keep-alive, Content-Length or chunked).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from bench.nginx import DOWNLOAD_PATH, JSON_PATH, UPLOAD_PREFIX

CHUNK = 64 * 1024


class Upstream:
    """One listening socket's request handling."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.json_body = (data_dir / "export-jobs.json").read_bytes()
        self.download = data_dir / "download.bin"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        path = target.partition("?")[0]
        if method == "GET" and path == JSON_PATH:
            await _answer(writer, 200, self.json_body, "application/json")
        elif method == "GET" and path == DOWNLOAD_PATH:
            size = self.download.stat().st_size
            writer.write(_head(200, size, "application/octet-stream"))
            with self.download.open("rb") as source:
                while chunk := source.read(CHUNK):
                    writer.write(chunk)
                    await writer.drain()
        elif method == "PUT" and path.startswith(UPLOAD_PREFIX) and ".." not in path:
            target_file = self.data_dir / "uploads" / path.lstrip("/")
            target_file.parent.mkdir(parents=True, exist_ok=True)
            with target_file.open("wb") as sink:
                async for chunk in _body(reader, headers):
                    sink.write(chunk)
            await _answer(writer, 201, b"", "text/plain")
        else:
            async for _ in _body(reader, headers):
                pass
            await _answer(writer, 404, b"", "text/plain")
        return headers.get("connection", "").lower() != "close"


def _head(status: int, length: int, content_type: str) -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {length}\r\n\r\n"
    ).encode()


async def _answer(writer: asyncio.StreamWriter, status: int, body: bytes, kind: str) -> None:
    writer.write(_head(status, len(body), kind) + body)
    await writer.drain()


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    remaining = int(headers.get("content-length", "0"))
    while remaining:
        chunk = await reader.read(min(CHUNK, remaining))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(chunk)
        yield chunk


async def serve(port: int, data_dir: Path) -> None:
    """Serve on 127.0.0.1:`port` until cancelled."""
    upstream = Upstream(data_dir)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.port, args.dir))
    except ImportError:
        asyncio.run(serve(args.port, args.dir))


if __name__ == "__main__":
    main()
