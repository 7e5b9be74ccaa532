"""The Pleo client of the control plane: key introspection over httpx.

    PleoError                 (in broker.errors, under BrokerError)
    ├── PleoKeyRejected       Pleo answered 401/403: the key itself is not accepted
    ├── PleoUnreachable       connection failure, timeout, 5xx or 429 (407: the egress proxy)
    └── PleoUnexpectedAnswer  any other answer, or a body that is not an introspection

`explain` is the one place these become the errors the admin API answers.

`subjectURN` is optional in Pleo's introspection spec; when it is missing, the company comes
from the key's installation (`GET /v1/installations/me`, its `resource`), as Pleo's own guides
take it. Both calls go through the egress proxy when one is configured.

The data plane does not use this module: it forwards with its own client (see wire.py). The
HTTP client itself (httpx, `broker.pleo_http`) is made at the first call to Pleo, not at start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from broker import errors
from broker.errors import PleoError as PleoError
from broker.errors import PleoKeyRejected as PleoKeyRejected
from broker.errors import PleoUnexpectedAnswer as PleoUnexpectedAnswer
from broker.errors import PleoUnreachable as PleoUnreachable
from broker.records import ApiKey
from broker.throttle import retry_after_seconds

if TYPE_CHECKING:
    import httpx

    from broker.pleo_http import PleoHttp

COMPANY_URN = re.compile(
    r"urn:pleo:company:([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
)


NOT_UNDERSTOOD = (
    "Pleo gave an answer the broker did not understand while checking the key."
    " Try again in a few minutes; if it persists, contact support."
)


def explain(failure: PleoError, *, tenant: str | None = None) -> errors.ActivationError:
    """The admin API's error for a failed introspection: of a key being activated, or
    (`tenant` given) of a tenant's stored key being checked.

    A key Pleo rejects is `key_invalid` when activating; a check breaks the tenant instead
    and never asks for this. Otherwise Pleo is unavailable: a check says only that, an
    activation also says when Pleo's answer was not understood.
    """
    if tenant is not None:
        return errors.PleoUnavailable(tenant=tenant)
    if isinstance(failure, PleoKeyRejected):
        return errors.KeyInvalid()
    if isinstance(failure, PleoUnexpectedAnswer):
        return errors.PleoUnavailable(NOT_UNDERSTOOD)
    return errors.PleoUnavailable()


def basic_auth(key: ApiKey) -> str:
    """The Authorization header value Pleo expects (`ApiKey.basic_auth`)."""
    return key.basic_auth()


@dataclass(frozen=True, slots=True)
class Introspection:
    """What Pleo says about a key.

    `subject_urn` is introspection's `subjectURN`, or the installation's `resource` when
    introspection named no subject (`subject_from_installation`); empty when neither did.
    """

    auth_method: str
    subject_urn: str
    scopes: frozenset[str]
    client_id: str | None = None
    application_name: str | None = None
    subject_from_installation: bool = False

    @property
    def company_id(self) -> str | None:
        """The company UUID of a company-scoped key (lower case), else None."""
        match = COMPANY_URN.fullmatch(self.subject_urn)
        return match.group(1).lower() if match else None


class PleoClient:
    """Calls Pleo's control-plane endpoints with one pooled httpx client, made (and httpx
    imported) at the first call: a broker that never calls Pleo never loads it."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        timeout: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
        proxy: str | None = None,
    ) -> None:
        """`proxy` is an egress proxy URL (credentials in it become Proxy-Authorization)."""
        self._base_url = base_url
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._transport = transport
        self._proxy = proxy
        self._http: PleoHttp | None = None
        self._closed = False

    async def introspect(self, key: ApiKey) -> Introspection:
        """`GET /v1/introspect` with `key` (and, when it names no subject, the installation's
        resource); raises a PleoError subclass when there is no answer."""
        response = await self._get("/v1/introspect", key)
        if response.status_code in (401, 403):
            raise PleoKeyRejected(response.status_code)
        _raise_unless_ok(response)
        info = _parse_introspection(response)
        if info.subject_urn:
            return info
        resource = await self.installation_resource(key)
        if resource is None:
            return info
        return replace(info, subject_urn=resource, subject_from_installation=True)

    async def installation_resource(self, key: ApiKey) -> str | None:
        """The `resource` URN of the key's installation (`GET /v1/installations/me`), or None
        when Pleo has no installation this key may read (403, 404)."""
        response = await self._get("/v1/installations/me", key)
        if response.status_code == 401:
            raise PleoKeyRejected(response.status_code)
        if response.status_code in (403, 404):
            return None
        _raise_unless_ok(response)
        try:
            resource = response.json()["resource"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PleoUnexpectedAnswer("Pleo's installation answer was not understood") from exc
        if not isinstance(resource, str):
            raise PleoUnexpectedAnswer("Pleo's installation resource was not a string")
        return resource

    async def company_name(self, key: ApiKey, company_id: str) -> str | None:
        """The company's name (`GET /v1/companies/{id}`), or None when the key may not read
        it or the answer has none; raises a PleoError subclass when Pleo does not answer."""
        if not company_id.replace("-", "").isalnum():
            return None
        response = await self._get(f"/v1/companies/{company_id}", key)
        if response.status_code != 200:
            return None
        try:
            body = response.json()
        except ValueError:
            return None
        found = body.get("data", body) if isinstance(body, dict) else None
        name = found.get("name") if isinstance(found, dict) else None
        return name.strip()[:200] or None if isinstance(name, str) else None

    async def installation(self, key: ApiKey) -> dict[str, Any] | None:
        """The key's installation (`GET /v1/installations/me`), or None when there is none
        (404); raises a PleoError subclass on any other failure."""
        response = await self._get(INSTALLATION, key)
        if response.status_code == 404:
            return None
        return _installation_of(response, "reading")

    async def put_installation(
        self, key: ApiKey, status: str, metadata: dict[str, Any], *, create: bool = True
    ) -> InstallationChange:
        """Make the key's installation hold `status` and `metadata` (merged over what it
        holds): create it when there is none (`POST`; unless not `create`: then nothing is
        done), update it when it differs (`PUT`)."""
        current = await self.installation(key)
        if current is None and not create:
            return InstallationChange(None, None)
        if current is None:
            body = {"status": status, "metadata": metadata}
            created = _installation_of(await self._send("POST", key, body), "creating")
            if created.get("status") == status:
                return InstallationChange(None, status)
            current = created  # a Pleo that creates in its own status: set ours
        held = current.get("metadata")
        held = held if isinstance(held, dict) else {}
        merged = {**held, **metadata}
        previous = current.get("status") if isinstance(current.get("status"), str) else None
        if previous != status or merged != held:
            body = {"status": status, "metadata": merged}
            _installation_of(await self._send("PUT", key, body), "updating")
        return InstallationChange(previous, status)

    async def delete_installation(self, key: ApiKey) -> bool:
        """Delete the key's installation (`DELETE /v1/installations/me`), which revokes the
        key's access in Pleo; False when there was none (404)."""
        response = await self._send("DELETE", key, None)
        if response.status_code == 404:
            return False
        if response.status_code in (401, 403):
            raise PleoKeyRejected(response.status_code)
        if response.status_code != 204:
            _raise_unless_ok(response, "deleting the installation")
        return True

    async def _send(self, method: str, key: ApiKey, body: object) -> httpx.Response:
        return await self._connection().request(method, INSTALLATION, key.basic_auth(), body)

    async def _get(self, path: str, key: ApiKey) -> httpx.Response:
        return await self._connection().request("GET", path, key.basic_auth())

    def _connection(self) -> PleoHttp:
        if self._closed:
            raise RuntimeError("the Pleo client is closed")
        if self._http is None:
            from broker.pleo_http import PleoHttp  # httpx: at the first call, not at start

            self._http = PleoHttp(
                self._base_url,
                connect_timeout=self._connect_timeout,
                timeout=self._timeout,
                transport=self._transport,
                proxy=self._proxy,
            )
        return self._http

    async def aclose(self) -> None:
        self._closed = True
        if self._http is not None:
            await self._http.aclose()


INSTALLATION = "/v1/installations/me"


@dataclass(frozen=True, slots=True)
class InstallationChange:
    """What `put_installation` did: the status Pleo held before (None: it created the
    installation) and the one it holds now."""

    previous: str | None
    status: str | None

    @property
    def changed(self) -> bool:
        return self.previous != self.status


def _installation_of(response: httpx.Response, doing: str) -> dict[str, Any]:
    """The installation an answer holds; a PleoError subclass when it holds none."""
    if response.status_code in (401, 403):
        raise PleoKeyRejected(response.status_code)
    _raise_unless_ok(response, f"{doing} the installation")
    try:
        found = response.json()
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise PleoUnexpectedAnswer(f"Pleo's answer {doing} the installation was not understood")
    return found


def _raise_unless_ok(response: httpx.Response, doing: str | None = None) -> None:
    if response.status_code == 407:  # Pleo is no proxy: this is the egress proxy speaking
        raise PleoUnreachable(
            "The egress proxy refused the broker (HTTP 407): check the credentials in"
            " BROKER_UPSTREAM_PROXY"
        )
    while_doing = f" while {doing}" if doing is not None else ""
    said = f"Pleo answered HTTP {response.status_code}{while_doing}"
    if response.status_code == 429:  # `retry_after`: seconds, for whoever calls again
        wait = retry_after_seconds(response.headers.get("retry-after"))
        raise PleoUnreachable(said, answered=429, retry_after=wait)
    if response.status_code >= 500:
        raise PleoUnreachable(said, answered=response.status_code)
    if response.status_code != 200:
        raise PleoUnexpectedAnswer(said, answered=response.status_code)


def _parse_introspection(response: httpx.Response) -> Introspection:
    try:
        data = response.json()["data"]
        auth_method = data["authMethod"]
        subject = data.get("subjectURN") or ""
        scope = data.get("scope") or ""
    except (ValueError, KeyError, TypeError) as exc:
        raise PleoUnexpectedAnswer("Pleo's introspection answer was not understood") from exc
    if not isinstance(auth_method, str) or not isinstance(subject, str):
        raise PleoUnexpectedAnswer("Pleo's introspection answer was not understood")
    if not isinstance(scope, str):
        raise PleoUnexpectedAnswer("Pleo's introspection scope was not a string")
    client_id = data.get("clientId")
    app = data.get("applicationName")
    return Introspection(
        auth_method=auth_method,
        subject_urn=subject,
        scopes=frozenset(scope.split()),
        client_id=client_id if isinstance(client_id, str) else None,
        application_name=app if isinstance(app, str) else None,
    )
