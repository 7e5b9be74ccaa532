"""A recording stand-in for Pleo for proxy tests that need what the sandbox does not do:
answer any path, stream large or endless bodies, count uploaded bytes, set cookies.

`/v1/introspect` answers for the keys registered in `keys`, `/v1/installations/me` keeps
each key's installation (what the broker's own sync writes); every other request is
recorded (method, raw path, query, headers, body size) and answered by its path."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]


@dataclass(frozen=True)
class Seen:
    method: str
    raw_path: bytes
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    complete: bool = True  # False: the connection ended before the whole body arrived

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


@dataclass
class RecordingUpstream:
    keys: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    endless_closed: threading.Event = field(default_factory=threading.Event)
    endless_sent: int = 0
    release: threading.Event = field(default_factory=threading.Event)  # answers `held`
    reject: threading.Event = field(default_factory=threading.Event)  # answers `slow-401`
    installations: dict[bytes, dict[str, Any]] = field(default_factory=dict)  # by credentials

    def add_key(self, api_key: str, company_id: str, scopes: list[str]) -> None:
        self.keys[api_key] = (company_id, scopes)

    async def __call__(self, scope: Scope, receive: Callable[..., Any], send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path == "/v1/introspect":
            await self._introspect(scope, send)
            return
        if path == "/v1/installations/me":
            await self._installation(scope, receive, send)
            return
        keep = path != UPLOAD_PATH
        body, received, complete = await _read_body(receive, keep=keep)
        self.seen.append(
            Seen(
                scope["method"],
                scope["raw_path"],
                scope["query_string"],
                tuple(scope["headers"]),
                body,
                complete,
            )
        )
        if not complete:
            return
        if not keep:
            await _json(send, 200, {"received": received})
        elif path == "/v3/export-items":
            await self._export_items(scope["query_string"], send, receive)
        else:
            await self._answer(path, send)

    async def _export_items(self, query: bytes, send: Any, receive: Callable[..., Any]) -> None:
        if b"size=" in query:
            await self._stream(send, int(query.split(b"size=")[1].split(b"&")[0]))
        elif b"endless" in query:
            await self._endless(send, receive)
        else:
            await _json(send, 200, {"data": {"echo": "/v3/export-items"}})

    async def _answer(self, path: str, send: Any) -> None:
        """The answer of every recorded path but the export items and the upload."""
        if path in ("/v3/export-jobs/401-cut/items", "/v3/export-jobs/403-cut/items"):
            await _start(send, 401 if "401" in path else 403, b"1000")
            await send({"type": "http.response.body", "body": b'{"type":', "more_body": True})
            raise ConnectionAbortedError("the upstream died mid-error")
        if path == "/v3/export-jobs/cut-short/items":
            await _start(send, 200, b"1000000")
            await send({"type": "http.response.body", "body": b"z" * 100_000, "more_body": True})
            raise ConnectionAbortedError("the upstream died mid-answer")
        if path == "/v3/export-jobs/held/items":
            await _until(self.release)
            await _json(send, 200, {"data": {"echo": path}})
        elif path == "/v3/export-jobs/slow-401/items":
            await _until(self.reject)  # the test rotates the key meanwhile, then sets it
            await _json(send, 401, {"type": "UNAUTHORIZED", "message": "key revoked"})
        elif path == "/v3/export-jobs/cookie/items":
            await _json(send, 200, {}, COOKIE_HEADERS)
        else:
            await _json(send, 200, {"data": {"echo": path}})

    async def _installation(self, scope: Scope, receive: Callable[..., Any], send: Any) -> None:
        """The broker's installation sync: kept per key, not recorded."""
        auth = dict(scope["headers"]).get(b"authorization", b"")
        body, _, _ = await _read_body(receive, keep=True)
        if scope["method"] in ("POST", "PUT") and body:
            self.installations[auth] = json.loads(body)
        found = self.installations.get(auth)
        if found is None:
            await _json(send, 404, {"type": "NOT_FOUND"})
        else:
            await _json(send, 200, found)

    async def _introspect(self, scope: Scope, send: Any) -> None:
        auth = dict(scope["headers"]).get(b"authorization", b"")
        key = base64.b64decode(auth.removeprefix(b"Basic ")).decode().removesuffix(":")
        if key not in self.keys:
            await _json(send, 401, {"type": "UNAUTHORIZED", "message": "bad key"})
            return
        company, scopes = self.keys[key]
        await _json(
            send,
            200,
            {
                "data": {
                    "authMethod": "API_KEY",
                    "clientId": "c",
                    "scope": " ".join(scopes),
                    "applicationName": "t",
                    "subjectURN": f"urn:pleo:company:{company}",
                }
            },
        )

    async def _stream(self, send: Any, size: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        chunk = b"x" * 65536
        left = size
        while left > 0:
            part = chunk[: min(left, len(chunk))]
            left -= len(part)
            await send({"type": "http.response.body", "body": part, "more_body": left > 0})

    async def _endless(self, send: Any, receive: Callable[..., Any]) -> None:
        """Streams until the broker closes the connection (uvicorn's send() stays silent
        after a disconnect, so watch receive() for it)."""

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(disconnected())
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        try:
            while not gone.done():
                await send({"type": "http.response.body", "body": b"y" * 65536, "more_body": True})
                self.endless_sent += 1
                await asyncio.sleep(0.001)
        finally:
            if gone.done():
                self.endless_closed.set()
            gone.cancel()


async def _json(
    send: Any, status: int, body: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": data})


UPLOAD_PATH = "/v3/export-jobs/upload/items"  # counted, not kept
COOKIE_HEADERS = [
    (b"set-cookie", b"session=abc; Path=/"),
    (b"x-upstream", b"1"),
    (b"connection", b"x-upstream-hop"),
    (b"x-upstream-hop", b"for the next hop only"),
    (b"keep-alive", b"5"),
]


async def _read_body(receive: Callable[..., Any], *, keep: bool) -> tuple[bytes, int, bool]:
    """The body (if kept), its size, and whether it arrived whole (not cut by a disconnect)."""
    body = bytearray()
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return bytes(body), received, False
        chunk = message.get("body", b"")
        received += len(chunk)
        if keep:
            body += chunk
        if not message.get("more_body", False):
            return bytes(body), received, True


async def _start(send: Any, status: int, length: bytes) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-length", length)]}
    )


async def _until(event: threading.Event) -> None:
    while not event.is_set():  # noqa: ASYNC110 - set from the test's thread
        await asyncio.sleep(0.005)
