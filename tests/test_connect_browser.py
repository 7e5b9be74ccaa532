"""The connect page (DESIGN.md §12) in a real browser: Debian's Chromium through Playwright.

A customer opens a link the integration made through the admin API, on a broker whose connect
listener is on, and pastes a sandbox key. Every state of the page is checked with axe-core
(WCAG 2.1 A/AA) and photographed at 375 and 1280 px (test-artifacts/connect/); every tab fails
on teardown if the page raised a CSP violation (support.browser). Ids and names are the page
contract of issue 10.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Page, expect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route
from support.browser import CSP_MARK, Tab, assert_accessible, check_state, screenshot
from support.servers import RunningBroker, RunningSandbox, start_app
from support.webhook_receiver import Received, Receiver, wait_until

pytestmark = pytest.mark.real

REQUIRED = ["export-jobs:read", "export-jobs:write"]
TENANT = "acme"
RETURN_ORIGIN = "https://app.example"
CSP_PREFIX = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors "
)
STATUS_OR_CODE = re.compile(r"\b(?:[1-5]\d\d|[a-z]+_[a-z_]+)\b")  # "401", "key_rejected"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Connect:
    """A broker with its connect listener on, its admin API, and the sandbox behind it."""

    broker: RunningBroker
    admin: httpx.Client
    sandbox: RunningSandbox
    url: str  # the connect listener, http://127.0.0.1:<port>

    def link(self, tenant: str = TENANT, **body: Any) -> str:
        """A new connect link for `tenant`, made as the integration makes it."""
        response = self.admin.post(f"/v1/tenants/{tenant}/connect-sessions", json=body)
        assert response.status_code == 201, response.text
        link = str(response.json()["url"])
        assert link.startswith(self.url + "/connect/"), link
        return link

    def activate(self, api_key: str, tenant: str = TENANT) -> dict[str, Any]:
        response = self.admin.put(f"/v1/tenants/{tenant}/key", json={"api_key": api_key})
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        return view

    def tenant(self, tenant: str = TENANT) -> dict[str, Any]:
        view: dict[str, Any] = self.admin.get(f"/v1/tenants/{tenant}").json()
        return view


@pytest.fixture
def connect(
    make_broker: Callable[..., RunningBroker], sandbox: RunningSandbox
) -> Iterator[Connect]:
    # The public URL is the listener itself, so links open as they are and the page's origin is
    # the one its forms post from.
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    broker = make_broker(
        connect_port=port, connect_public_url=url, connect_return_origins=RETURN_ORIGIN
    )
    assert getattr(broker, "connect_url") == url  # RunningBroker.connect_url: issue 10
    with httpx.Client(base_url=broker.admin_url, headers=broker.auth, trust_env=False) as admin:
        yield Connect(broker, admin, sandbox, url)


def expect_state(page: Page, state: str) -> None:
    expect(page.locator("main#connect")).to_have_attribute("data-state", state)


def tab_to_key_field(page: Page) -> None:
    """Move the focus with Tab alone until it is on the key field."""
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == "api-key":
            return
    pytest.fail("Tab never reaches the key field #api-key")


def submit_by_keyboard(page: Page, api_key: str) -> None:
    """Tab to the field, type the key, press Enter; returns once the answer has loaded.

    The post itself must be taken (200): a refused one (403) also shows the form again."""
    tab_to_key_field(page)
    page.keyboard.type(api_key)
    with page.expect_navigation() as navigation:
        page.keyboard.press("Enter")
    answer = navigation.value
    assert answer is not None and answer.request.method == "POST"
    assert answer.status == 200, page.locator("main").inner_text()


def assert_key_never_returned(tab: Tab, api_key: str) -> None:
    """Not in the page's source or fields, nor in any body the browser received."""
    assert api_key not in tab.page.content()
    values = tab.page.eval_on_selector_all("input", "inputs => inputs.map(i => i.value)")
    assert api_key not in "".join(values)
    assert tab.bodies, "the browser received no response"
    assert not tab.unread, tab.unread
    for url, body in tab.bodies:
        assert api_key.encode() not in body, url


def assert_actionable_failure(page: Page) -> None:
    """The failure message: an alert in plain words, no HTTP status or raw error code alone."""
    message = page.locator("#message")
    expect(message).to_have_attribute("role", "alert")
    text = message.inner_text()
    assert len(text.split()) >= 5, text
    assert not STATUS_OR_CODE.search(text), text
    assert "Traceback" not in page.content()
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#api-key")).to_have_value("")


