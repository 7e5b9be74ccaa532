"""Fixtures that start real things: the Pleo sandbox and the broker, on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.quick import share_tls_context
from support.servers import (
    REQUIRED_SCOPES,
    RunningBroker,
    RunningSandbox,
    ThreadedLoop,
    broker_settings,
    start_app,
    start_broker,
    start_sandbox,
)

from broker.listening import Limits

# Fixtures of the helper modules in tests/support/: a real OpenBao, the in-process layer, and a
# real Chromium.
pytest_plugins = [
    "support.openbao_server",
    "support.inprocess",
    "support.browser",
    "support.webhook_receiver",
    "support.store_replicas",
]


@pytest.fixture(scope="session", autouse=True)
def quick_servers_and_clients() -> Iterator[None]:
    """Servers on threads stop in milliseconds; clients share one TLS context (support.quick)."""
    undo = [share_tls_context()]
    yield
    for step in undo:
        step()


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    running = start_sandbox()
    try:
        yield running
    finally:
        running.thread.stop()


@pytest.fixture
def make_broker(sandbox: RunningSandbox, tmp_path: Path) -> Iterator[Callable[..., RunningBroker]]:
    started: list[RunningBroker] = []

    def make(**overrides: Any) -> RunningBroker:
        overrides.setdefault("required_scopes", REQUIRED_SCOPES)
        store = overrides.pop("store", None)
        path = overrides.pop("store_path", tmp_path / f"store-{len(started)}")
        settings = broker_settings(sandbox.url, path, **overrides)
        running = start_broker(settings, store=store)
        started.append(running)
        return running

    try:
        yield make
    finally:
        for running in started:
            running.thread.stop()


@pytest.fixture
def broker(make_broker: Callable[..., RunningBroker]) -> RunningBroker:
    return make_broker()


@pytest.fixture
def admin(broker: RunningBroker) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=broker.admin_url, headers=broker.auth, trust_env=False) as client:
        yield client


@pytest.fixture
def proxy(broker: RunningBroker) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=broker.proxy_url, trust_env=False, timeout=10) as client:
        yield client


Serve = Callable[..., int]


@pytest.fixture
def serve_app() -> Iterator[Serve]:
    """Serve an ASGI app on a listener under `Limits(**limits)`; returns its port."""
    threads: list[ThreadedLoop] = []

    def start(app: Any, **limits: Any) -> int:
        url, thread = start_app(app, Limits(**limits))
        threads.append(thread)
        return int(url.rsplit(":", 1)[1])

    yield start
    for thread in threads:
        thread.stop()
