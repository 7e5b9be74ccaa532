"""`broker demo`: the whole tenant lifecycle against the local Pleo sandbox, narrated.

Everything runs in this process on free 127.0.0.1 ports with a throwaway local store:
the sandbox stands in for Pleo, the broker serves its proxy and admin listeners, and the
narration talks to both over HTTP exactly as an operator's tooling would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import os
import re
import secrets
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from broker.events import configure_logging
from broker.sandbox import create_app as create_sandbox_app
from broker.server import Listener, bind, run_listeners, serve
from broker.settings import Settings

DEMO_SCOPES = [
    "export-jobs:read",
    "export-jobs:write",
    "export-items:read",
    "users:read",
    "companies:read",  # lets the connect page show the company's name
]
TENANT = "acme-accounting"


@dataclass(frozen=True)
class SandboxKey:
    """A key the sandbox generated, as its control API describes it."""

    api_key: str = field(repr=False)  # a sandbox key, but a key: kept out of logs all the same
    key_id: str
    company_id: str
    scopes: tuple[str, ...]


class Narrator:
    """Prints the story for a person watching."""

    def __init__(self) -> None:
        self.step = 0
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self._bold = "\033[1m" if color else ""
        self._dim = "\033[2m" if color else ""
        self._reset = "\033[0m" if color else ""

    def title(self, text: str) -> None:
        self.step += 1
        print(f"\n{self._bold}{self.step}. {text}{self._reset}", flush=True)

    def say(self, text: str) -> None:
        print(f"   {text}", flush=True)

    def detail(self, text: str) -> None:
        print(f"   {self._dim}{text}{self._reset}", flush=True)


async def run_demo(*, keep_running: bool = False) -> int:
    """Run the narrated lifecycle; 0 when every step behaved as the design says."""
    configure_logging("ERROR", "text")
    with tempfile.TemporaryDirectory(prefix="broker-demo-") as data:
        sandbox_sock = bind("127.0.0.1", 0)
        sandbox_url = f"http://127.0.0.1:{sandbox_sock.getsockname()[1]}"
        admin_token = secrets.token_urlsafe(24)
        connect_url = f"http://127.0.0.1:{_free_port()}"
        settings = Settings(
            pleo_base_url=sandbox_url,
            proxy_port=0,
            admin_port=0,
            connect_port=int(connect_url.rsplit(":", 1)[1]),
            connect_public_url=connect_url,
            connect_integration_name="Acme Accounting",
            admin_token=admin_token,
            required_scopes=("export-jobs:read", "export-jobs:write"),
            store_path=Path(data) / "store",
            master_key=base64.b64encode(secrets.token_bytes(32)).decode(),
            cache_ttl=2.0,
        )
        stop = asyncio.Event()
        ports: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        sandbox = asyncio.create_task(
            run_listeners([Listener("sandbox", create_sandbox_app(), sandbox_sock)], stop=stop)
        )
        broker = asyncio.create_task(
            serve(settings, stop=stop, started=lambda p, a, _c: ports.set_result((p, a)))
        )
        try:
            proxy_port, admin_port = await asyncio.wait_for(ports, 15)
            story = Story(
                sandbox_url,
                f"http://127.0.0.1:{proxy_port}",
                f"http://127.0.0.1:{admin_port}",
                admin_token,
                connect_url,
            )
            async with story:
                ok = await story.tell()
                link = await story.link() if keep_running else ""
            if keep_running:
                print(
                    f"\nStill running (Ctrl-C to stop):\n"
                    f"  connect  {link}  (the customer's page: open it in a browser)\n"
                    f"  sandbox  {sandbox_url}  (control API: {sandbox_url}/_sandbox/)\n"
                    f"  proxy    http://127.0.0.1:{proxy_port}  (X-Broker-Tenant: {TENANT})\n"
                    f"  admin    http://127.0.0.1:{admin_port}  (throwaway demo token below)\n"
                    f"  export BROKER_ADMIN_TOKEN={admin_token} BROKER_ADMIN_PORT={admin_port}\n"
                    f"  broker tenants list",
                    flush=True,
                )
                await stop.wait()
            return 0 if ok else 1
        finally:
            stop.set()
            for task in (sandbox, broker):
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class Story:
    """The narrated steps, each checked against what the design promises."""

    def __init__(self, sandbox: str, proxy: str, admin: str, token: str, connect: str) -> None:
        self.n = Narrator()
        self.page = httpx.AsyncClient(base_url=connect, trust_env=False, timeout=10)
        self.sandbox = httpx.AsyncClient(base_url=sandbox, trust_env=False, timeout=10)
        self.proxy = httpx.AsyncClient(base_url=proxy, trust_env=False, timeout=10)
        self.admin = httpx.AsyncClient(
            base_url=admin,
            trust_env=False,
            timeout=10,
            headers={"Authorization": f"Bearer {token}"},
        )
        self.failures: list[str] = []

    async def __aenter__(self) -> Story:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in (self.sandbox, self.proxy, self.admin, self.page):
            await client.aclose()

    def expect(self, what: str, condition: bool) -> None:
        if not condition:
            self.failures.append(what)
            self.n.say(f"!! unexpected: {what}")

    async def new_key(
        self, company_id: str | None = None, scopes: list[str] | None = None
    ) -> SandboxKey:
        body: dict[str, object] = {"scopes": scopes or DEMO_SCOPES}
        if company_id:
            body["company_id"] = company_id
        response = await self.sandbox.post("/_sandbox/keys", json=body)
        response.raise_for_status()
        key = response.json()
        return SandboxKey(
            api_key=key["api_key"],
            key_id=key["key_id"],
            company_id=key["company_id"],
            scopes=tuple(key["scopes"]),
        )

    async def connect(self, api_key: str) -> httpx.Response:
        return await self.admin.put(f"/v1/tenants/{TENANT}/key", json={"api_key": api_key})

    async def via_proxy(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: object = None,
    ) -> httpx.Response:
        return await self.proxy.request(
            method, path, headers={"X-Broker-Tenant": TENANT}, params=params, json=json
        )

    def show_error(self, response: httpx.Response) -> None:
        error = response.json()["error"]
        self.n.say(f"→ {response.status_code} {error['code']}")
        self.n.detail(f'"{error["message"]}"')

    async def tell(self) -> bool:
        n = self.n
        print("Pleo Key Broker demo: a local Pleo sandbox, the broker, and one customer tenant.")

        n.title("A customer installs the integration; Pleo generates their key")
        first = await self.new_key()
        company = first.company_id
        n.say(f"Sandbox company {company}, scopes: {', '.join(first.scopes)}")

        n.title(f"Connect tenant '{TENANT}' with that key (PUT /v1/tenants/{TENANT}/key)")
        response = await self.connect(first.api_key)
        view = response.json()
        self.expect("activation answers 200", response.status_code == 200)
        n.say(
            f"→ {response.status_code} state={view.get('state')}"
            f" company_id={view.get('company_id')}"
        )
        n.say(f"  the key is shown only as its hint: {view.get('key_hint')}")
        self.expect("company bound", view.get("company_id") == company)
        installation = view.get("installation") or {}
        n.say(
            f"  its installation in Pleo: status={installation.get('status')}"
            f" (synced {installation.get('synced_at')}, error={installation.get('error')})"
        )
        self.expect("installation in step", installation.get("status") == "ACTIVATED")

        n.title("A mistyped key is refused, and the working key stays in place")
        response = await self.connect(first.api_key[:-3] + "xyz")
        self.show_error(response)
        self.expect("wrong key → 422 key_invalid", response.status_code == 422)
        still = (await self.admin.get(f"/v1/tenants/{TENANT}")).json()
        n.say(f"  tenant is still {still['state']} on key {still['key_hint']}")
        self.expect("still active", still["state"] == "active")

        n.title("A key of another Pleo company is refused (no silent switch of customer)")
        other = await self.new_key()
        response = await self.connect(other.api_key)
        self.show_error(response)
        self.expect("foreign company → 409", response.status_code == 409)

        n.title("An internal service calls Pleo through the proxy, without any key")
        response = await self.via_proxy("GET", "/v3/export-jobs")
        n.say(f"GET /v3/export-jobs  X-Broker-Tenant: {TENANT}  → {response.status_code}")
        n.detail("the broker injected the key and filled in company_id for this tenant")
        self.expect("proxied GET → 200", response.status_code == 200)

        n.title("The proxy keeps the service inside the tenant's company and scopes")
        response = await self.via_proxy(
            "GET", "/v3/export-jobs", params={"company_id": other.company_id}
        )
        n.say("GET /v3/export-jobs?company_id=<another company>")
        self.show_error(response)
        self.expect("foreign company id → 403 company_mismatch", response.status_code == 403)
        response = await self.via_proxy("POST", "/v1/vendors:search", json={})
        n.say("POST /v1/vendors:search (needs vendors:read, which this key was not granted)")
        self.show_error(response)
        self.expect("route outside scopes → 403 scope_not_granted", response.status_code == 403)

        n.title("The customer rotates their key in Pleo; the operator pastes the new one")
        rotated = await self.new_key(company_id=company)
        response = await self.connect(rotated.api_key)
        view = response.json()
        n.say(f"→ {response.status_code} state={view.get('state')} key_hint={view.get('key_hint')}")
        self.expect("rotation → 200", response.status_code == 200)

        n.title("The key is revoked in Pleo; a check finds the tenant broken")
        await self.sandbox.post(f"/_sandbox/keys/{rotated.key_id}/revoke")
        response = await self.admin.post(f"/v1/tenants/{TENANT}/check")
        view = response.json()
        n.say(f"→ state={view.get('state')} reason={view.get('reason')}")
        n.detail(f'"{view.get("message")}"')
        self.expect("check → broken key_rejected", view.get("reason") == "key_rejected")
        response = await self.via_proxy("GET", "/v3/export-jobs")
        n.say("Calls for the tenant now stop at the broker, without reaching Pleo:")
        self.show_error(response)
        self.expect("broken tenant → 424", response.status_code == 424)

        n.title("The customer reconnects on the connect page, with a one-time link")
        fresh = await self.new_key(company_id=company)
        state = await self.reconnect_on_the_page(fresh.api_key, company)
        n.say(f"the page now says: {state}")
        view = (await self.admin.get(f"/v1/tenants/{TENANT}")).json()
        n.say(f"→ state={view.get('state')} key_hint={view.get('key_hint')}")
        self.expect("reconnect → active", view.get("state") == "active")
        response = await self.via_proxy("GET", "/v3/export-jobs")
        n.say(f"GET /v3/export-jobs through the proxy → {response.status_code}")
        self.expect("proxied GET after reconnect → 200", response.status_code == 200)

        if self.failures:
            print(f"\nDemo finished with {len(self.failures)} unexpected result(s).")
            return False
        print("\nDemo finished: every step behaved as designed.")
        return True

    async def link(self) -> str:
        """A fresh one-time link to the tenant's connect page (`POST …/connect-sessions`)."""
        response = await self.admin.post(f"/v1/tenants/{TENANT}/connect-sessions", json={})
        response.raise_for_status()
        url: str = response.json()["url"]
        return url

    async def reconnect_on_the_page(self, api_key: str, company: str) -> str:
        """Open a link and paste `api_key` as a customer's browser would; the page's state."""
        url = await self.link()
        self.n.say(f"POST /v1/tenants/{TENANT}/connect-sessions → {url[:48]}…")
        page = await self.page.get(url)
        self.n.say(f"GET the link → {page.status_code}, the page shows: {_state(page.text)}")
        self.expect("the page shows the broken tenant", _state(page.text) == "broken")
        form = {"api_key": api_key, "csrf_token": _field(page.text, "csrf_token")}
        self.n.say("the customer pastes the new key and presses Connect (a form post)")
        done = await self.page.post(url, data=form)
        self.expect("the page says success", _state(done.text) == "success")
        self.expect("the page names the company", f">{company}<" in done.text)
        self.expect("the key never comes back", api_key not in done.text)
        again = await self.page.get(url)
        self.n.say(f"the link was single use: opening it again → {again.status_code}")
        self.expect("a used link is dead", again.status_code == 404)
        return _state(done.text)


def _state(page: str) -> str:
    found = re.search(r'data-state="([a-z_]+)"', page)
    return found[1] if found else "?"


def _field(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    return html.unescape(found[1]) if found else ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