def test_customer_connects_with_the_keyboard_alone(
    connect: Connect, open_tab: Callable[..., Tab], caplog: pytest.LogCaptureFixture
) -> None:
    """The whole way through a real form post: under `Referrer-Policy: no-referrer` Chromium
    sends `Origin: null` (with `Sec-Fetch-Site: same-origin`), which the page must accept."""
    caplog.set_level(logging.DEBUG)
    key = connect.sandbox.state.create_key(scopes=REQUIRED)
    tab = open_tab(375)
    page = tab.page
    page.goto(connect.link())
    expect_state(page, "not_connected")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    field = page.locator("#api-key")
    expect(field).to_have_attribute("type", "password")
    expect(field).to_have_attribute("autocomplete", "off")
    expect(page.locator("label[for='api-key']")).to_be_visible()
    expect(page.locator("#toggle-key")).to_be_visible()  # added by /static/connect.js
    check_state(page, "not_connected")

    submit_by_keyboard(page, key.api_key)
    expect_state(page, "success")
    expect(page.locator("#company-id")).to_have_text(key.company_id)
    check_state(page, "success")
    assert_key_never_returned(tab, key.api_key)
    assert key.api_key not in caplog.text
    assert all(key.api_key not in str(vars(record)) for record in caplog.records)
    assert connect.tenant()["company_id"] == key.company_id


def test_show_hide_control_works_from_the_keyboard(
    connect: Connect, open_tab: Callable[..., Tab]
) -> None:
    page = open_tab(1280).page
    page.goto(connect.link())
    field = page.locator("#api-key")
    field.fill("not-a-real-key")
    toggle = page.locator("#toggle-key")
    for shown in ("text", "password"):
        toggle.focus()
        page.keyboard.press("Space")
        expect(field).to_have_attribute("type", shown)
    expect(field).to_have_value("not-a-real-key")


def test_page_works_without_javascript(connect: Connect, open_tab: Callable[..., Tab]) -> None:
    key = connect.sandbox.state.create_key(scopes=REQUIRED)
    page = open_tab(375, java_script_enabled=False).page
    page.goto(connect.link())
    expect(page.locator("#toggle-key")).to_have_count(0)
    submit_by_keyboard(page, key.api_key)
    expect_state(page, "success")
    expect(page.locator("#company-id")).to_have_text(key.company_id)


def test_success_offers_the_return_link(connect: Connect, open_tab: Callable[..., Tab]) -> None:
    key = connect.sandbox.state.create_key(scopes=REQUIRED)
    refused = connect.admin.post(  # not an origin of BROKER_CONNECT_RETURN_ORIGINS
        f"/v1/tenants/{TENANT}/connect-sessions", json={"return_url": "https://evil.example/x"}
    )
    assert refused.status_code == 400
    back = RETURN_ORIGIN + "/settings/pleo?done=1"
    page = open_tab(1280).page
    page.goto(connect.link(return_url=back))
    submit_by_keyboard(page, key.api_key)
    expect_state(page, "success")
    expect(page.locator("#return-link")).to_have_attribute("href", back)
    check_state(page, "success_return")


def test_wrong_key_shows_an_actionable_message_and_the_form_again(
    connect: Connect, open_tab: Callable[..., Tab]
) -> None:
    wrong = "pik_" + "x" * 40  # no such key at Pleo
    tab = open_tab(375)
    page = tab.page
    page.goto(connect.link())
    submit_by_keyboard(page, wrong)
    expect_state(page, "failed")
    assert_actionable_failure(page)
    check_state(page, "failed")
    assert_key_never_returned(tab, wrong)

    key = connect.sandbox.state.create_key(scopes=REQUIRED)  # the retry on the same link works
    submit_by_keyboard(page, key.api_key)
    expect_state(page, "success")
    expect(page.locator("#company-id")).to_have_text(key.company_id)


