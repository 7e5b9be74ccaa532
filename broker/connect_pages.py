"""The connect page's words and looks: message catalogs, language choice, templates.

Every text a customer reads comes from `broker/connect_messages/<lang>.json` (English and
Danish); `{integration}` in them is `BROKER_CONNECT_INTEGRATION_NAME`. Templates live in
`broker/connect_templates/`, autoescaped; no page carries inline script or style.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

HERE = Path(__file__).resolve().parent
DEFAULT_INTEGRATION_NAME = "the integration"  # BROKER_CONNECT_INTEGRATION_NAME's default
LANGUAGES = ("en", "da")
STATES = (
    "not_connected",
    "connected",
    "broken",
    "failed",
    "success",
    "confirm_company_change",
    "dead_link",
)
# Activation and store codes a customer may meet; anything else reads as "other".
KNOWN_ERRORS = frozenset(
    {
        "key_empty",
        "key_malformed",
        "key_invalid",
        "key_not_api_key",
        "key_not_company_scoped",
        "key_wrong_integration",
        "scopes_missing",
        "company_changed",
        "company_in_use",
        "pleo_unavailable",
        "store_unavailable",
        "store_conflict",
        "rate_limited",
        "attempts_used",
    }
)


@cache
def catalog(lang: str) -> dict[str, Any]:
    """The message catalog of one language."""
    loaded: dict[str, Any] = json.loads((HERE / "connect_messages" / f"{lang}.json").read_text())
    return loaded


@cache
def environment() -> Environment:
    """The templates' Jinja2 environment (autoescaping HTML)."""
    return Environment(
        loader=FileSystemLoader(HERE / "connect_templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def choose_language(query: str | None, accept_language: str) -> str:
    """`?lang=` when it names a language we have, else the best of Accept-Language, else en."""
    if query in LANGUAGES:
        return query
    best, best_q = "en", 0.0
    for position, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        q = _quality(params)
        # Earlier entries win ties, as a browser lists its preferences in order.
        score = q - position * 1e-6
        if primary in LANGUAGES and q > 0 and score > best_q:
            best, best_q = primary, score
    return best


def _quality(params: str) -> float:
    name, _, value = params.strip().partition("=")
    if name.strip() != "q":
        return 1.0
    try:
        return max(0.0, min(1.0, float(value)))
    except ValueError:
        return 0.0


class Words:
    """One language's texts with the integration's name filled in."""

    def __init__(self, lang: str, integration: str) -> None:
        self.lang = lang
        self._texts = catalog(lang)
        # The unbranded default reads in the page's own language ("integrationen").
        default = integration == DEFAULT_INTEGRATION_NAME
        self.integration = self._texts["default_integration"] if default else integration

    def __call__(self, key: str, **values: str) -> str:
        text: Any = self._texts
        for part in key.split("."):
            text = text[part]
        filled = str(text).format(integration=self.integration, **values)
        return filled[:1].upper() + filled[1:]

    def error(self, code: str) -> str:
        """The plain-words message for an error code (never the code alone)."""
        return self(f"error.{code if code in KNOWN_ERRORS else 'other'}")

    def reason(self, reason: str | None) -> str:
        """Why a broken connection broke, in plain words."""
        known = {"key_rejected", "permission_lost", "company_changed"}
        return self(f"reason.{reason}") if reason in known else self("state_broken")


@dataclass
class Page:
    """What one answer shows; `render` turns it into HTML."""

    state: str
    lang: str = "en"
    message: str | None = None
    alert: bool = False  # the message reports a failure (role=alert), else role=status
    company_id: str | None = None
    company_name: str | None = None
    key_hint: str | None = None
    return_url: str | None = None
    csrf: str | None = None
    action: str | None = None  # where the form posts; None: no form
    restart: str | None = None  # a link to open the page again
    heading: str | None = None
    details: dict[str, str] = field(default_factory=dict)

    def render(self, integration: str) -> str:
        """The page's HTML."""
        assert self.state in STATES
        words = Words(self.lang, integration)
        template = environment().get_template("page.html")
        return template.render(page=self, t=words, integration=words.integration)
