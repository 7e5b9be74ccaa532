"""Webhooks (docs/contract.md, "Webhooks"): every event reaches a real receiver on 127.0.0.1,
signed (verified with PyPI `standardwebhooks`), at least once, in order per tenant, retried
after failures and given up after the last retry; a `tenant.broken` webhook carries a working
reconnect link; a hanging receiver costs the proxy nothing. Delivery across a SIGKILL and
across two replicas on one OpenBao: tests/test_webhook_processes.py."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support.inprocess import MemoryStore
from support.openbao_server import OpenBao
from support.servers import (
    REQUIRED_SCOPES,
    RunningBroker,
    RunningSandbox,
    broker_settings,
    start_app,
    start_broker,
)
from support.webhook_receiver import (
    Receiver,
    check_delivered_in_order,
    feed,
    make_changes,
    metric,
    new_secret,
    wait_until,
)

from broker import errors
from broker.connect_sessions import ConnectSessions
from broker.events import LOGGER_NAME, JsonFormatter
from broker.metrics import Metrics
from broker.outbox import new_event
from broker.records import ApiKey, TenantRecord, TenantState
from broker.settings import ConfigError, load_settings
from broker.webhooks import Reconnect, Webhooks, retry_delay, sign, signed_headers

PUBLIC = "https://connect.example.com"
QUICK = "0.2s,0.2s,0.2s,0.2s,0.2s,0.2s"  # retries a test waits for


def webhook_overrides(receiver: Receiver, **more: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "webhook_url": receiver.url,
        "webhook_secret": receiver.secret,
        "webhook_timeout": 5.0,
        "webhook_retry_schedule": QUICK,
    }
    values.update(more)
    return values


def admin_client(broker: RunningBroker) -> httpx.Client:
    return httpx.Client(base_url=broker.admin_url, headers=broker.auth, trust_env=False, timeout=10)


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BROKER_WEBHOOK_URL": "app.example.com/hooks"}, "BROKER_WEBHOOK_URL: must be an http"),
        ({"BROKER_WEBHOOK_URL": "ftp://app.example.com"}, "BROKER_WEBHOOK_URL: must be an http"),
        ({"BROKER_WEBHOOK_URL": "https://app:abc/x"}, "BROKER_WEBHOOK_URL: Invalid port: 'abc'"),
        ({"BROKER_WEBHOOK_URL": "https://u:pw@app:99999/"}, "BROKER_WEBHOOK_URL: the port must be"),
        (
            {"BROKER_WEBHOOK_URL": "https://app.example.com/hooks"},
            "BROKER_WEBHOOK_SECRET is required when BROKER_WEBHOOK_URL is set",
        ),
        ({"BROKER_WEBHOOK_SECRET": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}, "must start with whsec_"),
        ({"BROKER_WEBHOOK_SECRET": "whsec_not base64!"}, "whsec_ followed by valid base64"),
        ({"BROKER_WEBHOOK_SECRET": "whsec_c2hvcnQ="}, "must decode to 24 to 64 bytes"),
        ({"BROKER_WEBHOOK_RETRY_SCHEDULE": "5s,soon"}, "durations separated by commas"),
        ({"BROKER_WEBHOOK_RETRY_SCHEDULE": "5s,0s"}, "each above zero"),
        ({"BROKER_WEBHOOK_RETRY_SCHEDULE": "5s,inf"}, "each above zero"),
        ({"BROKER_WEBHOOK_RETRY_SCHEDULE": "nan"}, "each above zero"),
        ({"BROKER_WEBHOOK_TIMEOUT": "0"}, "BROKER_WEBHOOK_TIMEOUT"),
    ],
)
def test_bad_webhook_settings_are_refused_plainly(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None)
    assert message in str(caught.value)
    secret = env.get("BROKER_WEBHOOK_SECRET")
    if secret:
        assert secret not in str(caught.value)


def test_webhook_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = new_secret()
    monkeypatch.setenv("BROKER_WEBHOOK_URL", "https://app.example.com/hooks")
    monkeypatch.setenv("BROKER_WEBHOOK_SECRET", secret + "\n")  # as a Secret's file ends
    monkeypatch.setenv("BROKER_WEBHOOK_RETRY_SCHEDULE", "250ms, 5s,2m,1h,7.5")
    settings = load_settings(_env_file=None)
    assert settings.webhook_retry_schedule == (0.25, 5.0, 120.0, 3600.0, 7.5)
    assert settings.webhook_key() == Webhook(secret)._whsecret
    assert secret not in repr(settings)


def test_the_default_retry_schedule_is_the_contracts(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(_env_file=None)
    assert settings.webhook_url is None
    hours = [seconds / 3600 for seconds in settings.webhook_retry_schedule]
    assert hours == [5 / 3600, 5 / 60, 0.5, 2, 5, 10, 10]


# -- signing and the schedule ------------------------------------------------------------------


def test_a_signature_verifies_with_standardwebhooks() -> None:
    secret = new_secret()
    body = json.dumps({"id": "evt_1", "type": "tenant.broken"}).encode()
    headers = signed_headers(Webhook(secret)._whsecret, "evt_1", body, int(time.time()))
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"broken", b"fine__"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_the_signature_is_the_specifications_example() -> None:
    # The example of the Standard Webhooks specification (spec/standard-webhooks.md).
    key = Webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")._whsecret
    body = b'{"test": 2432232314}'
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_retries_follow_the_schedule_with_jitter_then_stop() -> None:
    schedule = (5.0, 300.0)
    first = [retry_delay(schedule, 1) for _ in range(200)]
    assert all(d is not None and 4.5 <= d <= 5.5 for d in first)
    assert len({round(d or 0, 6) for d in first}) > 1  # jittered
    second = retry_delay(schedule, 2)
    assert second is not None and 270 <= second <= 330
    assert retry_delay(schedule, 3) is None


# -- delivery ----------------------------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("vault", marks=pytest.mark.real)])
def store_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "local":
        return {}
    bao: OpenBao = request.getfixturevalue("openbao")
    return {
        "store": "vault",
        "vault_addr": bao.addr,
        "vault_token": bao.root_token,
        "vault_prefix": f"hooks-{secrets.token_hex(4)}",
    }


@pytest.fixture
def start(sandbox: RunningSandbox, tmp_path: Path) -> Iterator[Callable[..., RunningBroker]]:
    """Start a broker on any store (make_broker takes only a store object)."""
    started: list[RunningBroker] = []

    def make(**overrides: Any) -> RunningBroker:
        overrides.setdefault("required_scopes", REQUIRED_SCOPES)
        path = tmp_path / f"store-{len(started)}"
        started.append(start_broker(broker_settings(sandbox.url, path, **overrides)))
        return started[-1]

    yield make
    for broker in started:
        broker.thread.stop()


def test_failed_deliveries_arrive_once_retried_in_order_per_tenant(
    start: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    receiver: Receiver,
    store_overrides: dict[str, Any],
) -> None:
    receiver.fail_first(4)
    broker = start(**webhook_overrides(receiver), **store_overrides)
    with admin_client(broker) as admin:
        make_changes(admin, sandbox)
        events = feed(admin)
    assert len(events) == 6
    wait_until(
        lambda: len({e["id"] for e in receiver.delivered()}) == len(events),
        within=20,
        what="every event delivered",
    )
    check_delivered_in_order(receiver, events)
    failed = [item for item in receiver.requests() if item.status >= 300]
    assert len(failed) == 4
    assert all(item.headers["webhook-id"] == item.event["id"] for item in failed)
    wait_until(
        lambda: metric(broker, "broker_webhook_pending") == 0, within=10, what="nothing pending"
    )
    assert metric(broker, "broker_webhook_deliveries_total", result="retried") == 4
    assert metric(broker, "broker_webhook_deliveries_total", result="delivered") >= len(events)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


def test_after_the_last_retry_the_event_is_given_up_and_the_next_goes_on(
    make_broker: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    receiver: Receiver,
    captured_logs: io.StringIO,
) -> None:
    receiver.fail_first(3, status=503)  # the first attempt and both retries
    broker = make_broker(**webhook_overrides(receiver, webhook_retry_schedule="0.1s,0.1s"))
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    with admin_client(broker) as admin:
        assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).is_success
        assert admin.delete("/v1/tenants/acme").is_success
        activated, disconnected = feed(admin)
    wait_until(receiver.delivered, within=10, what="the second event")
    assert [e["id"] for e in receiver.delivered()] == [disconnected["id"]]
    assert [item.event["id"] for item in receiver.requests()] == [activated["id"]] * 3 + [
        disconnected["id"]
    ]
    assert metric(broker, "broker_webhook_deliveries_total", result="given_up") == 1
    logged = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    failed = [line for line in logged if line["event"] == "webhook.failed"]
    assert len(failed) == 1
    assert failed[0]["event_id"] == activated["id"]
    assert failed[0]["tenant"] == "acme"
    assert failed[0]["attempts"] == 3
    assert failed[0]["reason"] == "status 503"
    logs = captured_logs.getvalue()
    assert receiver.secret not in logs and receiver.secret.removeprefix("whsec_") not in logs
    assert key.api_key not in logs


def test_no_webhook_url_sends_nothing_and_keeps_no_deliverer(
    broker: RunningBroker, sandbox: RunningSandbox, receiver: Receiver
) -> None:
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    with admin_client(broker) as admin:
        assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).is_success
        assert feed(admin)
    assert metric(broker, "broker_webhook_pending") == 0
    assert receiver.requests() == []


# -- tenant.broken carries a reconnect link ----------------------------------------------------


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found[1]


def test_a_broken_webhook_carries_a_link_that_reconnects_the_tenant(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, receiver: Receiver
) -> None:
    broker = make_broker(**webhook_overrides(receiver), connect_public_url=PUBLIC, connect_port=0)
    assert broker.connect_url is not None
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    with admin_client(broker) as admin:
        assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).is_success
        sandbox.state.revoke(key.key_id)
        proxied = httpx.get(
            f"{broker.proxy_url}/v3/export-jobs",
            headers={"X-Broker-Tenant": "acme"},
            trust_env=False,
        )
        assert proxied.status_code == 424  # the 401 broke the tenant

        def broken() -> list[dict[str, Any]]:
            return [e for e in receiver.delivered() if e["type"] == "tenant.broken"]

        webhook = wait_until(broken, within=10, what="the tenant.broken webhook")[0]
        assert webhook["actor"] == "proxy"
        link = webhook["data"]["reconnect_url"]
        assert link.startswith(PUBLIC + "/connect/")
        # The feed never carries the link: its token is made at delivery and kept nowhere.
        in_feed = next(e for e in feed(admin) if e["id"] == webhook["id"])
        assert "reconnect_url" not in in_feed["data"]

        # The customer follows the link and submits a new key of the same company.
        with httpx.Client(base_url=broker.connect_url, trust_env=False, timeout=10) as page:
            path = link.removeprefix(PUBLIC)
            opened = page.get(path)
            assert opened.status_code == 200
            assert "acme" in opened.text or "Pleo" in opened.text
            fresh = sandbox.state.create_key(key.company_id, scopes=REQUIRED_SCOPES)
            sent = page.post(
                path, data={"api_key": fresh.api_key, "csrf_token": csrf_of(opened.text)}
            )
            assert sent.status_code == 200, sent.text
        recovered = wait_until(
            lambda: [e for e in receiver.delivered() if e["type"] == "tenant.recovered"],
            within=10,
            what="the tenant.recovered webhook",
        )
        assert recovered[0]["data"]["state"] == "active"
        assert admin.get("/v1/tenants/acme").json()["state"] == "active"


def test_a_tenant_no_longer_broken_at_delivery_gets_no_link(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, receiver: Receiver
) -> None:
    receiver.hang = True  # hold the first delivery until the tenant has recovered
    broker = make_broker(**webhook_overrides(receiver), connect_public_url=PUBLIC, connect_port=0)
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    with admin_client(broker) as admin:
        assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).is_success
        sandbox.state.revoke(key.key_id)
        assert admin.post("/v1/tenants/acme/check").json()["state"] == "broken"
        fresh = sandbox.state.create_key(key.company_id, scopes=REQUIRED_SCOPES)
        assert admin.put("/v1/tenants/acme/key", json={"api_key": fresh.api_key}).is_success
    receiver.hang = False
    broken = wait_until(
        lambda: [e for e in receiver.delivered() if e["type"] == "tenant.broken"],
        within=10,
        what="the tenant.broken webhook",
    )
    assert "reconnect_url" not in broken[0]["data"]


# -- a slow receiver ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_hanging_receiver_does_not_slow_proxied_calls(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox, receiver: Receiver
) -> None:
    broker = make_broker(**webhook_overrides(receiver, webhook_timeout=30.0))
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    with (
        admin_client(broker) as admin,
        httpx.Client(
            base_url=broker.proxy_url, headers={"X-Broker-Tenant": "acme"}, trust_env=False
        ) as proxy,
    ):
        assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).is_success
        wait_until(receiver.delivered, within=10, what="the first webhook")

        def timed_calls() -> list[float]:
            took = []
            for _ in range(20):
                started = time.perf_counter()
                assert proxy.get("/v3/export-jobs").status_code == 200
                assert admin.get("/v1/tenants/acme").status_code == 200
                took.append(time.perf_counter() - started)
            return took

        before = timed_calls()
        receiver.hang = True
        other = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
        assert admin.put("/v1/tenants/beta/key", json={"api_key": other.api_key}).is_success
        wait_until(lambda: receiver.waiting, within=10, what="a delivery to hang")
        during = timed_calls()
        assert receiver.waiting  # still hanging all along
        receiver.hang = False
    # Calls stalled behind the delivery would take its 30 s timeout; allow noise, not that.
    assert statistics.median(during) < max(0.5, 10 * statistics.median(before))
    assert sum(during) < 15


# -- the README's receiver ---------------------------------------------------------------------


def readme_receiver() -> str:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Receiving webhooks", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found, "no python example under Receiving webhooks"
    return found[1]


def test_the_readme_receiver_verifies_and_takes_the_brokers_webhooks(
    make_broker: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = new_secret()
    monkeypatch.setenv("BROKER_WEBHOOK_SECRET", secret)
    example: dict[str, Any] = {"__name__": "receiver"}
    exec(compile(readme_receiver(), "README.md", "exec"), example)
    url, thread = start_app(example["app"])
    try:
        hook = f"{url}/pleo/webhooks"
        forged = httpx.post(
            hook,
            content=b'{"id": "evt_x"}',
            headers={
                "webhook-id": "evt_x",
                "webhook-timestamp": str(int(time.time())),
                "webhook-signature": "v1,AAAA",
            },
            trust_env=False,
        )
        assert forged.status_code == 400
        broker = make_broker(
            webhook_url=hook,
            webhook_secret=secret,
            webhook_retry_schedule=QUICK,
            connect_public_url=PUBLIC,
            connect_port=0,
        )
        key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
        with admin_client(broker) as admin:
            assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).is_success
            sandbox.state.revoke(key.key_id)
            assert admin.post("/v1/tenants/acme/check").json()["state"] == "broken"
            events = feed(admin)
        wait_until(
            lambda: example["seen"] == {event["id"] for event in events},
            within=10,
            what="the README's receiver to take every event",
        )
        assert f"Mail the customer of acme: reconnect Pleo at {PUBLIC}/connect/" in (
            capsys.readouterr().out
        )
        assert metric(broker, "broker_webhook_deliveries_total", result="retried") == 0
    finally:
        thread.stop()


# -- the deliverer's own failures (in process) -------------------------------------------------


def deliverer(
    store: MemoryStore, handler: Callable[[httpx.Request], httpx.Response], **more: Any
) -> Webhooks:
    settings = broker_settings(
        "https://pleo.invalid",
        Path("unused"),
        webhook_url="https://hooks.example.test/in",
        webhook_secret=new_secret(),
        **more,
    )
    return Webhooks(settings, store, Metrics(), transport=httpx.MockTransport(handler))


def tenant(state: TenantState) -> TenantRecord:
    return TenantRecord(
        tenant="acme",
        state=state,
        api_key=ApiKey("pls_" + secrets.token_hex(16)),
        updated_at=datetime.now(UTC),
    )


async def test_a_store_that_fails_delays_delivery_and_loses_nothing(
    memory_store: MemoryStore, captured_logs: io.StringIO
) -> None:
    record = tenant(TenantState.ACTIVE)
    written = new_event("tenant.activated", "admin", record.view())
    await memory_store.put(record, events=[written])
    sent: list[str] = []

    def take(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["id"])
        return httpx.Response(204)

    hooks = deliverer(memory_store, take)
    memory_store.down = True
    hooks.start()
    try:
        await wait_async(lambda: "webhook.store_failed" in captured_logs.getvalue())
        assert sent == []
        memory_store.down = False  # the loop goes on by itself
        await wait_async(lambda: sent == [written.id])
    finally:
        await hooks.stop()
    assert await memory_store.pending_deliveries() == 0


async def test_store_failures_back_off_and_are_logged_when_the_state_changes(
    memory_store: MemoryStore, captured_logs: io.StringIO
) -> None:
    hooks = deliverer(memory_store, lambda request: httpx.Response(204))
    waits: list[float] = []
    enough = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        memory_store.down = len(waits) < 9  # the store is back after 9 failed rounds
        if len(waits) == 12:
            enough.set()
        await asyncio.sleep(0)

    hooks._sleep = sleep
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.setLevel(logging.INFO)  # to see webhook.store_recovered
    memory_store.down = True
    hooks.start()
    try:
        await asyncio.wait_for(enough.wait(), timeout=10)
    finally:
        await hooks.stop()
        logger.setLevel(level)
    assert waits[:9] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert all(wait <= 1 for wait in waits[9:])  # polling as usual again
    logged = [json.loads(line)["event"] for line in captured_logs.getvalue().splitlines()]
    assert logged.count("webhook.store_failed") == 1
    assert logged.count("webhook.store_recovered") == 1


async def test_a_settlement_the_store_ignored_is_not_counted(memory_store: MemoryStore) -> None:
    record = tenant(TenantState.ACTIVE)
    await memory_store.put(record, events=[new_event("tenant.activated", "admin", record.view())])
    hooks = deliverer(memory_store, lambda request: httpx.Response(500))

    async def ignore(holder: str, settled: Any, *, now: datetime) -> list[str]:
        return []  # the lease had moved to another replica

    memory_store.settle_deliveries = ignore  # type: ignore[method-assign]
    try:
        assert await hooks.deliver_once() is True
        counted = hooks.metrics.webhook_deliveries.labels(result="retried")._value.get()
        assert counted == 0
    finally:
        await hooks.stop()


async def test_retries_of_a_broken_webhook_reuse_one_reconnect_link(
    memory_store: MemoryStore,
) -> None:
    record = tenant(TenantState.BROKEN)
    written = new_event("tenant.broken", "proxy", record.view())
    await memory_store.put(record, events=[written])
    links: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        links.append(json.loads(request.content)["data"]["reconnect_url"])
        return httpx.Response(503)

    settings = broker_settings("https://pleo.invalid", Path("unused"), connect_public_url=PUBLIC)
    hooks = deliverer(memory_store, refuse, webhook_retry_schedule="1ms,1ms,1ms")
    hooks.reconnect = Reconnect(memory_store, ConnectSessions(memory_store, settings))
    made = 0
    put_session = memory_store.put_session

    async def count(session: Any) -> Any:
        nonlocal made
        made += 1
        return await put_session(session)

    memory_store.put_session = count  # type: ignore[method-assign]
    try:
        deadline = time.monotonic() + 5
        while len(links) < 3:
            assert time.monotonic() < deadline, "the retries never came"
            if not await hooks.deliver_once():
                await asyncio.sleep(0.01)
    finally:
        await hooks.stop()
    assert made == 1
    assert len(set(links)) == 1 and links[0].startswith(PUBLIC + "/connect/")


async def test_stopping_lets_the_attempt_in_flight_finish_and_settle(
    memory_store: MemoryStore,
) -> None:
    record = tenant(TenantState.ACTIVE)
    await memory_store.put(record, events=[new_event("tenant.activated", "admin", record.view())])
    arrived, answer = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        arrived.set()
        await answer.wait()
        return httpx.Response(204)

    settings = broker_settings(
        "https://pleo.invalid",
        Path("unused"),
        webhook_url="https://hooks.example.test/in",
        webhook_secret=new_secret(),
    )
    hooks = Webhooks(settings, memory_store, Metrics(), transport=httpx.MockTransport(slow))
    hooks.start()
    await asyncio.wait_for(arrived.wait(), timeout=5)
    released: list[str] = []
    release = memory_store.release_deliveries

    async def remember(holder: str, *, now: datetime) -> None:
        released.append(holder)
        await release(holder, now=now)

    memory_store.release_deliveries = remember  # type: ignore[method-assign]
    stopping = asyncio.create_task(hooks.stop())
    for _ in range(50):
        await asyncio.sleep(0)  # let stop() run as far as it goes
    assert not stopping.done()  # waiting for the receiver's answer
    answer.set()
    await asyncio.wait_for(stopping, timeout=5)
    assert await memory_store.pending_deliveries() == 0  # delivered and settled
    assert released == [hooks.holder]  # the lease given back: another process goes on at once


async def test_an_unexpected_error_of_one_attempt_fails_only_that_attempt(
    memory_store: MemoryStore, captured_logs: io.StringIO
) -> None:
    acme, beta = tenant(TenantState.ACTIVE), tenant(TenantState.ACTIVE)
    beta = dataclasses.replace(beta, tenant="beta")
    written = [new_event("tenant.activated", "admin", r.view()) for r in (acme, beta)]
    for record, item in zip((acme, beta), written, strict=True):
        await memory_store.put(record, events=[item])
    sent: list[str] = []

    def take(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["data"]["tenant"] == "acme":
            raise RuntimeError("the transport broke")
        sent.append(body["id"])
        return httpx.Response(204)

    hooks = deliverer(memory_store, take, webhook_retry_schedule="1h")
    try:
        assert await hooks.deliver_once() is True
        assert sent == [written[1].id]
        assert await memory_store.pending_deliveries() == 1  # acme's, retried later
        logged = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
        retried = [r for r in logged if r.get("event") == "webhook.retry_scheduled"]
        assert [r["reason"] for r in retried] == ["RuntimeError"]
        assert "the transport broke" not in captured_logs.getvalue()
    finally:
        await hooks.stop()


async def test_a_broken_webhook_goes_out_without_a_link_the_store_cannot_make(
    memory_store: MemoryStore,
) -> None:
    record = tenant(TenantState.BROKEN)
    written = new_event("tenant.broken", "proxy", record.view())
    await memory_store.put(record, events=[written])
    bodies: list[dict[str, Any]] = []

    def take(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200)

    settings = broker_settings("https://pleo.invalid", Path("unused"), connect_public_url=PUBLIC)
    sessions = ConnectSessions(memory_store, settings)
    hooks = deliverer(memory_store, take)
    hooks.reconnect = Reconnect(memory_store, sessions)

    async def refuse(session: Any) -> Any:
        raise errors.StoreUnavailable("the store is down")

    memory_store.put_session = refuse  # type: ignore[method-assign]
    try:
        assert await hooks.deliver_once() is True
        assert bodies[0]["id"] == written.id
        assert "reconnect_url" not in bodies[0]["data"]
        assert await memory_store.pending_deliveries() == 0  # delivered all the same
    finally:
        await hooks.stop()


async def wait_async(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