def test_key_of_another_company_asks_for_confirmation_when_allowed(
    connect: Connect, open_tab: Callable[..., Tab]
) -> None:
    first = connect.sandbox.state.create_key(scopes=REQUIRED)
    connect.activate(first.api_key)
    other = connect.sandbox.state.create_key(scopes=REQUIRED)
    tab = open_tab(375)
    page = tab.page
    page.goto(connect.link(allow_company_change=True))
    expect_state(page, "connected")
    expect(page.locator("#company-id")).to_have_text(first.company_id)
    expect(page.locator("#key-hint")).to_contain_text(first.api_key[-4:])
    check_state(page, "connected")

    submit_by_keyboard(page, other.api_key)
    expect_state(page, "confirm_company_change")
    expect(page.locator("#confirm-company-change")).to_be_visible()
    check_state(page, "confirm_company_change")
    assert_key_never_returned(tab, other.api_key)
    assert connect.tenant()["company_id"] == first.company_id  # nothing changed yet

    # Confirming asks for the key again (it never came back): paste it, tick, submit.
    page.locator("#api-key").fill(other.api_key)
    confirm = page.locator("#confirm-company-change")
    if confirm.get_attribute("type") == "checkbox":
        confirm.check()
        with page.expect_navigation():
            page.locator("#submit-key").click()
    else:
        with page.expect_navigation():
            confirm.click()
    expect_state(page, "success")
    expect(page.locator("#company-id")).to_have_text(other.company_id)
    assert connect.tenant()["company_id"] == other.company_id
    assert_key_never_returned(tab, other.api_key)


def test_key_of_another_company_is_refused_when_the_link_does_not_allow_it(
    connect: Connect, open_tab: Callable[..., Tab]
) -> None:
    first = connect.sandbox.state.create_key(scopes=REQUIRED)
    connect.activate(first.api_key)
    other = connect.sandbox.state.create_key(scopes=REQUIRED)
    tab = open_tab(375)
    page = tab.page
    page.goto(connect.link())
    submit_by_keyboard(page, other.api_key)
    expect_state(page, "failed")
    assert_actionable_failure(page)
    expect(page.locator("#confirm-company-change")).to_have_count(0)
    check_state(page, "company_change_refused")
    assert_key_never_returned(tab, other.api_key)
    assert connect.tenant()["company_id"] == first.company_id


def test_broken_tenant_shows_the_reconnect_form(
    connect: Connect, open_tab: Callable[..., Tab]
) -> None:
    key = connect.sandbox.state.create_key(scopes=REQUIRED)
    connect.activate(key.api_key)
    connect.sandbox.state.revoke(key.key_id)
    assert connect.admin.post(f"/v1/tenants/{TENANT}/check").json()["state"] == "broken"
    page = open_tab(375).page
    page.goto(connect.link())
    expect_state(page, "broken")
    expect(page.locator("#message")).not_to_be_empty()
    expect(page.locator("#key-form")).to_be_visible()
    check_state(page, "broken")

    fresh = connect.sandbox.state.create_key(company_id=key.company_id, scopes=REQUIRED)
    submit_by_keyboard(page, fresh.api_key)
    expect_state(page, "success")
    expect(page.locator("#company-id")).to_have_text(key.company_id)
    assert connect.tenant()["state"] == "active"


def assert_dead_link(page: Page, response_status: int | None) -> None:
    assert response_status == 404
    expect_state(page, "dead_link")
    expect(page.locator("#key-form")).to_have_count(0)
    expect(page.locator("#company-id")).to_have_count(0)


def test_expired_link_shows_the_dead_link_page(
    connect: Connect, open_tab: Callable[..., Tab], monkeypatch: pytest.MonkeyPatch
) -> None:
    link = connect.link(ttl_seconds=60)
    page = open_tab(375).page
    response = page.goto(link)
    assert response is not None and response.status == 200
    expect_state(page, "not_connected")

    # The broker runs on a thread of this process: its sessions' clock moves 61 s on.
    monkeypatch.setattr(
        "broker.connect_sessions._now", lambda: datetime.now(UTC) + timedelta(seconds=61)
    )
    response = page.goto(link)
    assert_dead_link(page, response.status if response else None)
    check_state(page, "dead_link")


def test_used_link_cannot_be_reused(connect: Connect, open_tab: Callable[..., Tab]) -> None:
    key = connect.sandbox.state.create_key(scopes=REQUIRED)
    link = connect.link()
    page = open_tab(1280).page
    page.goto(link)
    submit_by_keyboard(page, key.api_key)
    expect_state(page, "success")
    response = page.goto(link)
    assert_dead_link(page, response.status if response else None)

    # Nor can a post to it (a form kept open in another tab) change the tenant.
    other = connect.sandbox.state.create_key(scopes=REQUIRED)
    with httpx.Client(trust_env=False) as client:
        refused = client.post(link, data={"api_key": other.api_key, "csrf_token": "x"})
    assert refused.status_code in (403, 404)
    assert other.api_key not in refused.text
    assert connect.tenant()["company_id"] == key.company_id


