"""A library's repeated work, shared in the test process.

Every httpx client (each `httpx.get`, each broker's Pleo client) loads the CA bundle into a new
TLS context: 20 ms each. Here clients that verify with the default bundle share one context
(`share_tls_context`); one with other TLS settings still gets its own. Nothing else changes:
the same code runs, only one file is parsed fewer times. `broker serve` run as a process
(tests marked real) does not have it.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from typing import Any

import httpx._transports.default as httpx_transports


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
