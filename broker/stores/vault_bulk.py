"""Reading many tenants' secrets at once: a full list (the broker's start, a full reload).

hvac's calls go through requests: ~0.7 ms of CPU each, so reading 50,000 tenants at start
took about a minute on two cores, the broker's own CPU the limit. `BulkReader` reads the
newest version of each secret with aiohttp on the event loop instead (~0.15 ms each), at most
`limit` at once, with the hvac client's address, token, namespace and CA bundle, and nothing
from the environment. It answers only what it can tell for sure: a readable secret's data and
version (200), or no secret (404, as hvac's `InvalidPath`). Anything else (403: the token may
need a new login; 429, 5xx, a transport error, a timeout, an answer it cannot parse) raises
`Unanswered`, and the store reads that tenant through hvac as it always did, so its retries,
errors and messages stay the same.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp
import hvac
import requests.utils

SecretData = dict[str, object]


class Unanswered(Exception):
    """The bulk read cannot tell: read this secret through hvac."""


def tls_context(verify: object) -> ssl.SSLContext | bool:
    """What aiohttp verifies a server with, for requests' `verify` (True: requests' own CA
    bundle; a path: that CA file; False: nothing)."""
    if verify is False:
        return False
    cafile = verify if isinstance(verify, str) else requests.utils.DEFAULT_CA_BUNDLE_PATH
    return ssl.create_default_context(cafile=cafile)


class BulkReader:
    """Reads KV v2 secrets on `mount` with aiohttp, for as long as its `session` block runs."""

    def __init__(self, client: hvac.Client, *, mount: str, timeout: float, limit: int) -> None:
        self._client = client
        self._mount = mount
        self._timeout = timeout
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[BulkReader]:
        """Open the connections (at most `limit`) for the reads, and close them after."""
        connector = aiohttp.TCPConnector(
            limit=self._limit, ssl=tls_context(self._client.session.verify)
        )
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            trust_env=False,
        ) as session:
            self._session = session
            try:
                yield self
            finally:
                self._session = None

    async def read(self, path: str) -> tuple[SecretData, int] | None:
        """The newest version's data and number of the secret at `path` (None: no secret)."""
        assert self._session is not None, "read inside `session`"
        url = f"{self._client.url.rstrip('/')}/v1/{quote(self._mount)}/data/{quote(path)}"
        try:
            async with self._session.get(url, headers=self._headers()) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise Unanswered(response.status)
                body = await response.read()
            return _found(json.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            raise Unanswered(type(exc).__name__) from exc

    def _headers(self) -> dict[str, str]:
        headers = {"X-Vault-Request": "true", "X-Vault-Token": self._client.token or ""}
        namespace = self._client.adapter.namespace
        if namespace:
            headers["X-Vault-Namespace"] = namespace
        return headers


def _found(body: Any) -> tuple[SecretData, int]:
    data = body["data"]
    secret = data["data"]
    if not isinstance(secret, dict):
        raise TypeError("no secret data")
    return secret, int(data["metadata"]["version"])
