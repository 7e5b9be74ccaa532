"""What the connect page says about a session's tenant: its state, company and key hint.

The company's name is shown when the tenant's key may read `GET /v1/companies/{id}`; asking
is best effort and bounded in time, and never fails the page.
"""

from __future__ import annotations

import asyncio

from broker import errors
from broker.connect_pages import Page, Words
from broker.connect_sessions import ConnectSession
from broker.records import TenantRecord, TenantState
from broker.runtime import Broker

COMPANY_NAME_TIMEOUT = 3.0


async def describe(
    broker: Broker, session: ConnectSession, lang: str, *, record: TenantRecord | None = None
) -> Page:
    """The page for `session`'s tenant as it stands (or as `record` says)."""
    words = Words(lang, broker.settings.connect_integration_name)
    page = Page("not_connected", lang, csrf=session.csrf)
    if record is None:
        try:
            record = await broker.tenants.fetch(session.tenant)
        except errors.TenantUnknown:
            record = None
    if session.last_error is not None:
        page.state, page.alert = "failed", True
        page.heading = words("state_failed")
        page.message = words.error(session.last_error)
    if record is None or record.state is TenantState.PENDING:
        if page.message is None:
            page.message = words("state_not_connected")
        return page
    page.company_id = record.company_id
    page.key_hint = record.api_key.hint if record.api_key is not None else None
    if record.state is TenantState.BROKEN and page.state != "failed":
        page.state, page.alert = "broken", True
        page.message = f"{words.reason(record.reason)} {words('broken_help')}"
    elif record.state is TenantState.ACTIVE:
        if page.state != "failed":
            page.state, page.message = "connected", words("state_connected")
        page.company_name = await company_name(broker, record)
    return page


async def company_name(broker: Broker, record: TenantRecord) -> str | None:
    """The company's name as Pleo tells it to the tenant's key, or None."""
    if record.api_key is None or record.company_id is None:
        return None
    try:
        async with asyncio.timeout(COMPANY_NAME_TIMEOUT):
            return await broker.pleo.company_name(record.api_key, record.company_id)
    except (TimeoutError, errors.BrokerError):
        return None
