"""Reading many tenants' secrets at once: a full list (the broker's start, a full reload).

hvac's calls go through requests: ~0.7 ms of CPU each, so reading 50,000 tenants at start
took about a minute on two cores, the broker's own CPU the limit. `BulkReader` reads the
newest version of each secret with the data plane's client (`broker.wire_pool`) on the event
loop instead (~0.15 ms each), at most
`limit` at once, with the hvac client's address, token, namespace and CA bundle, and nothing
from the environment; the history check at start reads the version lists the same way. It
answers only what it can tell for sure: a readable secret's data and version, or a version
list (200), or none (404, as hvac's `InvalidPath`). Anything else (403: the token may
need a new login; 429, 5xx, a transport error, a timeout, an answer it cannot parse) raises
`Unanswered`, and the store reads that tenant through hvac as it always did, so its retries,
errors and messages stay the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import hvac
import requests.utils

from broker.stores.vault_kv import SecretData, Versions
from broker.wire import MAX_READ, WireError
from broker.wire_pool import Pool


class Unanswered(Exception):
    """The bulk read cannot tell: read this secret through hvac."""


def tls_context(verify: object) -> ssl.SSLContext:
    """What the bulk read verifies an https Vault with, for requests' `verify` (True:
    requests' own CA bundle; a file: that CA bundle; a directory: the CA certificates in it,
    named by subject hash as `c_rehash` does, as requests reads one; False: nothing, as
    hvac was told). Raises if the file cannot be read as a CA bundle."""
    if verify is False:
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        return unverified
    if isinstance(verify, str) and os.path.isdir(verify):
        return ssl.create_default_context(capath=verify)
    cafile = verify if isinstance(verify, str) else requests.utils.DEFAULT_CA_BUNDLE_PATH
    return ssl.create_default_context(cafile=cafile)


class BulkReader:
    """Opens sessions that read KV v2 secrets on `mount` the way the hvac client would."""

    def __init__(
        self,
        client: hvac.Client,
        ensure: Callable[[], Awaitable[None]],
        *,
        mount: str,
        timeout: float,
    ) -> None:
        self._client = client
        self._ensure = ensure  # a valid token before each read (the store's `TokenKeeper`)
        self._mount = mount
        self._timeout = timeout

    @property
    def timeout(self) -> float:
        """Seconds one read may take in all."""
        return self._timeout

    @asynccontextmanager
    async def session(self, limit: int) -> AsyncIterator[BulkReads]:
        """Reads over at most `limit` connections, closed when the block ends."""
        url = self._client.url
        pool: Pool | None = None
        try:
            context = tls_context(self._client.session.verify) if url.startswith("https:") else None
        except Exception:
            # No CA to verify with (a CA file missing or not one): no pool, so every secret
            # is read through hvac, which says what is wrong as it always did.
            context = None
        else:
            pool = Pool(
                url, connect_timeout=self._timeout, read_timeout=self._timeout, ssl_context=context
            )
        try:
            yield BulkReads(self, pool, asyncio.Semaphore(limit))
        finally:
            if pool is not None:
                await pool.close()

    async def request(self, kind: str, path: str) -> tuple[str, dict[str, str]]:
        """The target (path under the Vault address) and headers of a read of `kind` (data,
        metadata) at `path`, as hvac would send it, the token made sure of first."""
        await self._ensure()
        return f"/v1/{quote(self._mount)}/{kind}/{quote(path)}", _headers(self._client)


class BulkReads:
    """One session's reads (`BulkReader.session`)."""

    def __init__(self, reader: BulkReader, pool: Pool | None, slots: asyncio.Semaphore) -> None:
        self._reader = reader
        self._pool = pool
        self._slots = slots

    async def read(self, path: str) -> tuple[SecretData, int] | None:
        """The newest version's data and number of the secret at `path` (None: no secret)."""
        body = await self._get("data", path)
        return None if body is None else _found(body)

    async def metadata(self, path: str) -> Versions | None:
        """The secret's version list (None: no metadata at all)."""
        body = await self._get("metadata", path)
        return None if body is None else _versions(body)

    async def _get(self, kind: str, path: str) -> Any:
        """The parsed answer (None: 404); `Unanswered` for anything but 200 and 404 (and
        for everything without a pool: no TLS context could be made)."""
        if self._pool is None:
            raise Unanswered("no TLS context")
        target, headers = await self._reader.request(kind, path)
        try:
            async with self._slots, asyncio.timeout(self._reader.timeout):
                response = await self._pool.request("GET", target, headers, None)
                try:
                    if response.status == 404:
                        return None
                    if response.status != 200:
                        raise Unanswered(response.status)
                    return json.loads(await response.read(limit=MAX_READ))
                finally:
                    response.close()
        except (WireError, OSError, TimeoutError, ValueError) as exc:
            raise Unanswered(type(exc).__name__) from exc


def _headers(client: hvac.Client) -> dict[str, str]:
    headers = {"X-Vault-Request": "true", "X-Vault-Token": client.token or ""}
    namespace = client.adapter.namespace
    if namespace:
        headers["X-Vault-Namespace"] = namespace
    return headers


def _versions(body: Any) -> Versions:
    try:
        return Versions.decode(body["data"])
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise Unanswered(type(exc).__name__) from exc


def _found(body: Any) -> tuple[SecretData, int]:
    try:
        data = body["data"]
        secret = data["data"]
        version = int(data["metadata"]["version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise Unanswered(type(exc).__name__) from exc
    if not isinstance(secret, dict):
        raise Unanswered("no secret data")
    return secret, version
