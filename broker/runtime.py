"""The broker's long-lived parts, opened together and closed together.

`open_broker` is the one lifespan of the process: both listeners share what it yields.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.callers_watch import CallerGate
from broker.catalog import Catalog, load_catalog
from broker.connect_sessions import ConnectSessions, SessionStore, SessionTable
from broker.feed import pruning
from broker.health import HealthChecks
from broker.metrics import Metrics
from broker.pleo import PleoClient
from broker.rules import Requirements
from broker.settings import Settings
from broker.stores import SecretStore
from broker.stores.factory import open_store
from broker.stores.instrumented import InstrumentedStore
from broker.tenants import TenantService
from broker.upstream import Upstream
from broker.webhooks import webhooks

if TYPE_CHECKING:
    import httpx


@dataclass(frozen=True)
class Broker:
    """Everything a listener needs, handed down instead of kept in globals."""

    settings: Settings
    metrics: Metrics
    catalog: Catalog
    tenants: TenantService
    pleo: PleoClient
    upstream: Upstream
    sessions: ConnectSessions
    callers: CallerGate | None = None  # BROKER_CALLERS_FILE, watched; None: callers trusted


@contextlib.asynccontextmanager
async def open_broker(
    settings: Settings,
    *,
    store: SecretStore | None = None,
    metrics: Metrics | None = None,
    pleo_transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Broker]:
    """Open the store, the Pleo clients (control plane and data plane) and the tenant
    service; close them on exit."""
    metrics = metrics if metrics is not None else Metrics()
    catalog = load_catalog(settings.catalog_path)
    callers = (
        CallerGate(settings.callers_file, metrics=metrics)
        if settings.callers_file is not None
        else None
    )
    # Each part is closed (in reverse order) however opening a later one, or the run, ends.
    async with contextlib.AsyncExitStack() as parts:
        raw_store = store if store is not None else open_store(settings)
        parts.push_async_callback(raw_store.close)
        pleo = PleoClient(
            settings.pleo_base_url,
            connect_timeout=settings.upstream_connect_timeout,
            timeout=settings.upstream_timeout,
            transport=pleo_transport,
            proxy=(
                settings.upstream_proxy.get_secret_value()
                if settings.upstream_proxy is not None
                else None
            ),
        )
        parts.push_async_callback(pleo.aclose)
        upstream = Upstream(settings)
        parts.push_async_callback(upstream.close)
        tenants = TenantService(
            InstrumentedStore(raw_store, metrics),
            pleo,
            metrics,
            requirements=Requirements(settings.required_scopes, settings.pleo_client_id),
            cache_ttl=settings.cache_ttl,
            installation_status=settings.installation_status_on_activation,
        )
        parts.push_async_callback(tenants.registry.stop)
        await tenants.registry.start()
        await parts.enter_async_context(pruning(tenants.store, settings.event_retention_days))
        health = HealthChecks(
            tenants,
            metrics,
            interval=settings.health_check_interval,
            rate=settings.health_check_rate,
        )
        parts.push_async_callback(health.stop)
        health.start()
        if callers is not None:
            parts.push_async_callback(callers.stop)
            callers.start()
        # A store that keeps no connect sessions (a test's fake) gets this process's memory.
        session_store = raw_store if isinstance(raw_store, SessionStore) else SessionTable()
        sessions = ConnectSessions(session_store, settings)
        await parts.enter_async_context(webhooks(settings, tenants.store, metrics, sessions))
        yield Broker(
            settings=settings,
            metrics=metrics,
            catalog=catalog,
            tenants=tenants,
            pleo=pleo,
            upstream=upstream,
            sessions=sessions,
            callers=callers,
        )
