"""The listeners' own limits, over real sockets: head size, head and idle timeouts, connection
caps, the open-file limit, and a bounded shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.raw_http import connect, read_response
from support.servers import RunningBroker, broker_settings, start_app, start_broker
from support.upstream import RecordingUpstream

from broker.listening import RefusalLog
from broker.server import connection_caps, raise_file_limit
from broker.settings import Settings

pytestmark = pytest.mark.real

REQUIRED = ["export-jobs:read", "export-jobs:write"]


def read_answer(sock: socket.socket, deadline: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection; b"" if it sends nothing."""
    sock.settimeout(deadline)
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError("the server kept the connection open") from None
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def error_code(answer: bytes) -> str:
    code: str = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"]
    return code


def send_until_refused(sock: socket.socket, head: bytes, filler: bytes, total: int) -> int:
    """Send `head`, then `filler` up to `total` bytes or until the server stops reading."""
    sent = 0
    try:
        sock.sendall(head)
        while sent < total:
            sock.sendall(filler)
            sent += len(filler)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


# -- head size -------------------------------------------------------------------------------


@pytest.fixture
def small_heads(make_broker: Callable[..., RunningBroker]) -> RunningBroker:
    return make_broker(max_header_bytes=8192)


@pytest.mark.parametrize("listener", ["proxy", "admin"])
def test_a_huge_header_is_refused_with_431_before_it_is_read(
    small_heads: RunningBroker, listener: str
) -> None:
    port = small_heads.proxy_port if listener == "proxy" else small_heads.admin_port
    with connect(port) as sock:
        head = b"GET /v3/export-jobs HTTP/1.1\r\nHost: x\r\nX-Big: "
        sent = send_until_refused(sock, head, b"a" * 65536, 16 * 1024 * 1024)
        answer = read_answer(sock)
    assert status_of(answer) == 431
    assert error_code(answer) == "header_too_large"
    assert sent < 16 * 1024 * 1024  # the broker stopped reading long before the end


@pytest.mark.parametrize("listener", ["proxy", "admin"])
@pytest.mark.parametrize(
    "headers",
    [
        b"X-One: " + b"b" * 9000 + b"\r\n",  # one header, arriving in one piece
        b"".join(b"X-H%d: %s\r\n" % (i, b"c" * 100) for i in range(100)),  # many small ones
    ],
    ids=["one", "many"],
)
def test_headers_over_the_bound_in_one_piece_are_431(
    small_heads: RunningBroker, listener: str, headers: bytes
) -> None:
    port = small_heads.proxy_port if listener == "proxy" else small_heads.admin_port
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        answer = read_answer(sock)
    assert status_of(answer) == 431
    assert error_code(answer) == "header_too_large"


@pytest.mark.parametrize("listener", ["proxy", "admin"])
def test_a_target_over_the_bound_is_414(small_heads: RunningBroker, listener: str) -> None:
    port = small_heads.proxy_port if listener == "proxy" else small_heads.admin_port
    with connect(port) as sock:
        sent = send_until_refused(sock, b"GET /v3/export-jobs?q=", b"d" * 65536, 16 * 1024 * 1024)
        answer = read_answer(sock)
    assert status_of(answer) == 414
    assert error_code(answer) == "target_too_long"
    assert sent < 16 * 1024 * 1024


def test_heads_within_the_bound_are_served(small_heads: RunningBroker) -> None:
    big = {"X-Padding": "p" * 6000}
    health = httpx.get(small_heads.admin_url + "/healthz", headers=big)
    assert health.status_code == 200
    # The proxy reads them too: its own answer (no tenant header) proves the app got them.
    proxied = httpx.get(small_heads.proxy_url + "/v3/export-jobs", headers=big)
    assert proxied.json()["error"]["code"] == "tenant_missing"
    # A keep-alive connection gets a fresh budget for each request.
    with httpx.Client(base_url=small_heads.admin_url) as client:
        for _ in range(5):
            assert client.get("/healthz", headers=big).status_code == 200


