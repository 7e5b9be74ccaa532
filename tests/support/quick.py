"""Idle waits of libraries, shortened for the test process (servers and clients on threads).

Two costs dominated the fast suite, neither of them work the tests asked for:
- uvicorn polls its exit flag every 0.1 s and waits 0.1 s more while it shuts down: 0.2-0.3 s
  for every server a test stops. Here those waits are 5 ms (`quicken_uvicorn`).
- every httpx client (each `httpx.get`, each broker's Pleo client) loads the CA bundle into a
  new TLS context: 20 ms each. Here clients that verify with the default bundle share one
  context (`share_tls_context`); one with other TLS settings still gets its own.

Nothing else changes: the same code runs, only the length of idle waits and the number of
times one file is parsed. `broker serve` run as a process (tests marked real) has neither.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import types
from collections.abc import Callable
from typing import Any

import httpx._transports.default as httpx_transports
import uvicorn.server

UVICORN_TICK = 0.1  # uvicorn's polling interval (uvicorn/server.py)
TEST_TICK = 0.005


class _QuickTicks(types.ModuleType):
    """`asyncio` as uvicorn's server module sees it, with its 0.1 s waits made 5 ms."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        return await asyncio.sleep(TEST_TICK if delay == UVICORN_TICK else delay, result)


def quicken_uvicorn() -> Callable[[], None]:
    """Make uvicorn notice a stop in 5 ms instead of 0.1-0.3 s; returns the undo."""
    module = vars(uvicorn.server)
    original = module["asyncio"]
    module["asyncio"] = _QuickTicks("asyncio")

    def undo() -> None:
        module["asyncio"] = original

    return undo


def share_tls_context() -> Callable[[], None]:
    """Let httpx clients that verify with the default CA bundle share one TLS context;
    returns the undo."""
    module = vars(httpx_transports)
    original: Callable[..., ssl.SSLContext] = module["create_ssl_context"]

    @functools.cache
    def default_context(trust_env: bool) -> ssl.SSLContext:
        return original(verify=True, cert=None, trust_env=trust_env)

    def create_ssl_context(
        verify: Any = True, cert: Any = None, trust_env: bool = True
    ) -> ssl.SSLContext:
        if verify is True and cert is None:
            return default_context(trust_env)
        return original(verify=verify, cert=cert, trust_env=trust_env)

    module["create_ssl_context"] = create_ssl_context

    def undo() -> None:
        module["create_ssl_context"] = original

    return undo
