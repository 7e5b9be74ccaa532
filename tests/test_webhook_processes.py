"""Webhook delivery across real broker processes: a broker SIGKILLed with events pending
delivers them all after a restart; two brokers on one real OpenBao deliver each event once,
and when the one holding the delivery lease is killed, the other takes over."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.openbao_server import OpenBao
from support.servers import REQUIRED_SCOPES, RunningSandbox
from support.webhook_receiver import (
    Receiver,
    check_delivered_in_order,
    feed,
    make_changes,
    wait_until,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]  # real broker processes


@dataclass
class BrokerProcess:
    process: subprocess.Popen[bytes]
    log: Path
    admin_url: str
    token: str

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.admin_url,
            headers={"Authorization": f"Bearer {self.token}"},
            trust_env=False,
            timeout=10,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


def metric(broker: BrokerProcess, name: str, **labels: str) -> float:
    with broker.admin() as admin:
        text = admin.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def started_event(log: Path) -> dict[str, Any] | None:
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") == "broker.started":
                return dict(entry)
    return None


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start `python -m broker serve` with the given settings; every one is stopped at the end."""
    running: list[BrokerProcess] = []

    def start(env_settings: dict[str, str]) -> BrokerProcess:
        token = secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(
            BROKER_SECRETS_DIR=str(tmp_path),
            BROKER_ADMIN_TOKEN=token,
            BROKER_PROXY_PORT="0",
            BROKER_ADMIN_PORT="0",
            BROKER_LOG_FORMAT="json",
            BROKER_HEALTH_CHECK_INTERVAL="0",
            BROKER_REQUIRED_SCOPES=",".join(REQUIRED_SCOPES),
            BROKER_CACHE_TTL="0.5",
            **env_settings,
        )
        log = tmp_path / f"broker-{len(running)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "broker", "serve"],
                env=env,
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        found = wait_until(
            lambda: process.poll() is not None or started_event(log),
            within=30,
            what="the broker to start",
        )
        assert isinstance(found, dict), log.read_text()
        broker = BrokerProcess(process, log, f"http://{found['admin']}", token)
        running.append(broker)
        return broker

    yield start
    for broker in running:
        if broker.process.poll() is None:
            broker.process.terminate()
            broker.process.wait(timeout=30)


def webhook_env(receiver: Receiver, sandbox: RunningSandbox) -> dict[str, str]:
    return {
        "BROKER_PLEO_BASE_URL": sandbox.url,
        "BROKER_WEBHOOK_URL": receiver.url,
        "BROKER_WEBHOOK_SECRET": receiver.secret,
        "BROKER_WEBHOOK_TIMEOUT": "2",  # a lease of 5 s
        "BROKER_WEBHOOK_RETRY_SCHEDULE": "0.2s,0.2s,0.2s,0.2s,0.2s,0.2s,0.2s,0.2s,0.2s,0.2s",
    }


def test_a_killed_broker_delivers_every_pending_event_after_a_restart(
    spawn: Any, sandbox: RunningSandbox, receiver: Receiver, tmp_path: Path
) -> None:
    env = {
        **webhook_env(receiver, sandbox),
        "BROKER_STORE_PATH": str(tmp_path / "store"),
        "BROKER_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    receiver.hang = True  # nothing is delivered before the kill
    first = spawn(env)
    with first.admin() as admin:
        make_changes(admin, sandbox)
        events = feed(admin)
    wait_until(lambda: receiver.waiting, within=10, what="a delivery in flight")
    first.kill()  # mid-delivery, with every event pending
    assert receiver.delivered() == []
    receiver.hang = False
    second = spawn(env)
    wait_until(
        lambda: {e["id"] for e in receiver.delivered()} == {e["id"] for e in events},
        within=30,
        what="every event delivered after the restart",
    )
    check_delivered_in_order(receiver, events)
    assert second.process.poll() is None


def delivery_holder(bao: OpenBao, prefix: str) -> str:
    with bao.root_client() as client:
        secret = client.secrets.kv.v2.read_secret_version(
            path=f"{prefix}/delivery", mount_point="secret", raise_on_deleted_version=True
        )
    holder: str = json.loads(secret["data"]["data"]["state"])["holder"]
    return holder


def test_two_brokers_on_openbao_deliver_once_and_survive_the_lease_holder(
    spawn: Any, sandbox: RunningSandbox, receiver: Receiver, openbao: OpenBao
) -> None:
    prefix = f"hooks-{secrets.token_hex(4)}"
    env = {
        **webhook_env(receiver, sandbox),
        "BROKER_STORE": "vault",
        "BROKER_VAULT_ADDR": openbao.addr,
        "BROKER_VAULT_TOKEN": openbao.root_token,
        "BROKER_VAULT_PREFIX": prefix,
    }
    brokers = {broker.process.pid: broker for broker in (spawn(env), spawn(env))}
    some = next(iter(brokers.values()))
    with some.admin() as admin:
        make_changes(admin, sandbox)
        events = feed(admin)
    wait_until(
        lambda: (
            all(metric(b, "broker_webhook_pending") == 0 for b in brokers.values())
            and len(receiver.requests()) >= len(events)
        ),
        within=20,
        what="every event delivered",
    )
    attempts = sum(
        metric(b, "broker_webhook_deliveries_total", result=result)
        for b in brokers.values()
        for result in ("delivered", "retried")
    )
    assert attempts == len(events)
    sent = Counter(item.event["id"] for item in receiver.requests())
    assert sent == Counter({event["id"]: 1 for event in events})  # each once, by one replica
    check_delivered_in_order(receiver, events)

    # The holder dies in the middle of a delivery: the other replica delivers.
    receiver.hang = True
    key = sandbox.state.create_key(scopes=REQUIRED_SCOPES)
    with some.admin() as admin:
        assert admin.put("/v1/tenants/gamma/key", json={"api_key": key.api_key}).is_success
        assert admin.delete("/v1/tenants/gamma").is_success
        events = feed(admin)
    wait_until(lambda: receiver.waiting, within=10, what="a delivery in flight")
    holder = delivery_holder(openbao, prefix)
    pid = int(holder.split("/")[1])
    brokers.pop(pid).kill()
    receiver.hang = False
    survivor = next(iter(brokers.values()))
    wait_until(
        lambda: {e["id"] for e in receiver.delivered()} == {e["id"] for e in events},
        within=30,
        what="the survivor to deliver the rest",
    )
    check_delivered_in_order(receiver, events)
    assert int(delivery_holder(openbao, prefix).split("/")[1]) == survivor.process.pid
