"""The HTTP side of the Pleo client (`broker.pleo`): one pooled httpx client, cookieless.

Imported by `PleoClient` at its first call to Pleo, not when the broker starts: a sidecar
that never activates or checks a key does not carry httpx (docs/decisions.md, "What
`broker serve` imports when"). Transport failures become `PleoUnreachable` here.
"""

from __future__ import annotations

from typing import Any

import httpx

from broker.errors import PleoUnreachable


class _CookielessTransport(httpx.AsyncBaseTransport):
    """Drops `Set-Cookie` before the client sees it: one client checks every tenant's key,
    so a cookie Pleo sets while checking one key must never travel with another."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if "set-cookie" in response.headers:
            del response.headers["set-cookie"]
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class PleoHttp:
    """Pleo's base URL behind one httpx client that keeps no cookies and reads no environment."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        timeout: float,
        transport: httpx.AsyncBaseTransport | None,
        proxy: str | None,
    ) -> None:
        if transport is None:
            transport = httpx.AsyncHTTPTransport(trust_env=False, proxy=proxy)
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            follow_redirects=False,
            trust_env=False,
            transport=_CookielessTransport(transport),
            headers={"Accept": "application/json", "User-Agent": "pleo-key-broker"},
        )

    async def request(
        self, method: str, path: str, authorization: str, body: Any = None
    ) -> httpx.Response:
        """Pleo's answer; `PleoUnreachable` when there is none (a timeout, a transport error)."""
        try:
            return await self._client.request(
                method, path, headers={"Authorization": authorization}, json=body
            )
        except httpx.TimeoutException as exc:
            raise PleoUnreachable("Pleo did not answer in time") from exc
        except httpx.TransportError as exc:
            raise PleoUnreachable(f"Pleo could not be reached ({type(exc).__name__})") from exc

    async def aclose(self) -> None:
        await self._client.aclose()
