"""Connections to the one Pleo origin, kept alive and reused: the data plane's client pool.

Idle connections are reused last-in first-out and closed after `KEEPALIVE` idle seconds (looked
at whenever one is given back or taken); a connection is never reused after an answer not read
to its end, a `Connection: close`, an HTTP/1.0 answer, an answer to `HEAD` or the server
closing it.
The pool sets no limit of its own: `broker.upstream` bounds the calls in flight.

A request sent on a reused connection that the server had closed meanwhile (it went away
before any byte of an answer) is sent once more on a new connection if its method is
idempotent (`GET`, `HEAD`, `OPTIONS`, `PUT`, `DELETE`, `TRACE`) and its body is in hand, as
aiohttp did; never a `POST` or `PATCH`, nor a streamed body.

With an egress proxy, `http://` Pleo gets absolute-form requests carrying the proxy's
`Proxy-Authorization`, `https://` Pleo a `CONNECT` tunnel with TLS inside it.

The pool frames every request itself: a body in hand by its length; a streamed one raw under
the `Content-Length` given with it (byte counted: a body of another length is never sent as
if it were the declared one) or chunked when none is given. A `Transfer-Encoding` given with
the headers is refused, and nothing in a header's value can change the framing: the client
decides it from what it was given, never by reading back the head it wrote.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from collections.abc import AsyncIterable
from urllib.parse import unquote, urlsplit

from broker.wire import (
    MAX_ANSWER_HEAD,
    ConnectError,
    Connection,
    ConnectTimeout,
    PayloadError,
    ProxyRefused,
    ProxyUnreachable,
    Response,
    ServerDisconnected,
    WireError,
)

KEEPALIVE = 15.0  # seconds an idle connection is kept
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no Content-Length: 0 without a body
ONE_WRITE = 64 * 1024  # a body up to this size goes out in the head's write
_FRAMING_LENGTHS = (len("content-length"), len("transfer-encoding"))

Body = bytes | AsyncIterable[bytes] | None


class EgressProxy:
    """BROKER_UPSTREAM_PROXY, parsed; its credentials are never shown."""

    __slots__ = ("authorization", "host", "port", "tls")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.authorization: str | None = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.authorization = "Basic " + base64.b64encode(pair.encode()).decode()

    def __repr__(self) -> str:
        return f"EgressProxy({self.host}:{self.port})"


class Pool:
    """Keep-alive connections to `base_url`'s origin; `request` sends one request on one."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        proxy: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc.rpartition("@")[2]
        if parts.port in (80, 443) and parts.port == (443 if self.tls else 80):
            self.host_header = self.host_header.rpartition(":")[0]
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.proxy = EgressProxy(proxy) if proxy else None
        self._ssl = ssl_context
        if self._ssl is not None:
            self._ssl.set_alpn_protocols(["http/1.1"])
        # Through a proxy, plain http goes in absolute form with the proxy's credentials.
        self._absolute = ""
        self._proxy_line = ""
        if self.proxy is not None and not self.tls:
            self._absolute = f"http://{self.host_header}"
            if self.proxy.authorization is not None:
                self._proxy_line = f"Proxy-Authorization: {self.proxy.authorization}\r\n"
        self._idle: deque[Connection] = deque()
        self.closed = False

    @property
    def ssl(self) -> ssl.SSLContext:
        """The TLS context, made at the first TLS connection: the system's CA certificates
        (~2 MiB in memory) are loaded when a connection needs them, not at start."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # certificates and names checked
            self._ssl.set_alpn_protocols(["http/1.1"])
        return self._ssl

    @property
    def authority(self) -> str:
        """Pleo's host and port as a `CONNECT` names them (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def close(self) -> None:
        self.closed = True
        while self._idle:
            self._idle.pop().abort()

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: Body
    ) -> Response:
        """Send a request (`target`: path and query) and return its answer once its head is
        in; the body is read from the answer, which gives the connection back."""
        head, declared = self._head(method, target, headers, body)
        connection = self._pooled() or await self._connect()
        try:
            answer = await self._exchange(connection, head, body, method, declared)
        except ServerDisconnected:
            streamed = body is not None and not isinstance(body, bytes)
            if not connection.reused or connection.received or streamed:
                raise
            if method not in IDEMPOTENT:
                raise
            # The server closed the idle connection as the request went out, before a byte of
            # an answer: once more, anew.
            answer = await self._exchange(await self._connect(), head, body, method, declared)
        if answer.status == 407 and self._absolute:
            answer.close()
            raise ProxyRefused("The egress proxy answered 407")
        return answer

    def _head(
        self, method: str, target: str, headers: dict[str, str], body: Body
    ) -> tuple[bytes, int | None]:
        """The request's head, and the length a streamed body was declared with (None: it
        goes chunked, or the body is in hand or absent)."""
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a header to Pleo holds a line break")
        given = _given_length(headers)
        declared = None
        if isinstance(body, bytes):
            if given is not None and given != len(body):
                raise ValueError("the Content-Length given is not the body's length")
            framing = "" if given is not None else f"Content-Length: {len(body)}\r\n"
        elif body is not None:
            declared = given
            framing = "" if given is not None else "Transfer-Encoding: chunked\r\n"
        elif given not in (None, 0):
            raise ValueError("a Content-Length was given for a request without a body")
        elif given is not None or method in BODILESS:
            framing = ""
        else:
            framing = "Content-Length: 0\r\n"
        return (
            f"{method} {self._absolute}{self.prefix}{target} HTTP/1.1\r\n"
            f"Host: {self.host_header}\r\n{lines}{framing}{self._proxy_line}\r\n"
        ).encode("latin-1"), declared

    async def _exchange(
        self, connection: Connection, head: bytes, body: Body, method: str, declared: int | None
    ) -> Response:
        head_only = method == "HEAD"
        try:
            if body is None:
                answer = connection.send_head(head, head_only=head_only)
            elif isinstance(body, bytes):
                if len(body) <= ONE_WRITE:
                    answer = connection.send_head(head + body, head_only=head_only)
                else:
                    answer = connection.send_head(head, head_only=head_only)
                    await connection.write_body(body)
            else:
                answer = connection.send_head(head, head_only=head_only)
                await self._stream(connection, body, declared)
            if body is not None and (method in BODILESS or answer.started):
                # A body where a server may not expect one (it might read it as the next
                # request), or one answered before it was all handed to the transport (the
                # server may not read the rest): the connection serves this request only.
                connection.reusable = False
            connection.expect_head()
            while not answer.started:
                await connection.wait()
            if answer.status >= 400 and body is not None and body != b"":
                # Refused: a server that answers on the head may never read the body, which
                # it would then take for the start of the next request on this connection.
                connection.reusable = False
        except BaseException:
            connection.abort()
            raise
        answer.on_release = self._release
        return answer

    async def _stream(
        self, connection: Connection, body: AsyncIterable[bytes], declared: int | None
    ) -> None:
        """A streamed body, raw under its `declared` length (counted) or chunked; stops early
        if Pleo answered and closed before its end."""
        sent = 0
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if declared is None:
                    await connection.write_body(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    continue
                sent += len(chunk)
                if sent > declared:
                    raise PayloadError("The request body is longer than its Content-Length")
                await connection.write_body(chunk)
            if declared is None:
                await connection.write_body(b"0\r\n\r\n")
            elif sent != declared:
                raise PayloadError("The request body is shorter than its Content-Length")
        except ServerDisconnected:
            answer = connection.answer
            if answer is None or not answer.started:
                raise

    def _pooled(self) -> Connection | None:
        # The connections' loop, not `asyncio.get_running_loop()`: a system call (getpid)
        # each on Python 3.11, twice a request.
        now = self._idle[-1].loop.time() if self._idle else 0.0
        while self._idle:
            connection = self._idle.pop()
            transport = connection.transport
            if (
                not connection.closed
                and transport is not None
                and not transport.is_closing()
                and now - connection.idle_since <= KEEPALIVE
            ):
                return connection
            connection.abort()
        return None

    def _release(self, connection: Connection) -> None:
        """An answer was read to its end (or dropped): keep its connection if it may be."""
        transport = connection.transport
        if (
            self.closed
            or connection.closed
            or not connection.reusable
            or transport is None
            or transport.is_closing()
        ):
            connection.abort()
            return
        now = connection.loop.time()
        connection.reused = True
        connection.idle_since = now
        connection.answer = None
        self._idle.append(connection)
        while self._idle and now - self._idle[0].idle_since > KEEPALIVE:
            self._idle.popleft().abort()

    async def _connect(self) -> Connection:
        """A new connection (through the egress proxy, if any), within the connect timeout."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.proxy is None:
                    return await self._open(self.host, self.port, tls=self.tls)
                if not self.tls:
                    return await self._open_proxy(self.proxy)
                return await self._tunnel(self.proxy)
        except TimeoutError:
            raise ConnectTimeout(
                f"Not connected to Pleo within {self.connect_timeout:g} s"
            ) from None
        except WireError:
            raise
        except OSError as exc:  # refused, unreachable, TLS (ssl.SSLError)
            raise ConnectError(f"Could not connect to Pleo: {exc}") from exc

    async def _open(self, host: str, port: int, *, tls: bool) -> Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: Connection(self.read_timeout),
            host,
            port,
            ssl=self.ssl if tls else None,
            server_hostname=self.host if tls else None,
        )
        return connection

    async def _open_proxy(self, proxy: EgressProxy) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                lambda: Connection(self.read_timeout),
                proxy.host,
                proxy.port,
                ssl=self.ssl if proxy.tls else None,
                server_hostname=proxy.host if proxy.tls else None,
            )
        except OSError as exc:
            raise ProxyUnreachable(f"The egress proxy could not be reached: {exc}") from exc
        return connection

    async def _tunnel(self, proxy: EgressProxy) -> Connection:
        """CONNECT through the egress proxy, then TLS to Pleo inside the tunnel."""
        if proxy.tls:  # uvloop cannot start TLS inside TLS (it hangs): refused, not tried
            raise ProxyUnreachable("TLS to Pleo inside TLS to an https:// egress proxy")
        loop = asyncio.get_running_loop()
        try:
            transport, tunnel = await loop.create_connection(_Tunnel, proxy.host, proxy.port)
        except OSError as exc:
            raise ProxyUnreachable(f"The egress proxy could not be reached: {exc}") from exc
        try:
            authority = self.authority
            credentials = (
                f"Proxy-Authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
            )
            transport.write(
                f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{credentials}\r\n".encode()
            )
            status = await tunnel.status
            if status != 200:
                raise ProxyRefused(f"The egress proxy answered CONNECT with {status}")
            connection = Connection(self.read_timeout)
            secured = await loop.start_tls(
                transport, connection, self.ssl, server_hostname=self.host
            )
            assert secured is not None
            connection.connection_made(secured)
            return connection
        except BaseException:
            transport.abort()
            raise


class _Tunnel(asyncio.Protocol):
    """The egress proxy's answer to CONNECT: its status once its head is in."""

    def __init__(self) -> None:
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._head = b""

    def data_received(self, data: bytes) -> None:
        if self.status.done():
            return
        searched = max(0, len(self._head) - 3)  # the end may straddle two reads
        self._head += data
        if self._head.find(b"\r\n\r\n", searched) != -1:
            parts = self._head.split(b" ", 2)
            ok = len(parts) > 1 and parts[1].isdigit()
            self.status.set_result(int(parts[1]) if ok else 0)
        elif len(self._head) > MAX_ANSWER_HEAD:
            self.status.set_exception(
                ProxyRefused(
                    f"The egress proxy's CONNECT answer head is over {MAX_ANSWER_HEAD} bytes"
                )
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_exception(ProxyRefused("The egress proxy closed the CONNECT"))


def _given_length(headers: dict[str, str]) -> int | None:
    """The Content-Length given with the headers (None: none); a Transfer-Encoding or an
    unreadable length is refused: the pool frames the request."""
    given = None
    for name, value in headers.items():
        if len(name) not in _FRAMING_LENGTHS:
            continue  # neither name: not lower-cased (most headers, every request)
        lowered = name.lower()
        if lowered == "transfer-encoding":
            raise ValueError("a Transfer-Encoding was given: the pool frames requests itself")
        if lowered == "content-length":
            if given is not None or not value.isdigit() or not value.isascii():
                raise ValueError("the Content-Length given is not one plain number")
            given = int(value)
    return given
