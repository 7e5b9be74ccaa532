"""broker.wire and broker.wire_pool: the data plane's HTTP/1.1 client against real asyncio
servers on 127.0.0.1 (written byte by byte, so every framing and failure is the test's own).

Each test runs on uvloop (the broker's loop) and on asyncio's own.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from support.certificates import self_signed

from broker import wire
from broker.wire_pool import KEEPALIVE, Pool

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Handler = Callable[["Origin", Reader, Writer, int], Awaitable[None]]


LOOPS = pytest.mark.parametrize(
    "loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"]
)


def on_both_loops(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """The async test run once on each loop, in a loop of its own."""

    def run(*args: Any, loop_factory: Callable[[], asyncio.AbstractEventLoop], **kw: Any) -> None:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(test(*args, **kw))

    signature = inspect.signature(test)
    extra = inspect.Parameter("loop_factory", inspect.Parameter.KEYWORD_ONLY)
    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), extra]
    )
    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    run.pytestmark = [*getattr(test, "pytestmark", []), LOOPS.mark]  # type: ignore[attr-defined]
    return run


@dataclass
class Origin:
    """A server on 127.0.0.1 that counts its connections and keeps every request's bytes."""

    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def read_request(reader: Reader) -> bytes | None:
    """One request's bytes (head and body, by Content-Length or chunked); None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lower = head.lower()
    if b"\r\ntransfer-encoding: chunked\r\n" in lower:  # a header line, not a value
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            body += size_line + await reader.readexactly(size + 2)
            if size == 0:
                return head + body
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head


@asynccontextmanager
async def serving(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Origin]:
    origin = Origin()
    tasks: set[asyncio.Task[None]] = set()

    async def connected(reader: Reader, writer: Writer) -> None:
        origin.connections += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(origin, reader, writer, origin.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(connected, "127.0.0.1", 0, ssl=ssl_context)
    origin.port = server.sockets[0].getsockname()[1]
    try:
        yield origin
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def answer(body: bytes = b"ok", *, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (
        b"HTTP/" + version + b" 200 OK\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n"
    ) + body


async def keep_answering(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
    """Answers each request on the connection with the connection's number."""
    while (request := await read_request(reader)) is not None:
        origin.requests.append(request)
        writer.write(answer(b"conn %d" % number))
        await writer.drain()


def pool(url: str, **options: object) -> Pool:
    values: dict[str, object] = {"connect_timeout": 2.0, "read_timeout": 5.0}
    values.update(options)
    return Pool(url, **values)  # type: ignore[arg-type]


async def get(client: Pool, target: str = "/", method: str = "GET") -> tuple[int, bytes]:
    response = await client.request(method, target, {}, None)
    return response.status, await response.read()


# Keep-alive


@on_both_loops
async def test_connections_are_kept_alive_and_reused_last_in_first_out() -> None:
    async with serving(keep_answering) as origin:
        client = pool(origin.url)
        assert [await get(client) for _ in range(3)] == [(200, b"conn 1")] * 3
        for order in (slice(None), slice(None, None, -1)):
            both = await asyncio.gather(
                client.request("GET", "/a", {}, None), client.request("GET", "/b", {}, None)
            )
            bodies = [await response.read() for response in list(both)[order]]
            assert sorted(bodies) == [b"conn 1", b"conn 2"]
            assert await get(client) == (200, bodies[-1])  # the one given back last
        assert origin.connections == 2
        await client.close()


@on_both_loops
async def test_a_connection_idle_for_longer_than_the_keepalive_is_closed() -> None:
    async with serving(keep_answering) as origin:
        client = pool(origin.url)
        both = await asyncio.gather(*(client.request("GET", "/", {}, None) for _ in range(2)))
        await both[0].read()
        old = client._idle[0]
        old.idle_since -= KEEPALIVE + 1  # as if given back 16 s ago
        await both[1].read()  # giving one back looks at the oldest
        assert list(client._idle) == [both[1].connection]
        assert old.closed
        await client.close()