def test_unknown_link_reveals_nothing(connect: Connect, open_tab: Callable[..., Tab]) -> None:
    key = connect.sandbox.state.create_key(scopes=REQUIRED)
    connect.activate(key.api_key)
    page = open_tab(375).page
    response = page.goto(connect.url + "/connect/" + "A" * 43)
    assert_dead_link(page, response.status if response else None)
    assert TENANT not in page.content()
    assert key.company_id not in page.content()


def _form(client: httpx.Client, link: str) -> str:
    """GET the page as a browser would; returns its CSRF token."""
    page = client.get(link)
    assert page.status_code == 200
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text) or re.search(
        r'value="([^"]+)"[^>]*name="csrf_token"', page.text
    )
    assert match, "no csrf_token field in the form"
    return match.group(1)


def test_posts_from_another_origin_or_without_csrf_token_are_refused(connect: Connect) -> None:
    key = connect.sandbox.state.create_key(scopes=REQUIRED)
    link = connect.link()
    with httpx.Client(trust_env=False) as client:
        csrf = _form(client, link)
        foreign = client.post(
            link,
            data={"api_key": key.api_key, "csrf_token": csrf},
            headers={"Origin": "https://attacker.example"},
        )
        assert foreign.status_code == 403
        missing = client.post(link, data={"api_key": key.api_key}, headers={"Origin": connect.url})
        assert missing.status_code == 403
        forged = client.post(
            link,
            data={"api_key": key.api_key, "csrf_token": csrf[::-1]},
            headers={"Origin": connect.url},
        )
        assert forged.status_code == 403
        # A page whose policy sends no referrer (this one's) posts with `Origin: null`; only
        # Sec-Fetch-Site then tells a post from this page from one from another site.
        opaque = client.post(
            link,
            data={"api_key": key.api_key, "csrf_token": csrf},
            headers={"Origin": "null", "Sec-Fetch-Site": "cross-site"},
        )
        assert opaque.status_code == 403
        for refused in (foreign, missing, forged, opaque):
            assert refused.headers["content-type"].startswith("text/html")
            assert key.api_key not in refused.text
            assert refused.headers["content-security-policy"].startswith(CSP_PREFIX)
        assert connect.admin.get(f"/v1/tenants/{TENANT}").status_code == 404

        # The same post with the token, from the page's own origin, is taken.
        accepted = client.post(
            link,
            data={"api_key": key.api_key, "csrf_token": csrf},
            headers={"Origin": connect.url},
        )
    assert accepted.status_code == 200
    assert key.api_key not in accepted.text
    assert connect.tenant()["company_id"] == key.company_id


def test_every_answer_carries_the_security_headers_and_no_csp_violation(
    connect: Connect, open_tab: Callable[..., Tab]
) -> None:
    key = connect.sandbox.state.create_key(scopes=REQUIRED)
    link = connect.link()
    tab = open_tab(375)
    page = tab.page
    page.goto(link)
    submit_by_keyboard(page, "pik_" + "y" * 40)
    expect_state(page, "failed")
    submit_by_keyboard(page, key.api_key)
    expect_state(page, "success")
    page.goto(link)
    expect_state(page, "dead_link")

    paths = {urlsplit(r.url).path for r in tab.responses}
    assert {"/static/connect.css", "/static/connect.js"} <= paths, paths
    for response in tab.responses:
        if not response.url.startswith(connect.url):
            continue
        headers = response.all_headers()
        assert headers["content-security-policy"] == CSP_PREFIX + "'none'", response.url
        assert headers["referrer-policy"] == "no-referrer", response.url
        assert "no-store" in headers["cache-control"], response.url
        assert headers["x-content-type-options"] == "nosniff", response.url
    assert tab.csp_violations == []
    # No script error either ("Failed to load resource" is Chromium noting a 404 or 403 answer).
    errors = [line for line in tab.console if line.startswith("error")]
    assert all("Failed to load resource" in line for line in errors), errors