# -- timeouts ----------------------------------------------------------------------------------


@pytest.fixture
def quick(make_broker: Callable[..., RunningBroker]) -> RunningBroker:
    return make_broker(header_timeout=0.5, idle_timeout=0.5)


def trickle(sock: socket.socket) -> tuple[bytes, float]:
    """Trickle a header byte by byte, each in time, the head never whole, until an answer
    comes (at most 5 s); the answer and the seconds it took."""
    started = time.monotonic()
    sock.settimeout(0.1)
    answer = b""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while time.monotonic() - started < 5:
            sock.sendall(b"X")
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
    return answer, time.monotonic() - started


@pytest.mark.parametrize("listener", ["proxy", "admin"])
def test_a_slowloris_head_is_answered_408_and_closed(quick: RunningBroker, listener: str) -> None:
    port = quick.proxy_port if listener == "proxy" else quick.admin_port
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer, elapsed = trickle(sock)
    assert status_of(answer) == 408
    assert error_code(answer) == "header_timeout"
    assert elapsed < 3


@pytest.mark.parametrize("listener", ["proxy", "admin"])
def test_a_slowloris_head_after_an_answered_request_is_408(
    quick: RunningBroker, listener: str
) -> None:
    """The next head on a kept-alive connection has its own clock, started by its first bytes
    (whatever arrived whole before it needed none)."""
    port = quick.proxy_port if listener == "proxy" else quick.admin_port
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer, elapsed = trickle(sock)
    assert status_of(answer) == 408
    assert error_code(answer) == "header_timeout"
    assert elapsed < 3


@pytest.mark.parametrize("listener", ["proxy", "admin"])
def test_a_connection_that_sends_nothing_is_closed(quick: RunningBroker, listener: str) -> None:
    port = quick.proxy_port if listener == "proxy" else quick.admin_port
    with connect(port) as sock:
        assert read_answer(sock, deadline=5) == b""


