"""What the listeners' HTTP/1.1 needs besides the parser: status lines, the header checks, and
flow control between a connection's transport and its request's app.

The rules are uvicorn's (the listeners ran under it until 2026-11; docs/decisions.md), kept so
that an answer is framed and checked exactly as before.
"""

from __future__ import annotations

import asyncio
import http
import re

# A header name may not hold a control character or a separator; a value may hold a tab
# but no other control character (RFC 9110 §5.1, §5.5).
HEADER_RE = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
HEADER_VALUE_RE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")

# A request body buffered beyond this pauses reading the connection until the app takes it.
HIGH_WATER_LIMIT = 65536


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}


class FlowControl:
    """Pauses reading while a request's body waits for its app, and the app's writes while
    the caller reads slower than the answer comes."""

    __slots__ = ("_transport", "_writable", "read_paused", "write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._writable: asyncio.Event | None = None  # made at the first pause

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable.wait()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            if self._writable is None:
                self._writable = asyncio.Event()
            self._writable.clear()

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            if self._writable is not None:
                self._writable.set()
