"""The connect page over real sockets: `broker serve`'s third listener against the sandbox.

Drives the page as a browser without JavaScript would (form posts), and checks every state
of the contract, its headers, CSRF and Origin refusals, the attempt limit, languages, and
that a pasted key never comes back.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from support.servers import RunningBroker, RunningSandbox

from broker import errors
from broker.connect_pages import KNOWN_ERRORS, LANGUAGES, Words, catalog
from broker.connect_sessions import ConnectSession, token_hash
from broker.stores.local import LocalStore

PUBLIC = "https://connect.example.com"
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self';"
    " form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@pytest.fixture
def connect_broker(make_broker: Callable[..., RunningBroker]) -> RunningBroker:
    return make_broker(
        connect_public_url=PUBLIC,
        connect_port=0,
        connect_return_origins="https://app.example.com",
        connect_max_attempts=3,
        connect_integration_name="Acme Books",
    )


@pytest.fixture
def admin(connect_broker: RunningBroker) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=connect_broker.admin_url, headers=connect_broker.auth, trust_env=False
    ) as client:
        yield client


@pytest.fixture
def browser(connect_broker: RunningBroker) -> Iterator[httpx.Client]:
    assert connect_broker.connect_url is not None
    with httpx.Client(base_url=connect_broker.connect_url, trust_env=False, timeout=10) as client:
        yield client


@dataclass
class Link:
    path: str  # /connect/<token>
    id: str


def make_link(admin: httpx.Client, tenant: str = "acme", **body: object) -> Link:
    made = admin.post(f"/v1/tenants/{tenant}/connect-sessions", json=body)
    assert made.status_code == 201, made.text
    url = made.json()["url"]
    assert url.startswith(PUBLIC + "/connect/")
    return Link(url.removeprefix(PUBLIC), made.json()["id"])


def state_of(page: str) -> str:
    found = re.search(r'<main id="connect" data-state="([a-z_]+)"', page)
    assert found, page
    return found[1]


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return html.unescape(found[1])


def text_of(page: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', page)
    assert found, f"no #{element_id} in the page"
    return html.unescape(found[1]).strip()


def post_key(
    browser: httpx.Client,
    link: Link,
    key: str,
    *,
    confirm: bool = False,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    page = browser.get(link.path)
    form = {"api_key": key, "csrf_token": csrf_of(page.text)}
    if confirm:
        form["confirm_company_change"] = "yes"
    return browser.post(link.path, data=form, headers=headers)


def assert_secure_headers(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_customer_connects_with_a_pasted_key(
    admin: httpx.Client, browser: httpx.Client, sandbox: RunningSandbox, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG, logger="broker")
    key = sandbox.state.create_key()
    link = make_link(admin, return_url="https://app.example.com/done")

    page = browser.get(link.path)
    assert page.status_code == 200
    assert_secure_headers(page)
    assert state_of(page.text) == "not_connected"
    assert '<html lang="en">' in page.text
    assert '<form id="key-form" method="post"' in page.text
    assert '<input id="api-key" name="api_key" type="password" autocomplete="off"' in page.text
    assert '<label for="api-key">' in page.text and 'id="submit-key"' in page.text
    assert "Acme Books" in page.text
    assert "<style" not in page.text and " style=" not in page.text
    assert re.findall(r"<script[^>]*>", page.text) == ['<script src="/static/connect.js" defer>']

    origin = str(browser.base_url).rstrip("/")
    done = post_key(browser, link, key.api_key, headers={"origin": origin})
    assert done.status_code == 200
    assert_secure_headers(done)
    assert state_of(done.text) == "success"
    assert text_of(done.text, "company-id") == key.company_id
    assert text_of(done.text, "key-hint") == "…" + key.api_key[-4:]
    assert 'id="return-link"' in done.text and "https://app.example.com/done" in done.text
    assert key.api_key not in done.text
    assert admin.get("/v1/tenants/acme").json()["company_id"] == key.company_id

    # Single use: the link is dead now, for reading and for posting.
    dead = browser.get(link.path)
    assert dead.status_code == 404 and state_of(dead.text) == "dead_link"
    assert key.company_id not in dead.text and "acme" not in dead.text
    assert browser.post(link.path, data={"api_key": "x", "csrf_token": "y"}).status_code == 404
    logged = " ".join(
        f"{r.getMessage()} {getattr(r, 'fields', '')}"
        for r in caplog.records
        if r.name.startswith("broker")
    )
    assert key.api_key not in logged
    assert link.path.rsplit("/", 1)[1] not in logged
    assert link.id in logged


def test_a_wrong_key_shows_what_to_do_and_the_form_again(
    admin: httpx.Client, browser: httpx.Client
) -> None:
    link = make_link(admin)
    wrong = "pik_" + "0" * 48
    failed = post_key(browser, link, wrong)
    assert failed.status_code == 200
    assert state_of(failed.text) == "failed"
    assert '<p id="message" role="alert"' in failed.text
    message = text_of(failed.text, "message")
    assert "Settings → Integrations → Acme Books" in message
    assert "key_invalid" not in failed.text and wrong not in failed.text
    assert 'id="key-form"' in failed.text
    # The next visit shows the last attempt's message.
    again = browser.get(link.path)
    assert state_of(again.text) == "failed" and text_of(again.text, "message") == message


def test_the_attempt_limit_ends_the_link(admin: httpx.Client, browser: httpx.Client) -> None:
    link = make_link(admin)
    for _ in range(2):
        assert state_of(post_key(browser, link, "pik_" + "1" * 48).text) == "failed"
    last = post_key(browser, link, "pik_" + "1" * 48)
    assert state_of(last.text) == "dead_link"
    assert browser.get(link.path).status_code == 404


def test_a_connected_tenant_is_shown_with_its_company_and_key_hint(
    admin: httpx.Client, browser: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key()
    assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).status_code == 200
    page = browser.get(make_link(admin).path)
    assert state_of(page.text) == "connected"
    assert text_of(page.text, "company-id") == key.company_id
    assert text_of(page.text, "key-hint") == "…" + key.api_key[-4:]
    assert text_of(page.text, "company-name")  # the key may read its company
    assert text_of(page.text, "submit-key") == "Replace key"
    assert key.api_key not in page.text


def test_a_broken_tenant_gets_the_reconnect_form(
    admin: httpx.Client, browser: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key()
    admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key})
    sandbox.state.revoke(key.key_id)
    assert admin.post("/v1/tenants/acme/check").json()["state"] == "broken"
    link = make_link(admin)
    page = browser.get(link.path)
    assert state_of(page.text) == "broken"
    assert "Pleo no longer accepts the key" in text_of(page.text, "message")
    fresh = sandbox.state.create_key(company_id=key.company_id)
    assert state_of(post_key(browser, link, fresh.api_key).text) == "success"


def test_a_key_of_another_company_asks_for_confirmation_when_allowed(
    admin: httpx.Client, browser: httpx.Client, sandbox: RunningSandbox
) -> None:
    first = sandbox.state.create_key()
    admin.put("/v1/tenants/acme/key", json={"api_key": first.api_key})
    other = sandbox.state.create_key()

    refusing = make_link(admin)
    refused = post_key(browser, refusing, other.api_key)
    assert state_of(refused.text) == "failed"
    assert "another Pleo company" in text_of(refused.text, "message")

    allowing = make_link(admin, allow_company_change=True)
    asked = post_key(browser, allowing, other.api_key)
    assert state_of(asked.text) == "confirm_company_change"
    assert other.company_id in asked.text and other.api_key not in asked.text
    assert 'id="confirm-company-change" name="confirm_company_change" value="yes"' in asked.text
    done = post_key(browser, allowing, other.api_key, confirm=True)
    assert state_of(done.text) == "success"
    assert text_of(done.text, "company-id") == other.company_id


def test_a_post_without_csrf_or_from_another_origin_is_refused(
    admin: httpx.Client, browser: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key()
    link = make_link(admin)
    no_token = browser.post(link.path, data={"api_key": key.api_key})
    assert no_token.status_code == 403
    assert_secure_headers(no_token)
    wrong = browser.post(link.path, data={"api_key": key.api_key, "csrf_token": "guess"})
    assert wrong.status_code == 403
    foreign = post_key(browser, link, key.api_key, headers={"origin": "https://evil.example.net"})
    assert foreign.status_code == 403
    cross = post_key(browser, link, key.api_key, headers={"sec-fetch-site": "cross-site"})
    assert cross.status_code == 403
    for answer in (no_token, wrong, foreign, cross):
        assert key.api_key not in answer.text
    assert admin.get("/v1/tenants/acme").status_code == 404  # nothing was activated
    assert state_of(post_key(browser, link, key.api_key).text) == "success"


def test_submissions_per_link_are_rate_limited(admin: httpx.Client, browser: httpx.Client) -> None:
    link = make_link(admin)
    answers = [post_key(browser, link, "").status_code for _ in range(6)]
    assert answers[:5] == [200] * 5 and answers[5] == 429


def test_an_expired_or_unknown_link_reveals_nothing(
    admin: httpx.Client, browser: httpx.Client, connect_broker: RunningBroker
) -> None:
    unknown = browser.get("/connect/" + "A" * 43)
    assert unknown.status_code == 404 and state_of(unknown.text) == "dead_link"
    assert_secure_headers(unknown)
    token = "expired-" + "B" * 40
    settings = connect_broker.settings
    replica = LocalStore(settings.store_path, settings.master_key_bytes())
    try:
        session = ConnectSession(
            id="cs_expired",
            tenant="acme",
            token_hash=token_hash(token),
            expires_at=datetime.now(UTC) - timedelta(seconds=1),
            csrf="c",
        )
        asyncio.run(replica.put_session(session))
    finally:
        asyncio.run(replica.close())
    expired = browser.get(f"/connect/{token}")
    assert expired.status_code == 404 and state_of(expired.text) == "dead_link"
    assert expired.text.replace("expired", "") == unknown.text.replace("expired", "")


@pytest.mark.parametrize(
    ("query", "accept", "lang"),
    [
        ("", "da-DK,da;q=0.9,en;q=0.8", "da"),
        ("?lang=en", "da", "en"),
        ("?lang=da", "en-GB", "da"),
        ("", "fr-FR,de;q=0.5", "en"),
        ("?lang=xx", "en;q=0.2,da;q=0.7", "da"),
    ],
)
def test_the_language_follows_lang_then_accept_language(
    admin: httpx.Client, browser: httpx.Client, query: str, accept: str, lang: str
) -> None:
    page = browser.get(make_link(admin).path + query, headers={"accept-language": accept})
    assert f'<html lang="{lang}">' in page.text
    assert ("Forbind Pleo med Acme Books" in page.text) == (lang == "da")


def test_static_files_and_strays_carry_the_headers(browser: httpx.Client) -> None:
    for path, media in (("/static/connect.css", "text/css"), ("/static/connect.js", "javascript")):
        answer = browser.get(path)
        assert answer.status_code == 200 and media in answer.headers["content-type"]
        assert_secure_headers(answer)
    stray = browser.get("/v1/tenants")
    assert stray.status_code == 404
    assert_secure_headers(stray)


def test_the_listeners_own_refusals_carry_the_headers_too(browser: httpx.Client) -> None:
    # Refused before the page's code runs (431 for a head over the bound): still no caching,
    # no referrer, no framing.
    answer = browser.get("/connect/x", headers={"X-Big": "x" * 40_000})
    assert answer.status_code == 431
    assert_secure_headers(answer)


def test_without_a_public_url_there_is_no_connect_listener(broker: RunningBroker) -> None:
    assert broker.connect_url is None


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_activation_error_has_plain_words_in_every_language(lang: str) -> None:
    words = Words(lang, "Acme Books")
    codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ActivationError) and "code" in vars(cls)
    }
    assert codes <= KNOWN_ERRORS
    other = words.error("no_such_code")
    for code in KNOWN_ERRORS:
        message = words.error(code)
        assert message != other and code not in message and "{" not in message
    for code in codes - {"pleo_unavailable", "company_in_use"}:
        # Where in Pleo to look, in the customer's words.
        assert "Acme Books" in words.error(code)


def test_the_catalogs_say_the_same_things() -> None:
    def keys(texts: dict[str, Any], prefix: str = "") -> set[str]:
        found = set()
        for name, value in texts.items():
            if isinstance(value, dict):
                found |= keys(value, f"{prefix}{name}.")
            else:
                found.add(prefix + name)
        return found

    assert keys(catalog("en")) == keys(catalog("da"))


async def test_a_store_outage_shows_a_plain_page_not_a_crash(tmp_path: Any) -> None:
    from support.inprocess import PLEO_URL, FakePleo, MemoryStore
    from support.servers import broker_settings

    from broker.connect import create_connect_app
    from broker.runtime import open_broker

    store, pleo = MemoryStore(), FakePleo()
    settings = broker_settings(PLEO_URL, tmp_path, connect_public_url=PUBLIC)
    async with open_broker(settings, store=store, pleo_transport=pleo.transport()) as broker:
        link = await broker.sessions.create("acme")
        path = link.url.removeprefix(PUBLIC)
        transport = httpx.ASGITransport(app=create_connect_app(broker))
        async with httpx.AsyncClient(transport=transport, base_url="http://c.test") as client:
            store.down = True
            page = await client.get(path + "?lang=da")
            assert page.status_code == 503
            assert_secure_headers(page)
            assert state_of(page.text) == "failed" and '<html lang="da">' in page.text
            assert "Vores sikre nøglelager kan ikke nås lige nu" in text_of(page.text, "message")
            store.down = False
            assert (await client.get(path)).status_code == 200


def test_no_key_or_token_in_any_log_line_or_answer(
    admin: httpx.Client, browser: httpx.Client, sandbox: RunningSandbox
) -> None:
    import io

    from broker.events import LOGGER_NAME, JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(name) for name in (LOGGER_NAME, "uvicorn", "starlette")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    answers: list[str] = []
    try:
        first, other = sandbox.state.create_key(), sandbox.state.create_key()
        wrong = "pik_" + "7" * 48
        keys = [first.api_key, other.api_key, wrong]
        links = [make_link(admin), make_link(admin, allow_company_change=True)]
        for response in (
            post_key(browser, links[0], wrong),
            post_key(browser, links[0], first.api_key),
            post_key(browser, links[1], other.api_key),
            browser.post(links[1].path, data={"api_key": other.api_key, "csrf_token": "x"}),
            post_key(browser, links[1], other.api_key, confirm=True),
        ):
            answers += [response.text, str(response.headers)]
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    logged = stream.getvalue()
    assert "connect.session_completed" in logged
    for secret in [*keys, *(link.path.rsplit("/", 1)[1] for link in links)]:
        assert secret not in logged
    for secret in keys:
        assert all(secret not in answer for answer in answers)


def test_a_key_that_may_not_read_its_company_still_gets_the_page(
    admin: httpx.Client, browser: httpx.Client, sandbox: RunningSandbox
) -> None:
    key = sandbox.state.create_key(scopes=["export-jobs:read", "export-jobs:write"])
    assert admin.put("/v1/tenants/acme/key", json={"api_key": key.api_key}).status_code == 200
    page = browser.get(make_link(admin).path)
    assert page.status_code == 200 and state_of(page.text) == "connected"
    assert text_of(page.text, "company-id") == key.company_id
    assert 'id="company-name"' not in page.text
