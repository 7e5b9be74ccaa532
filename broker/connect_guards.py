"""The connect listener's guards: security headers on every answer, a bound on submissions per
link, and a last resort for failures no handler expected (a plain page; a log line naming only
the failure's type, never its message, which could quote the form)."""

from __future__ import annotations

import logging
import time
from collections import deque

from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.events import emit


class SubmissionRate:
    """At most `limit` submissions per session in `window` seconds (in this process)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._seen: dict[str, deque[float]] = {}

    def allow(self, session_id: str) -> bool:
        now = time.monotonic()
        if len(self._seen) > 10_000:
            self._seen.clear()  # bounded memory; the store's attempt limit still holds
        recent = self._seen.setdefault(session_id, deque())
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.limit:
            return False
        recent.append(now)
        return True


def security_headers(frame_ancestors: str) -> list[tuple[bytes, bytes]]:
    """The connect listener's headers on every answer, the listener's own refusals included."""
    csp = (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self';"
        f" form-action 'self'; base-uri 'none'; frame-ancestors {frame_ancestors}"
    )
    headers = [
        (b"content-security-policy", csp.encode()),
        (b"referrer-policy", b"no-referrer"),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
    ]
    if frame_ancestors.strip() == "'none'":
        headers.append((b"x-frame-options", b"DENY"))
    return headers


class SecurityHeaders:
    """The connect listener's headers on every answer (§12): CSP, no referrer, no caching."""

    def __init__(self, app: ASGIApp, frame_ancestors: str) -> None:
        self.app = app
        self.headers = security_headers(frame_ancestors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ours = {name for name, _ in self.headers}

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(n, v) for n, v in message.get("headers", []) if n.lower() not in ours]
                message = {**message, "headers": kept + self.headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class Unexpected:
    """A failure no handler expected: a plain page, and a log line naming only its type."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            emit("connect.internal_error", level=logging.ERROR, error_type=type(exc).__name__)
            if started or scope["type"] != "http":
                return
            text = "Something went wrong. Your key was not saved. Please try again later."
            await HTMLResponse(f"<!doctype html><title>Error</title><p>{text}</p>", 500)(
                scope, receive, send
            )
