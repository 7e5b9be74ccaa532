"""The connect listener: the page where a customer pastes the key Pleo made for them.

`GET /connect/{token}` shows the tenant's situation; `POST /connect/{token}` activates the
pasted key with exactly `TenantService.activate` and shows the result. The token is bound to
one tenant and names nothing else; an unknown, used, revoked, expired or exhausted link gets
the same dead-link page. Every answer carries the security headers (`SecurityHeaders`); form
posts need the session's CSRF token and are refused from a foreign `Origin`. The form's body
is never logged; events name the session id, never the token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from broker import errors
from broker.connect_guards import SecurityHeaders, SubmissionRate, Unexpected
from broker.connect_pages import Page, Words, choose_language
from broker.connect_sessions import ConnectSession
from broker.connect_view import describe
from broker.events import emit
from broker.records import ApiKey
from broker.runtime import Broker
from broker.submissions import MAX_KEY_LENGTH

STATIC = Path(__file__).resolve().parent / "connect_static"
MAX_FORM_BYTES = 8 * 1024
SUBMISSIONS_PER_MINUTE = 5


def create_connect_app(broker: Broker) -> ASGIApp:
    """The connect listener's ASGI app over an opened broker."""
    app = Starlette(
        routes=[
            Route("/connect/{token}", show, methods=["GET"]),
            Route("/connect/{token}", submit, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={errors.BrokerError: trouble},
    )
    app.state.broker = broker
    app.state.rate = SubmissionRate(SUBMISSIONS_PER_MINUTE, 60.0)
    return SecurityHeaders(Unexpected(app), broker.settings.connect_frame_ancestors)


def _broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def _language(request: Request) -> str:
    return choose_language(
        request.query_params.get("lang"), request.headers.get("accept-language", "")
    )


def _answer(request: Request, page: Page, status: int = 200) -> Response:
    name = _broker(request).settings.connect_integration_name
    return HTMLResponse(page.render(name), status_code=status)


def _dead(request: Request, lang: str, message: str | None = None) -> Response:
    return _answer(request, Page("dead_link", lang, message=message, alert=True), 404)


async def show(request: Request) -> Response:
    """`GET /connect/{token}`: the tenant's situation and, where it helps, the key form."""
    lang = _language(request)
    session = await _broker(request).sessions.find(request.path_params["token"])
    if session is None:
        return _dead(request, lang)
    page = await describe(_broker(request), session, lang)
    page.action = _action(request)
    return _answer(request, page)


async def submit(request: Request) -> Response:
    """`POST /connect/{token}`: check the pasted key with Pleo and make it the tenant's."""
    broker = _broker(request)
    lang = _language(request)
    session = await broker.sessions.find(request.path_params["token"])
    if session is None:
        return _dead(request, lang)
    form = await _read_form(request)
    if form is None or not _same_origin(request) or not _csrf_ok(session, form):
        emit("connect.post_refused", level=logging.WARNING, session=session.id)
        page = Page("failed", lang, alert=True, restart=_action(request))
        page.heading = page_text(request, lang, "refused_heading")
        page.message = page_text(request, lang, "refused_text")
        return _answer(request, page, 403)
    rate: SubmissionRate = request.app.state.rate
    if not rate.allow(session.id):
        return _answer(request, _retry(request, session, lang, "rate_limited"), 429)
    key = form.get("api_key", "").strip()
    problem = _key_problem(key)
    if problem is not None:
        return _answer(request, _retry(request, session, lang, problem))
    confirmed = session.allow_company_change and form.get("confirm_company_change") == "yes"
    return await _activate(request, session, ApiKey(key), confirmed, lang)


async def _activate(
    request: Request, session: ConnectSession, key: ApiKey, confirmed: bool, lang: str
) -> Response:
    broker = _broker(request)
    session = await broker.sessions.claim(session)
    try:
        record = await broker.tenants.activate(
            session.tenant,
            key,
            allow_company_change=confirmed,
            actor=f"connect_session:{session.id}",
        )
    except errors.CompanyChanged as exc:
        if session.allow_company_change:
            page = _retry(request, session, lang, None)
            page.state = "confirm_company_change"
            page.heading = page_text(request, lang, "confirm_heading")
            page.details = {
                "new": str(exc.details.get("key_company_id", "")),
                "old": str(exc.details.get("company_id", "")),
            }
            await broker.sessions.release(session)
            return _answer(request, page)
        return await _failed(request, session, lang, exc.code)
    except (errors.ActivationError, errors.StoreError, errors.TenantError) as exc:
        return await _failed(request, session, lang, exc.code)
    await broker.sessions.completed(session)
    page = await describe(broker, session, lang, record=record)
    page.state, page.return_url = "success", session.return_url
    return _answer(request, page)


async def _failed(request: Request, session: ConnectSession, lang: str, code: str) -> Response:
    counted = await _broker(request).sessions.failed(session, code)
    if counted.attempts >= _broker(request).sessions.max_attempts:
        message = page_text(request, lang, "error.attempts_used")
        return _answer(request, Page("dead_link", lang, message=message, alert=True))
    return _answer(request, _retry(request, counted, lang, code))


async def trouble(request: Request, exc: Exception) -> Response:
    """A failure of the store (or another refusal) as a plain page; the link stays usable."""
    assert isinstance(exc, errors.BrokerError)
    lang = _language(request)
    page = Page("failed", lang, alert=True, message=page_text(request, lang, f"error.{exc.code}"))
    if "token" in request.path_params:
        page.restart = _action(request)
    emit("connect.page_failed", level=logging.WARNING, error=exc.code)
    return _answer(request, page, exc.status if exc.status >= 500 else 503)


def _retry(request: Request, session: ConnectSession, lang: str, code: str | None) -> Page:
    """The form again, with the message for `code`."""
    page = Page("failed", lang, alert=True, csrf=session.csrf, action=_action(request))
    if code is not None:
        page.message = page_text(request, lang, f"error.{code}")
        page.heading = page_text(request, lang, "state_failed")
    return page


def page_text(request: Request, lang: str, key: str) -> str:
    """One catalog text in `lang`, branded."""
    words = Words(lang, _broker(request).settings.connect_integration_name)
    if key.startswith("error."):
        return words.error(key.removeprefix("error."))
    return words(key)


def _action(request: Request) -> str:
    lang = request.query_params.get("lang")
    suffix = f"?lang={lang}" if lang in ("en", "da") else ""
    return f"/connect/{request.path_params['token']}{suffix}"


def _key_problem(key: str) -> str | None:
    if not key:
        return "key_empty"
    if len(key) > MAX_KEY_LENGTH or any(c.isspace() or ord(c) < 32 for c in key):
        return "key_malformed"
    return None


async def _read_form(request: Request) -> dict[str, str] | None:
    """The url-encoded form, or None if it is not one, too large, or slow (never logged)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        return None
    body = bytearray()
    try:
        async with asyncio.timeout(_broker(request).settings.header_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM_BYTES:
                    return None
        fields = parse_qs(body.decode("utf-8"), max_num_fields=8, strict_parsing=False)
    except (TimeoutError, UnicodeDecodeError, ValueError):
        return None
    return {name: values[0] for name, values in fields.items() if len(values) == 1}


def _same_origin(request: Request) -> bool:
    """A browser's post from this page: no foreign `Origin`, no cross-site fetch."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        # Under `Referrer-Policy: no-referrer` a browser posts this page's own form with an
        # opaque `Origin: null`; it then says the fetch is same-origin (which no page can forge).
        return request.headers.get("sec-fetch-site") == "same-origin"
    own = {f"{request.url.scheme}://{request.headers.get('host', '')}".lower()}
    public = _broker(request).settings.connect_public_url
    if public is not None:
        parts = urlsplit(public)
        own.add(f"{parts.scheme}://{parts.netloc}".lower())
    return origin.lower() in own


def _csrf_ok(session: ConnectSession, form: dict[str, str]) -> bool:
    supplied = form.get("csrf_token", "")
    return hmac.compare_digest(supplied.encode(), session.csrf.encode())
