"""Fixtures that drive a real browser: Debian's Chromium (`/usr/bin/chromium`, installed by
scripts/system-deps.sh) through PyPI `playwright`, with axe-core from `axe-playwright-python`.

- `browser`: one headless Chromium per test module. Playwright's sync API marks its own event
  loop as running on the main thread while it lives, so pytest-asyncio's async tests cannot run
  beside it: the browser must not outlive the module of sync tests that uses it.
- `open_tab(width)`: a fresh context (no shared cookies) and page, 375 or 1280 px wide, that
  records console messages, Content-Security-Policy violations (the `securitypolicyviolation`
  event and console errors naming the policy) and every response the page received with its body
  (read when it arrives: Chromium forgets a document's bodies once the page navigates away). On
  teardown no tab may have seen a CSP violation.
- `assert_accessible(page)`: axe-core (bundled with axe-playwright-python, injected through the
  DevTools protocol, so it needs no network and the page's CSP does not block it) finds no
  violation of WCAG 2.0/2.1 A and AA.
- `screenshot(page, name)`: a full-page PNG at `test-artifacts/connect/<name>-<width>.png`.

Without Chromium the tests skip, and fail under `CI=true`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Response,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "connect"
WIDTHS = (375, 1280)
HEIGHT = 800
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
CSP_MARK = "Content Security Policy"

# Reports each CSP violation of any document of the tab to the test (`__reportCsp` binding).
# Init scripts and bindings go through the DevTools protocol: the page's own CSP allows them.
_CSP_LISTENER = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.__reportCsp(`${event.violatedDirective} blocked ${event.blockedURI || "inline"}`);
});
"""


def _require_chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"Chromium is not installed at {CHROMIUM}: run `make system-deps` (apt chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = _require_chromium()
    with sync_playwright() as playwright:
        # Debian's build, never a downloaded one. Playwright passes --no-sandbox unless
        # chromium_sandbox is set: as root (containers, CI) Chromium's sandbox cannot start.
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, chromium_sandbox=False
        )
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Tab:
    """A page and what it saw: console lines, CSP violations, responses."""

    page: Page
    context: BrowserContext
    console: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    bodies: list[tuple[str, bytes]] = field(default_factory=list)  # (url, body)
    unread: list[str] = field(default_factory=list)  # responses whose body could not be read

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    def _on_response(self, response: Response) -> None:
        self.responses.append(response)
        if 300 <= response.status < 400:
            return  # a redirect has no body
        try:
            self.bodies.append((response.url, response.body()))
        except PlaywrightError as exc:
            self.unread.append(f"{response.url}: {exc.message}")

    @property
    def csp_violations(self) -> list[str]:
        """Violations reported by the event, plus console errors that name the policy."""
        return self.violations + [line for line in self.console if CSP_MARK in line]


@pytest.fixture
def open_tab(browser: Browser) -> Iterator[Callable[..., Tab]]:
    tabs: list[Tab] = []

    def open_(width: int = WIDTHS[0], **context_options: object) -> Tab:
        assert width in WIDTHS, f"screens are {WIDTHS} px wide"
        context = browser.new_context(
            viewport={"width": width, "height": HEIGHT},
            **context_options,  # type: ignore[arg-type]
        )
        tab = Tab(page=context.new_page(), context=context)
        context.expose_binding("__reportCsp", lambda _source, text: tab.violations.append(text))
        context.add_init_script(_CSP_LISTENER)
        tab.page.on("console", tab._on_console)
        tab.page.on("response", tab._on_response)
        tabs.append(tab)
        return tab

    yield open_
    for tab in tabs:
        tab.context.close()
    seen = {tab.page.url: tab.csp_violations for tab in tabs if tab.csp_violations}
    assert not seen, f"CSP violations: {seen}"


_axe = Axe()


def assert_accessible(page: Page) -> None:
    """axe-core finds no WCAG 2.1 A/AA violation on the page as it is now."""
    options = {"runOnly": {"type": "tag", "values": WCAG_TAGS}, "resultTypes": ["violations"]}
    results = _axe.run(page, options=options)
    details = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']]}"
        for v in results.response["violations"]
    ]
    assert results.violations_count == 0, f"axe on {page.url}: {details}"


def screenshot(page: Page, name: str) -> Path:
    """A full-page PNG of the page at its width: test-artifacts/connect/<name>-<width>.png."""
    size = page.viewport_size
    assert size is not None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}-{size['width']}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def check_state(page: Page, name: str) -> None:
    """At each width: no axe violation, and a screenshot named for the state."""
    size = page.viewport_size
    assert size is not None
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": HEIGHT})
        assert_accessible(page)
        screenshot(page, name)
    page.set_viewport_size(size)