@pytest.mark.parametrize(
    ("query", "locale", "lang"),
    [("?lang=da", None, "da"), ("", "da-DK", "da"), ("?lang=en", "da-DK", "en")],
)
def test_language_from_query_or_accept_language(
    connect: Connect, open_tab: Callable[..., Tab], query: str, locale: str | None, lang: str
) -> None:
    options = {"locale": locale} if locale else {}
    page = open_tab(375, **options).page
    page.goto(connect.link() + query)
    expect_state(page, "not_connected")
    expect(page.locator("html")).to_have_attribute("lang", lang)
    text = page.locator("body").inner_text().lower()
    if lang == "da":
        assert "nøgle" in text, text  # "API-nøgle": the key, in Danish
        check_state(page, "not_connected-da")
    else:
        assert "key" in text and "nøgle" not in text, text


def _bad_page(_request: Request) -> HTMLResponse:
    body = (
        '<!doctype html><html lang="en"><head><title>bad</title></head><body><main>'
        '<input id="nameless"><script>document.title = "ran"</script></main></body></html>'
    )
    return HTMLResponse(body, headers={"Content-Security-Policy": "script-src 'self'"})


def test_harness_sees_csp_violations_and_axe_failures(open_tab: Callable[..., Tab]) -> None:
    """The checks above can fail: an inline script is reported, an unlabelled field is found."""
    url, thread = start_app(Starlette(routes=[Route("/", _bad_page)]))
    try:
        tab = open_tab(375)
        tab.page.goto(url + "/")
        expect(tab.page).not_to_have_title("ran")  # the policy blocked the script
        tab.page.wait_for_function("true")  # the events of the load have reached the test
        assert any("script-src" in v for v in tab.violations), tab.violations
        assert any(CSP_MARK in line for line in tab.console), tab.console
        with pytest.raises(AssertionError, match="label"):
            assert_accessible(tab.page)
        assert screenshot(tab.page, "harness").name == "harness-375.png"
        tab.violations.clear()
        tab.console.clear()
    finally:
        thread.stop()


def test_a_key_revoked_in_pleo_is_caught_announced_and_fixed_by_the_customer(
    make_broker: Callable[..., RunningBroker],
    sandbox: RunningSandbox,
    receiver: Receiver,
    open_tab: Callable[..., Tab],
) -> None:
    """Issue 11's whole way back: Pleo revokes the key; a periodic health check (not a call)
    finds it; the signed `tenant.broken` webhook carries a reconnect link; the customer opens
    it in the browser and pastes a new key; the tenant recovers and `tenant.recovered` follows."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    broker = make_broker(
        connect_port=port,
        connect_public_url=url,
        health_check_interval=0.5,
        health_check_rate=20,
        webhook_url=receiver.url,
        webhook_secret=receiver.secret,
        webhook_timeout=5.0,
        webhook_retry_schedule="0.2s,0.2s,0.2s",
    )
    key = sandbox.state.create_key(scopes=REQUIRED)
    with httpx.Client(base_url=broker.admin_url, headers=broker.auth, trust_env=False) as admin:
        assert admin.put(f"/v1/tenants/{TENANT}/key", json={"api_key": key.api_key}).is_success
        sandbox.state.revoke(key.key_id)

        def broken() -> list[Received]:
            return [r for r in receiver.requests() if receiver.verify(r)["type"] == "tenant.broken"]

        event = receiver.verify(wait_until(broken, within=10, what="the tenant.broken webhook")[0])
        assert event["actor"] == "health_check"  # found by a periodic check, not by a call
        assert event["data"]["state"] == "broken" and event["data"]["reason"] == "key_rejected"
        link = event["data"]["reconnect_url"]
        assert link.startswith(url + "/connect/")

        page = open_tab(375).page
        page.goto(link)
        expect_state(page, "broken")
        check_state(page, "broken")
        fresh = sandbox.state.create_key(company_id=key.company_id, scopes=REQUIRED)
        submit_by_keyboard(page, fresh.api_key)
        expect_state(page, "success")
        expect(page.locator("#company-id")).to_have_text(key.company_id)
        screenshot(page, "reconnected-from-webhook")

        recovered = wait_until(
            lambda: [e for e in receiver.delivered() if e["type"] == "tenant.recovered"],
            within=10,
            what="the tenant.recovered webhook",
        )
        assert recovered[0]["actor"].startswith("connect_session:")
        assert admin.get(f"/v1/tenants/{TENANT}").json()["state"] == "active"
    assert all(fresh.api_key.encode() not in r.body for r in receiver.requests())