def test_blank_lines_between_requests_do_not_keep_a_connection(quick: RunningBroker) -> None:
    with connect(quick.admin_port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        # Blank lines before a request are allowed, and each resets the idle timer; they
        # must not reset the head timer too.
        started = time.monotonic()
        sock.settimeout(0.1)
        answer = None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while answer is None and time.monotonic() - started < 5:
                sock.sendall(b"\r\n")
                with contextlib.suppress(TimeoutError):
                    answer = sock.recv(65536)
        elapsed = time.monotonic() - started
    assert answer is not None
    assert answer == b"" or status_of(answer) == 408
    assert elapsed < 3


def test_an_admin_body_that_never_arrives_is_408(quick: RunningBroker) -> None:
    with connect(quick.admin_port) as sock:
        sock.sendall(
            b"PUT /v1/tenants/acme/key HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {quick.token}\r\n".encode()
            + b'Content-Length: 100\r\n\r\n{"api_key": '
        )
        started = time.monotonic()
        answer = read_answer(sock)
    assert status_of(answer) == 408
    assert error_code(answer) == "request_timeout"
    assert time.monotonic() - started < 3


def test_an_idle_keep_alive_connection_is_closed(quick: RunningBroker) -> None:
    with connect(quick.admin_port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert read_answer(sock) == b""
        assert time.monotonic() - started < 3


def test_a_busy_keep_alive_connection_outlives_the_idle_timeout_then_closes(
    quick: RunningBroker,
) -> None:
    """Requests back to back for longer than the idle timeout (0.5 s) keep the connection;
    once they stop, it is closed after the idle timeout."""
    with connect(quick.admin_port) as sock:
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < 1.3:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            answered += 1
        idle = time.monotonic()
        assert read_answer(sock) == b""
        closed_after = time.monotonic() - idle
    assert answered > 2
    assert 0.3 < closed_after < 3


def test_a_slow_but_steady_client_is_served(quick: RunningBroker) -> None:
    # The head timeout bounds the head, not each request: a connection that completes its
    # heads in time keeps working across several requests.
    with httpx.Client(base_url=quick.admin_url) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200


# -- connection caps and the open-file limit -------------------------------------------------------


def test_the_proxy_refuses_beyond_its_cap_while_the_admin_listener_answers(
    make_broker: Callable[..., RunningBroker],
) -> None:
    broker = make_broker(proxy_max_connections=20, admin_max_connections=5, header_timeout=30)
    idle = [connect(broker.proxy_port) for _ in range(20)]
    try:
        with connect(broker.proxy_port) as extra:
            extra.sendall(b"GET /v3/export-jobs HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_answer(extra)
        assert status_of(answer) == 503
        assert error_code(answer) == "too_many_connections"
        for _ in range(3):
            assert httpx.get(broker.admin_url + "/healthz").status_code == 200
            assert httpx.get(broker.admin_url + "/readyz").status_code == 200
    finally:
        for sock in idle:
            sock.close()
    # Once the idle sockets are gone, the proxy serves again.
    deadline = time.monotonic() + 5
    while True:
        response = httpx.get(broker.proxy_url + "/v3/export-jobs")
        if response.status_code != 503 or time.monotonic() > deadline:
            break
    assert response.json()["error"]["code"] == "tenant_missing"


def test_refusals_are_logged_at_most_once_a_second_per_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RefusalLog("proxy", every=60)
    for _ in range(1000):
        log.note("too_many_connections", "127.0.0.1")
    log.note("header_timeout", "127.0.0.1")
    lines = [r for r in caplog.records if getattr(r, "event", None) == "listener.refused"]
    assert [r.fields["code"] for r in lines] == [  # type: ignore[attr-defined]
        "too_many_connections",
        "header_timeout",
    ]
    log.every = 0
    log.note("too_many_connections", "127.0.0.1")
    assert caplog.records[-1].fields["count"] == 1000  # type: ignore[attr-defined]


def test_the_admin_listener_pushes_out_idle_sockets_for_its_probes(
    make_broker: Callable[..., RunningBroker],
) -> None:
    broker = make_broker(admin_max_connections=3, header_timeout=30)
    idle = [connect(broker.admin_port) for _ in range(3)]
    half = connect(broker.admin_port)
    half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
    try:
        for _ in range(5):
            assert httpx.get(broker.admin_url + "/healthz").status_code == 200
        # The oldest idle sockets were closed to make room.
        assert read_answer(idle[0]) == b""
    finally:
        for sock in [*idle, half]:
            sock.close()


def test_the_admin_listener_refuses_when_every_connection_is_busy(
    make_broker: Callable[..., RunningBroker],
) -> None:
    broker = make_broker(admin_max_connections=3, header_timeout=30)
    busy = []
    for _ in range(3):
        # A key submission whose body is still on its way is a request in flight.
        sock = connect(broker.admin_port)
        sock.sendall(
            b"PUT /v1/tenants/acme/key HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {broker.token}\r\n".encode()
            + b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            + b"Content-Length: 50\r\n\r\n"
        )
        busy.append(sock)
        # The interim answer comes once the app waits for the body: the request is in flight
        # (before it, the connection would count as idle and could be pushed out).
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
    try:
        deadline = time.monotonic() + 5
        while True:
            with connect(broker.admin_port) as extra:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = read_answer(extra)
            if b"too_many_connections" in answer or time.monotonic() > deadline:
                break
        assert error_code(answer) == "too_many_connections"
    finally:
        for sock in busy:
            sock.close()


def test_caps_shrink_to_fit_the_open_file_limit() -> None:
    settings = Settings(proxy_max_connections=4096, admin_max_connections=64)
    assert connection_caps(settings, 1_048_576) == (4096, 64)
    assert connection_caps(settings, 1024) == ((1024 - 64) // 2, 64)
    assert connection_caps(settings, 50) == (16, 64)


def test_the_soft_file_limit_is_raised_to_the_hard_limit() -> None:
    code = (
        "import resource, sys\n"
        "from broker.server import raise_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "before, now, top = raise_file_limit()\n"
        "assert (before, now, top) == (256, hard, hard), (before, now, top)\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    _, now, hard = raise_file_limit()  # idempotent in this process
    assert now == hard


def test_a_flood_of_idle_sockets_at_a_low_file_limit_leaves_health_answering(
    tmp_path: Path,
) -> None:
    """The issue's failure: at a low open-file limit, idle sockets took every file and both
    listeners went dark. Now the proxy's cap fits the limit and /healthz keeps answering."""
    limit = 300
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_SECRETS_DIR=str(tmp_path),
        BROKER_ADMIN_TOKEN=secrets.token_hex(20),
        BROKER_STORE_PATH=str(tmp_path / "store"),
        BROKER_PROXY_PORT=str(free_port()),
        BROKER_ADMIN_PORT=str(free_port()),
        BROKER_ADMIN_MAX_CONNECTIONS="20",
        BROKER_HEADER_TIMEOUT="60",
        BROKER_LOG_FORMAT="json",
    )

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=low_limit,
    )
    sockets: list[socket.socket] = []
    try:
        events = wait_for_event(process, "broker.started")
        limits = next(e for e in events if e["event"] == "broker.file_limit")
        assert limits["soft"] == limit
        assert limits["proxy_max_connections"] == (limit - 20) // 2
        admin_url = f"http://127.0.0.1:{env['BROKER_ADMIN_PORT']}"
        for _ in range(limit + 50):
            try:
                sockets.append(connect(int(env["BROKER_PROXY_PORT"])))
            except OSError:
                break
        for _ in range(3):
            assert httpx.get(admin_url + "/healthz", timeout=5).status_code == 200
    finally:
        for sock in sockets:
            sock.close()
        process.terminate()
        process.wait(timeout=30)
        assert process.stdout is not None
        process.stdout.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_event(process: subprocess.Popen[str], name: str) -> list[dict[str, Any]]:
    """The JSON events `process` printed up to and including the first `name`."""
    assert process.stdout is not None
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"the broker exited: {events}")
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
            if events[-1].get("event") == name:
                return events
    raise AssertionError(f"no {name} event: {events}")


# -- shutdown ----------------------------------------------------------------------------------


class HangingUpstream(RecordingUpstream):
    """Pleo that never answers `/v3/export-jobs/hang/items` (until the caller goes away)."""

    def __init__(self) -> None:
        super().__init__()
        self.hanging = 0

    async def __call__(self, scope: Any, receive: Callable[..., Any], send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v3/export-jobs/hang/items":
            self.hanging += 1
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        if scope["type"] == "http" and scope["path"] == "/v3/export-jobs/slow/items":
            self.hanging += 1
            await asyncio.sleep(0.5)
            body = b'{"data": "late but here"}'
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        await super().__call__(scope, receive, send)


@pytest.fixture
def hanging(tmp_path: Path) -> Iterator[tuple[HangingUpstream, Callable[..., RunningBroker]]]:
    upstream = HangingUpstream()
    url, thread = start_app(upstream)
    started: list[RunningBroker] = []

    def make(**overrides: Any) -> RunningBroker:
        company = str(uuid.uuid4())
        key = "pik_" + secrets.token_hex(20)
        upstream.add_key(key, company, REQUIRED)
        settings = broker_settings(
            url, tmp_path / f"store-{len(started)}", required_scopes=REQUIRED, **overrides
        )
        broker = start_broker(settings)
        started.append(broker)
        response = httpx.put(
            f"{broker.admin_url}/v1/tenants/acme/key", json={"api_key": key}, headers=broker.auth
        )
        assert response.status_code == 200, response.text
        return broker

    try:
        yield upstream, make
    finally:
        for broker in started:
            broker.thread.stop()
        thread.stop()


def test_shutdown_with_a_hanging_pleo_call_ends_after_the_drain(
    hanging: tuple[HangingUpstream, Callable[..., RunningBroker]],
) -> None:
    upstream, make = hanging
    broker = make(upstream_timeout=60.0, shutdown_drain_seconds=1.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            httpx.get,
            broker.proxy_url + "/v3/export-jobs/hang/items",
            headers={"X-Broker-Tenant": "acme"},
            timeout=30,
        )
        deadline = time.monotonic() + 5
        while upstream.hanging == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert upstream.hanging == 1
        started = time.monotonic()
        broker.thread.stop()
        stopped = time.monotonic() - started
        response = call.result(timeout=10)
    assert stopped < 1.0 + 2.5, stopped
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"


def test_shutdown_waits_for_a_request_that_finishes_within_the_drain(
    hanging: tuple[HangingUpstream, Callable[..., RunningBroker]],
) -> None:
    upstream, make = hanging
    broker = make(shutdown_drain_seconds=10.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # This one answers after 0.5 s: well within the drain, so it is answered, not cut.
        call = pool.submit(
            httpx.get,
            broker.proxy_url + "/v3/export-jobs/slow/items",
            headers={"X-Broker-Tenant": "acme"},
            timeout=30,
        )
        deadline = time.monotonic() + 5
        while upstream.hanging == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        broker.thread.stop()
        response = call.result(timeout=10)
    assert response.status_code == 200
    assert response.json() == {"data": "late but here"}


def test_drain_is_a_setting_with_a_default_below_the_charts_grace_period() -> None:
    assert Settings().shutdown_drain_seconds == 20.0


# -- upgrades ------------------------------------------------------------------------------------


UPGRADES = {
    "websocket": b"GET /v3/export-jobs HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n",
    "h2c": b"GET /v3/export-jobs HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n"
    b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    "connect": b"CONNECT external.pleo.io:443 HTTP/1.1\r\nHost: external.pleo.io:443\r\n\r\n",
}


@pytest.mark.parametrize("upgrade", sorted(UPGRADES))
@pytest.mark.parametrize("listener", ["proxy", "admin"])
def test_an_upgrade_is_answered_as_plain_http_and_closed(
    broker: RunningBroker, listener: str, upgrade: str
) -> None:
    port = broker.proxy_port if listener == "proxy" else broker.admin_port
    with connect(port) as sock:
        sock.sendall(UPGRADES[upgrade] + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_answer(sock)
    assert status_of(answer) in {400, 403, 404, 405}, answer
    assert b"application/json" in answer.partition(b"\r\n\r\n")[0]
    assert answer.count(b"HTTP/1.1 ") == 1  # nothing after the upgrade request is read


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /v3/export-jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    ],
    ids=["garbage", "two-lengths", "bad-chunk", "bad-name"],
)
@pytest.mark.parametrize("listener", ["proxy", "admin"])
def test_malformed_http_is_a_json_400(
    broker: RunningBroker, listener: str, request_bytes: bytes
) -> None:
    port = broker.proxy_port if listener == "proxy" else broker.admin_port
    with connect(port) as sock:
        sock.sendall(request_bytes)
        answer = read_answer(sock)
    # A bad chunk arrives after the head: the app may have answered first, then the
    # connection closes; otherwise the listener answers before any app sees the request.
    assert answer.startswith(b"HTTP/1.1 4"), answer
    if b"request_malformed" not in answer:
        assert request_bytes.startswith(b"POST"), answer


@pytest.mark.parametrize(
    "body",
    [b'5\r\n{"api\r\nzz\r\n', b'5\r\n{"api\r\n3\r\nabcdef'],
    ids=["bad-size", "overlong-chunk"],
)
def test_a_body_that_breaks_off_mid_request_is_answered_at_once(
    broker: RunningBroker, body: bytes
) -> None:
    """The app is waiting for the body: it must learn at once that none will come, not
    after a timeout (and the proxy must not forward what it has as if it were whole)."""
    with connect(broker.admin_port) as sock:
        sock.sendall(
            b"PUT /v1/tenants/acme/key HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {broker.token}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + body
        )
        started = time.monotonic()
        answer = read_answer(sock)
    assert status_of(answer) == 400, answer
    assert error_code(answer) == "request_malformed"
    assert time.monotonic() - started < 2