@on_both_loops
async def test_the_request_carries_exactly_its_headers_and_host() -> None:
    async with serving(keep_answering) as origin:
        client = pool(origin.url + "/base")
        headers = {"Authorization": "Bearer k", "x-request-id": "r1"}
        response = await client.request("POST", "/v1/x?a=1", headers, b'{"a":1}')
        await response.read()
        response = await client.request("DELETE", "/v1/y", {}, None)
        await response.read()
        assert origin.requests == [
            b"POST /base/v1/x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer k\r\n"
            b'x-request-id: r1\r\nContent-Length: 7\r\n\r\n{"a":1}' % origin.port,
            b"DELETE /base/v1/y HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 0\r\n\r\n"
            % origin.port,
        ]
        await client.close()


@on_both_loops
async def test_a_header_with_a_line_break_is_refused() -> None:
    client = pool("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="line break"):
        await client.request("GET", "/", {"X-A": "b\r\nX-Injected: 1"}, None)


@pytest.mark.parametrize(
    ("extra", "version"),
    [(b"Connection: close\r\n", b"1.1"), (b"", b"1.0")],
    ids=["connection-close", "http-1.0"],
)
@on_both_loops
async def test_an_answer_that_closes_is_not_reused(extra: bytes, version: bytes) -> None:
    async def closing(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(answer(extra=extra, version=version))
        await writer.drain()
        await reader.read()  # until the client closes

    async with serving(closing) as origin:
        client = pool(origin.url)
        assert await get(client) == (200, b"ok")
        assert await get(client) == (200, b"ok")
        assert origin.connections == 2
        await client.close()


@on_both_loops
async def test_an_answer_not_read_to_its_end_drops_its_connection() -> None:
    big = b"x" * 1_000_000

    async def big_answer(origin: Origin, reader: Reader, writer: Writer, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(answer(big))
            await writer.drain()

    async with serving(big_answer) as origin:
        client = pool(origin.url)
        response = await client.request("GET", "/", {}, None)
        assert not response.complete
        response.close()
        assert response.connection.closed
        assert await (await client.request("GET", "/", {}, None)).read() == big
        assert await (await client.request("GET", "/", {}, None)).read() == big
        assert origin.connections == 2  # the second answer's connection served the third
        await client.close()


# Framing of answers


@on_both_loops
async def test_chunked_and_close_delimited_answers_are_read_whole() -> None:
    async def framed(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n\x1f\x8b raw gzip")
        await writer.drain()
        writer.close()

    async with serving(framed) as origin:
        client = pool(origin.url)
        response = await client.request("GET", "/", {}, None)
        assert response.content_length is None
        assert await response.read() == b"hello world"
        response = await client.request("GET", "/", {}, None)
        assert response.headers.get("content-encoding") == "gzip"
        assert await response.read() == b"\x1f\x8b raw gzip"  # passed through undecoded
        assert response.connection.closed
        assert origin.connections == 1
        await client.close()


@on_both_loops
async def test_interim_answers_are_skipped_and_bodiless_answers_have_no_body() -> None:
    async def special(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            + answer(b"final", extra=b"X-Final: yes\r\n")
        )
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await reader.read()

    async with serving(special) as origin:
        client = pool(origin.url)
        response = await client.request("GET", "/", {}, None)
        assert response.status == 200
        assert response.raw_headers == [(b"Content-Length", b"5"), (b"X-Final", b"yes")]
        assert response.headers.get("X-FINAL") == "yes"
        assert await response.read() == b"final"
        assert await get(client) == (204, b"")
        assert await get(client) == (304, b"")
        assert await get(client, method="HEAD") == (200, b"")
        assert origin.connections == 1
        await client.close()


@on_both_loops
async def test_a_slow_reader_pauses_the_server() -> None:
    size = 20_000_000
    blocked = asyncio.Event()

    async def flood(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"y" * 65536
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            if writer.transport.get_write_buffer_size() > 0:
                blocked.set()
            await writer.drain()
        writer.write(b"y" * (size % len(chunk)))
        await writer.drain()

    async with serving(flood) as origin:
        client = pool(origin.url)
        response = await client.request("GET", "/", {}, None)
        await asyncio.wait_for(blocked.wait(), 10)
        assert response.paused
        assert response.buffered < 2 * wire.HIGH_WATER
        total = 0
        async for chunk in response.content.iter_chunked(65536):
            assert len(chunk) <= 65536
            total += len(chunk)
            assert response.buffered < 2 * wire.HIGH_WATER
        assert total == size
        await client.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n",
    ],
    ids=["unparsable", "upgrade"],
)
@on_both_loops
async def test_an_answer_that_is_not_http_is_a_payload_error(garbage: bytes) -> None:
    async def nonsense(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(garbage)
        await reader.read()

    async with serving(nonsense) as origin:
        client = pool(origin.url)
        with pytest.raises(wire.PayloadError):
            await client.request("GET", "/", {}, None)
        await client.close()


# Streamed request bodies


@on_both_loops
async def test_a_streamed_body_is_chunked_unless_its_length_is_given() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"defgh"

    async with serving(keep_answering) as origin:
        client = pool(origin.url)
        await (await client.request("PUT", "/u", {}, parts())).read()
        await (await client.request("PUT", "/u", {"content-length": "8"}, parts())).read()
        port = origin.port
        assert origin.requests == [
            b"PUT /u HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n" % port,
            b"PUT /u HTTP/1.1\r\nHost: 127.0.0.1:%d\r\ncontent-length: 8\r\n\r\nabcdefgh" % port,
        ]
        await client.close()


@on_both_loops
async def test_a_streamed_body_waits_while_the_server_does_not_read() -> None:
    size, chunk = 16 * 1024 * 1024, b"u" * 65536
    may_read = asyncio.Event()

    async def late_reader(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)  # the warm-up GET
        writer.write(answer())
        await may_read.wait()
        request = await read_request(reader)
        assert request is not None and request.endswith(chunk)
        writer.write(answer(b"%d" % (len(request) - request.index(b"\r\n\r\n") - 4)))

    async with serving(late_reader) as origin:
        client = pool(origin.url)
        await get(client)
        transport = client._idle[-1].transport  # the connection the upload will use
        assert transport is not None
        most = 0

        async def upload() -> AsyncIterator[bytes]:
            nonlocal most
            for _ in range(size // len(chunk)):
                # Asked for more only while the socket takes it: never a growing buffer.
                most = max(most, transport.get_write_buffer_size())
                if transport.get_write_buffer_size() > 0:
                    may_read.set()
                yield chunk

        headers = {"Content-Length": str(size)}
        response = await client.request("PUT", "/u", headers, upload())
        assert await response.read() == b"%d" % size
        assert may_read.is_set() and most <= 128 * 1024
        await client.close()


@on_both_loops
async def test_a_failing_streamed_body_aborts_the_request() -> None:
    seen: list[bytes] = []

    async def record(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        seen.append(await reader.read())

    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        raise RuntimeError("the caller went away")

    async with serving(record) as origin:
        client = pool(origin.url)
        with pytest.raises(RuntimeError, match="went away"):
            await client.request("PUT", "/u", {}, broken())
        deadline = asyncio.get_running_loop().time() + 5
        while not seen:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert seen[0].endswith(b"4\r\npart\r\n")  # no final chunk: not a complete body
        await client.close()


# A server closing an idle connection


@on_both_loops
async def test_an_idle_connection_closed_by_the_server_is_not_used() -> None:
    async def once(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(answer(b"conn %d" % number))
        await writer.drain()  # then closes, without saying so

    async with serving(once) as origin:
        client = pool(origin.url)
        assert await get(client) == (200, b"conn 1")
        deadline = asyncio.get_running_loop().time() + 5
        while not client._idle[-1].closed:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert await get(client) == (200, b"conn 2")
        await client.close()


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("PUT", True), ("POST", False)])
@on_both_loops
async def test_a_request_meeting_a_connection_closed_meanwhile_is_retried_if_idempotent(
    method: str, retried: bool
) -> None:
    async def drop_the_second(origin: Origin, reader: Reader, writer: Writer, n: int) -> None:
        await read_request(reader)
        writer.write(answer(b"conn %d" % n))
        await writer.drain()
        if await read_request(reader) is not None:
            writer.transport.abort()  # as if it had closed just before the request came

    async with serving(drop_the_second) as origin:
        client = pool(origin.url)
        assert await get(client) == (200, b"conn 1")
        if retried:
            assert await get(client, method=method) == (200, b"conn 2")
        else:
            with pytest.raises(wire.ServerDisconnected):
                await get(client, method=method)
        assert origin.connections == (2 if retried else 1)
        await client.close()


@on_both_loops
async def test_a_connection_dropped_before_the_answer_is_server_disconnected() -> None:
    async def drop(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await writer.drain()
        writer.transport.abort()

    async with serving(drop) as origin:
        client = pool(origin.url)
        response = await client.request("GET", "/", {}, None)
        with pytest.raises(wire.ServerDisconnected):
            await response.read()
        await client.close()


# Timeouts


@on_both_loops
async def test_no_answer_in_time_is_a_read_timeout_for_the_head_and_the_body() -> None:
    release = asyncio.Event()

    async def stall(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        if number == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await release.wait()

    async with serving(stall) as origin:
        client = pool(origin.url, read_timeout=0.2)
        with pytest.raises(wire.ReadTimeout):
            await client.request("GET", "/", {}, None)
        response = await client.request("GET", "/", {}, None)
        with pytest.raises(wire.ReadTimeout):
            await response.read()
        release.set()
        await client.close()


@on_both_loops
async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout() -> None:
    release = asyncio.Event()

    async def silent(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await release.wait()

    async with serving(silent) as origin:
        client = pool(f"https://127.0.0.1:{origin.port}", connect_timeout=0.2, read_timeout=5)
        with pytest.raises(wire.ConnectTimeout):
            await client.request("GET", "/", {}, None)
        release.set()
        await client.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@on_both_loops
async def test_nothing_listening_is_a_connect_error() -> None:
    client = pool(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(wire.ConnectError):
        await client.request("GET", "/", {}, None)


# TLS and the egress proxy


@dataclass(frozen=True)
class Certificate:
    cafile: Path
    server: ssl.SSLContext


def make_certificate(tmp_path: Path, name: str) -> Certificate:
    # localhost also names 127.0.0.1, where the test servers listen.
    made = self_signed(name, addresses=("127.0.0.1",) if name == "localhost" else ())
    cafile, keyfile = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    server = made.server_context(cafile, keyfile)
    server.set_alpn_protocols(["http/1.1"])
    return Certificate(cafile, server)


@on_both_loops
async def test_https_checks_the_certificate_and_its_name(tmp_path: Path) -> None:
    good = make_certificate(tmp_path, "localhost")
    alpn: list[str | None] = []

    async def tls(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        alpn.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
        await keep_answering(origin, reader, writer, number)

    async with serving(tls, ssl_context=good.server) as origin:
        trusting = ssl.create_default_context(cafile=good.cafile)
        client = pool(f"https://localhost:{origin.port}", ssl_context=trusting)
        assert [await get(client) for _ in range(2)] == [(200, b"conn 1")] * 2
        assert alpn == ["http/1.1"]
        assert origin.requests[0].startswith(b"GET / HTTP/1.1\r\nHost: localhost:%d" % origin.port)
        await client.close()
        untrusting = pool(f"https://localhost:{origin.port}")  # the system's CAs only
        assert untrusting._ssl is None  # made at the first TLS connection, not before
        with pytest.raises(wire.ConnectError):
            await untrusting.request("GET", "/", {}, None)
        made = untrusting._ssl
        assert made is not None and made.verify_mode is ssl.CERT_REQUIRED and made.check_hostname
        assert untrusting.ssl is made  # one context for every connection
    wrong = make_certificate(tmp_path, "pleo.example")
    async with serving(keep_answering, ssl_context=wrong.server) as origin:
        trusting = ssl.create_default_context(cafile=wrong.cafile)
        client = pool(f"https://localhost:{origin.port}", ssl_context=trusting)
        with pytest.raises(wire.ConnectError) as caught:
            await client.request("GET", "/", {}, None)
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)


def connect_proxy(
    authorization: str | None, tunnels: list[tuple[bytes, str | None]]
) -> Callable[[Origin, Reader, Writer, int], Awaitable[None]]:
    """A CONNECT proxy for 127.0.0.1 that wants `authorization` (if any)."""

    async def handle(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        given = next(
            (
                line.split(":", 1)[1].strip()
                for line in lines
                if line.lower().startswith("proxy-authorization:")
            ),
            None,
        )
        tunnels.append((head.split(b"\r\n")[0], given))
        if authorization is not None and given != authorization:
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        host, port = lines[0].split()[1].rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")

        async def pipe(source: Reader, sink: Writer) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return handle


@on_both_loops
async def test_https_through_the_egress_proxy_is_tunnelled_with_credentials(
    tmp_path: Path,
) -> None:
    cert = make_certificate(tmp_path, "localhost")
    tunnels: list[tuple[bytes, str | None]] = []
    wanted = "Basic " + base64.b64encode(b"egress@corp:pw").decode()
    async with (
        serving(keep_answering, ssl_context=cert.server) as origin,
        serving(connect_proxy(wanted, tunnels)) as proxy,
    ):
        trusting = ssl.create_default_context(cafile=cert.cafile)
        client = pool(
            f"https://localhost:{origin.port}",
            ssl_context=trusting,
            proxy=f"http://egress%40corp:pw@127.0.0.1:{proxy.port}",
        )
        assert [await get(client) for _ in range(2)] == [(200, b"conn 1")] * 2
        assert tunnels == [(b"CONNECT localhost:%d HTTP/1.1" % origin.port, wanted)]
        assert "pw" not in repr(client.proxy)
        await client.close()
        refused = pool(
            f"https://localhost:{origin.port}",
            ssl_context=trusting,
            proxy=f"http://egress%40corp:wrong@127.0.0.1:{proxy.port}",
        )
        with pytest.raises(wire.ProxyRefused):
            await refused.request("GET", "/", {}, None)


@on_both_loops
async def test_plain_http_through_the_egress_proxy_is_in_absolute_form() -> None:
    async def forward(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        while (request := await read_request(reader)) is not None:
            origin.requests.append(request)
            if b"Proxy-Authorization: Basic dTpw" in request:
                writer.write(answer(b"forwarded"))
            else:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            await writer.drain()

    async with serving(forward) as proxy:
        client = pool("http://pleo.example", proxy=f"http://u:p@127.0.0.1:{proxy.port}")
        assert await get(client, "/v1/x") == (200, b"forwarded")
        assert proxy.requests == [
            b"GET http://pleo.example/v1/x HTTP/1.1\r\nHost: pleo.example\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n\r\n"
        ]
        await client.close()
        refused = pool("http://pleo.example", proxy=f"http://u:bad@127.0.0.1:{proxy.port}")
        with pytest.raises(wire.ProxyRefused):
            await refused.request("GET", "/", {}, None)
        unreachable = pool("http://pleo.example", proxy=f"http://127.0.0.1:{closed_port()}")
        with pytest.raises(wire.ProxyUnreachable):
            await unreachable.request("GET", "/", {}, None)


@on_both_loops
async def test_close_closes_idle_connections() -> None:
    async with serving(keep_answering) as origin:
        client = pool(origin.url)
        response = await client.request("GET", "/", {}, None)
        await response.read()
        idle = client._idle[-1]
        await client.close()
        assert client.closed and idle.closed
        assert idle.transport is not None and idle.transport.is_closing()


@on_both_loops
async def test_an_https_egress_proxy_in_front_of_https_pleo_is_refused_at_once() -> None:
    async with serving(keep_answering) as proxy:
        client = pool("https://pleo.example", proxy=f"https://127.0.0.1:{proxy.port}")
        with pytest.raises(wire.ProxyUnreachable, match="inside TLS"):
            await client.request("GET", "/", {}, None)
        assert proxy.connections == 0


@on_both_loops
async def test_plain_http_pleo_through_an_egress_proxy_spoken_to_over_tls(tmp_path: Path) -> None:
    cert = make_certificate(tmp_path, "localhost")  # its IP address is 127.0.0.1

    async with serving(keep_answering, ssl_context=cert.server) as proxy:
        trusting = ssl.create_default_context(cafile=cert.cafile)
        client = pool(
            "http://pleo.example",
            ssl_context=trusting,
            proxy=f"https://u:p@127.0.0.1:{proxy.port}",
        )
        assert await get(client, "/v1/x") == (200, b"conn 1")
        assert proxy.requests[0].startswith(b"GET http://pleo.example/v1/x HTTP/1.1\r\n")
        assert b"Proxy-Authorization: Basic dTpw\r\n" in proxy.requests[0]
        await client.close()


# Found by review: framing, retries, bounds


async def pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


@on_both_loops
async def test_a_header_value_naming_chunked_does_not_change_the_framing() -> None:
    # A caller's header value that reads "Transfer-Encoding: chunked" once made the client
    # chunk a body declared by Content-Length: Pleo then read the chunk sizes as the body and
    # the rest as a request of the caller's making, on a connection other tenants reuse.
    async with serving(keep_answering) as origin:
        client = pool(origin.url)
        headers = {"content-length": "10", "x-note": "Transfer-Encoding: chunked"}
        response = await client.request("POST", "/up", headers, pieces(b"01234", b"56789"))
        assert (response.status, await response.read()) == (200, b"conn 1")
        assert await get(client) == (200, b"conn 1")  # the same connection, in step
        first = origin.requests[0]
        assert first.endswith(b"\r\n\r\n0123456789")
        assert first.lower().count(b"transfer-encoding: chunked") == 1  # the caller's value only
        assert len(origin.requests) == 2
        await client.close()


@on_both_loops
async def test_a_streamed_body_that_does_not_match_its_length_is_not_sent_as_is() -> None:
    async with serving(keep_answering) as origin:
        client = pool(origin.url)
        for chunks in ((b"0123",), (b"0123456789", b"extra")):
            with pytest.raises(wire.WireError):
                await client.request("POST", "/up", {"content-length": "10"}, pieces(*chunks))
        with pytest.raises(ValueError):  # the pool frames requests itself
            await client.request("POST", "/up", {"transfer-encoding": "chunked"}, b"x")
        with pytest.raises(ValueError):
            await client.request("POST", "/up", {"Content-Length": "5"}, b"0123456789")
        await client.close()


@on_both_loops
async def test_a_request_is_not_retried_once_any_of_its_answer_arrived() -> None:
    async def partial_then_reset(origin: Origin, reader: Reader, writer: Writer, n: int) -> None:
        request = await read_request(reader)
        assert request is not None
        origin.requests.append(request)
        if n == 1:  # the first connection answers once, then half an answer and a reset
            writer.write(answer(b"first"))
            await writer.drain()
            request = await read_request(reader)
            assert request is not None
            origin.requests.append(request)
            writer.write(b"HTTP/1.1 200 OK\r\nX-Partial: y")
            await writer.drain()
            writer.transport.abort()
            return
        writer.write(answer(b"again"))
        await writer.drain()

    async with serving(partial_then_reset) as origin:
        client = pool(origin.url)
        assert await get(client, "/one") == (200, b"first")
        with pytest.raises(wire.ServerDisconnected):
            await client.request("PUT", "/transfer", {}, b"{}")
        assert [r.split(b" ")[1] for r in origin.requests] == [b"/one", b"/transfer"]
        await client.close()


@on_both_loops
async def test_an_answer_head_beyond_the_bound_is_refused() -> None:
    async def huge_head(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(64):
            writer.write(b"x" * 16384)
            await writer.drain()
        writer.write(b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with serving(huge_head) as origin:
        client = pool(origin.url)
        with pytest.raises(wire.PayloadError, match="head"):
            await client.request("GET", "/", {}, None)
        await client.close()


@on_both_loops
async def test_an_answer_head_trickled_past_the_read_timeout_is_a_timeout() -> None:
    async def trickle(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(40):  # a byte every 0.05 s: each within the read timeout, never done
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with serving(trickle) as origin:
        client = pool(origin.url, read_timeout=0.5)
        started = asyncio.get_running_loop().time()
        with pytest.raises(wire.ReadTimeout):
            await client.request("GET", "/", {}, None)
        assert asyncio.get_running_loop().time() - started < 1.5
        await client.close()


@on_both_loops
async def test_an_idle_connection_past_the_keepalive_is_not_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("broker.wire_pool.KEEPALIVE", 0.2)
    async with serving(keep_answering) as origin:
        client = pool(origin.url)
        assert await get(client) == (200, b"conn 1")
        await asyncio.sleep(0.3)  # nothing else given back meanwhile
        assert await get(client) == (200, b"conn 2")
        await client.close()


@on_both_loops
async def test_a_body_cut_by_a_reset_is_not_complete() -> None:
    async def reset_mid_body(origin: Origin, reader: Reader, writer: Writer, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart of it")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    async with serving(reset_mid_body) as origin:
        client = pool(origin.url)
        response = await client.request("GET", "/", {}, None)
        with pytest.raises(wire.WireError):
            await response.read()
        await client.close()


def test_connect_through_a_proxy_brackets_an_ipv6_pleo() -> None:
    client = Pool(
        "https://[::1]:8443", connect_timeout=1.0, read_timeout=1.0, proxy="http://proxy:3128"
    )
    assert client.authority == "[::1]:8443"
    assert Pool("https://pleo.example", connect_timeout=1, read_timeout=1).authority == (
        "pleo.example:443"
    )


@on_both_loops
async def test_a_body_read_whole_is_bounded() -> None:
    async def big(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        while await read_request(reader) is not None:
            writer.write(answer(b"x" * 5000))
            await writer.drain()

    async with serving(big) as origin:
        client = pool(origin.url)
        response = await client.request("GET", "/", {}, None)
        with pytest.raises(wire.PayloadError, match="over 1000 bytes"):
            await response.read(limit=1000)
        response = await client.request("GET", "/", {}, None)
        assert len(await response.read(limit=5000)) == 5000
        await client.close()


@on_both_loops
async def test_a_connection_that_carried_a_body_on_a_bodiless_method_is_not_reused() -> None:
    # A server that ignores a GET's Content-Length would read the body as the next request:
    # another tenant's, on the shared pool. Such a connection serves no second request.
    async with serving(keep_answering) as origin:
        client = pool(origin.url)
        for method in ("GET", "OPTIONS"):
            response = await client.request(method, "/", {"content-length": "4"}, pieces(b"GET "))
            assert await response.read() == b"conn %d" % origin.connections
        assert await get(client) == (200, b"conn 3")
        assert await get(client) == (200, b"conn 3")  # an ordinary GET's connection is kept
        await client.close()


@on_both_loops
async def test_a_connection_answered_before_its_body_was_sent_is_not_reused() -> None:
    async def early(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        origin.requests.append(head)
        writer.write(answer(b"early %d" % number))  # before the body, which it reads after
        await writer.drain()
        await reader.readexactly(6)
        await keep_answering(origin, reader, writer, number)

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"abc"
        await asyncio.sleep(0.1)
        yield b"def"

    async with serving(early) as origin:
        client = pool(origin.url)
        response = await client.request("POST", "/", {"content-length": "6"}, slow_body())
        assert await response.read() == b"early 1"
        assert await get(client) == (200, b"early 2")  # a new connection
        await client.close()


@on_both_loops
async def test_an_http_1_0_answer_is_not_reused_even_if_kept_alive() -> None:
    async def old(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        while await read_request(reader) is not None:
            writer.write(
                answer(b"conn %d" % number, extra=b"Connection: keep-alive\r\n", version=b"1.0")
            )
            await writer.drain()

    async with serving(old) as origin:
        client = pool(origin.url)
        assert [await get(client) for _ in range(2)] == [(200, b"conn 1"), (200, b"conn 2")]
        await client.close()


@on_both_loops
async def test_a_length_given_without_a_body_is_refused() -> None:
    client = pool("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        await client.request("GET", "/", {"content-length": "5"}, None)
    await client.close()


@on_both_loops
async def test_an_egress_proxys_endless_connect_answer_is_cut_off() -> None:
    async def endless(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Connection Established\r\nX-Pad: ")
        for _ in range(64):
            writer.write(b"x" * 16384)
            await writer.drain()
        await reader.read()

    async with serving(endless) as proxy:
        client = pool("https://pleo.example", proxy=proxy.url, connect_timeout=5.0)
        with pytest.raises(wire.ProxyRefused, match="head"):
            await client.request("GET", "/", {}, None)
        await client.close()


@on_both_loops
async def test_a_connection_whose_body_was_refused_is_not_reused() -> None:
    # A server answering on the head without reading the body (and not closing) would take
    # the body for the next request: another tenant's, its key appended.
    async def heads_only(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            origin.requests.append(head)
            status = b"401 Unauthorized" if head.startswith(b"POST") else b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 6\r\n\r\nconn %d" % number)
            await writer.drain()

    async with serving(heads_only) as origin:
        client = pool(origin.url)
        smuggled = b"GET /v1/admin HTTP/1.1\r\nHost: x\r\nX: "
        for body in (smuggled, pieces(smuggled)):
            headers = {"content-length": str(len(smuggled))}
            response = await client.request("POST", "/upload", headers, body)
            assert (response.status, await response.read()) == (
                401,
                b"conn %d" % origin.connections,
            )
            fresh = b"conn %d" % (origin.connections + 1)
            assert await get(client, "/v1/expenses") == (200, fresh)
        assert [r.split(b" ")[1] for r in origin.requests] == [b"/upload", b"/v1/expenses"] * 2
        await client.close()


@on_both_loops
async def test_a_request_on_a_kept_alive_connection_asks_for_no_running_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Python 3.11 each `asyncio.get_running_loop()` is a `getpid` system call: a request
    on a pooled connection (taking it, giving it back) uses the connection's loop instead."""
    async with serving(keep_answering) as origin:
        client = pool(origin.url)
        assert await get(client) == (200, b"conn 1")
        calls = 0
        real = asyncio.get_running_loop

        def counted() -> asyncio.AbstractEventLoop:
            nonlocal calls
            calls += 1
            return real()

        monkeypatch.setattr(asyncio, "get_running_loop", counted)
        response = await client.request("GET", "/", {}, None)
        body = await response.read()
        monkeypatch.undo()
        assert (response.status, body, calls) == (200, b"conn 1", 0)
        await client.close()


@on_both_loops
async def test_the_answers_connection_header_is_kept_as_parsed() -> None:
    """The first `Connection` header (what the proxy drops along with the names it lists),
    taken while the head is parsed; none after an interim answer's."""

    async def answering(origin: Origin, reader: Reader, writer: Writer, number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\nConnection: x-interim\r\n\r\n")
        writer.write(answer(extra=b"connection: x-secret, close\r\nConnection: other\r\n"))
        await writer.drain()

    async with serving(answering) as origin:
        client = pool(origin.url)
        response = await client.request("GET", "/", {}, None)
        assert response.connection_header == "x-secret, close"
        assert response.connection_header == response.headers.get("Connection")
        assert await response.read() == b"ok"
        await client.close()
