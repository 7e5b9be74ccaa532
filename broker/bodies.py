"""Bodies on the caller's side of the proxy: reading one to inspect, streaming one to Pleo,
relaying Pleo's answer.

A body must arrive within `BROKER_REQUEST_BODY_TIMEOUT` in all, whether inspected or streamed (a
streamed body's clock starts when the broker begins sending it to Pleo): a body trickled a byte
at a time may not hold the tenant's in-flight place and an upstream slot for ever. A streamed
body that takes longer or ends early aborts the upstream request instead of ending it cleanly.
A long answer stops being read from Pleo as soon as the caller goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.types import Receive, Send

from broker import errors
from broker.wire import Response

STREAM_WATCH_THRESHOLD = 64 * 1024
CHUNK = 64 * 1024


async def read_bounded(
    receive: Receive, limit: int, headers: dict[str, str], seconds: float
) -> bytes:
    """The whole body (at most `limit` bytes, within `seconds`); its Content-Length is taken
    out of `headers` (the body sent may differ)."""
    declared = headers.pop("content-length", None)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.BodyTooLarge(
            f"The JSON body is {declared} bytes; the broker inspects at most {limit}.", limit=limit
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise errors.BodyInvalid("The caller went away before sending the whole body.")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise errors.BodyTooLarge(
                        f"The JSON body is over the {limit} bytes the broker inspects.", limit=limit
                    )
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise body_timeout(seconds) from None


def body_timeout(timeout: float, *, streamed: bool = False) -> errors.RequestTimeout:
    """The refusal of a body that did not arrive in time."""
    if streamed:
        return errors.RequestTimeout(
            f"The request body did not arrive within {timeout:g} seconds"
            " (BROKER_REQUEST_BODY_TIMEOUT); the call to Pleo was aborted."
        )
    return errors.RequestTimeout(
        f"The request body did not arrive within {timeout:g} seconds"
        " (BROKER_REQUEST_BODY_TIMEOUT); nothing was sent to Pleo."
    )


class StreamedBody:
    """A caller's body streamed to Pleo. If it is not all there `timeout` seconds after the
    first read, or the caller goes away before its end, iteration raises, so the client aborts the
    upstream request rather than ending it as if the body were complete; `failure` then says
    what happened."""

    __slots__ = ("failure", "receive", "timeout")

    def __init__(self, receive: Receive, timeout: float) -> None:
        self.receive = receive
        self.timeout = timeout
        self.failure: errors.BrokerError | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        deadline = asyncio.get_running_loop().time() + self.timeout  # for the whole body
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await self.receive()
            except TimeoutError:
                self.failure = body_timeout(self.timeout, streamed=True)
                raise self.failure from None
            if message["type"] == "http.disconnect":
                self.failure = errors.BodyInvalid(
                    "The caller went away before sending the whole body; the call to Pleo was"
                    " aborted."
                )
                raise self.failure
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


async def relay_body(response: Response, send: Send, receive: Receive) -> None:
    """Pleo's answer body to the caller (the answer has started); the client's errors pass."""
    length = response.content_length
    if length is not None and length <= STREAM_WATCH_THRESHOLD:
        # Whole already, as a short answer nearly always is: no wait, and the connection goes
        # back to the pool when the answer is closed, after this write.
        body = response.whole() if response.complete else await response.read()
        await send({"type": "http.response.body", "body": body})
        return
    # A long answer: stop reading from Pleo as soon as the caller goes away.
    gone = asyncio.ensure_future(disconnected(receive))
    try:
        async for chunk in response.content.iter_chunked(CHUNK):
            if gone.done():
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        gone.cancel()


async def disconnected(receive: Receive) -> None:
    """Returns once the caller has gone away (request body messages are skipped)."""
    while (await receive())["type"] != "http.disconnect":
        pass
