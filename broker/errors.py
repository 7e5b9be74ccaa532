"""The broker's errors: one tree, each class with its HTTP status and stable code.

    BrokerError
    ├── AdminUnauthorized            401 admin_unauthorized
    ├── CallerError                  (BROKER_CALLERS_FILE: who may use which tenant)
    │   ├── CallerUnauthenticated    401 caller_unauthenticated
    │   └── CallerNotAllowed         403 caller_not_allowed
    ├── TenantThrottled              (answered locally, with Retry-After, without calling Pleo)
    │   ├── UpstreamRateLimited      429 upstream_rate_limited (Pleo's Retry-After still runs)
    │   └── TenantBusy               429 tenant_busy (BROKER_TENANT_MAX_IN_FLIGHT reached)
    ├── TenantError
    │   ├── TenantMissing            400 tenant_missing
    │   ├── TenantInvalid            400 tenant_invalid
    │   ├── TenantUnknown            404 tenant_unknown
    │   ├── TenantNotActive          424 tenant_not_active
    │   └── TenantChanged            409 tenant_changed (key replaced while the request arrived)
    ├── ActivationError              (PUT /v1/tenants/{tenant}/key)
    │   ├── KeyInvalid               422 key_invalid
    │   ├── KeyNotApiKey             422 key_not_api_key
    │   ├── KeyNotCompanyScoped      422 key_not_company_scoped
    │   ├── KeyWrongIntegration      422 key_wrong_integration
    │   ├── ScopesMissing            422 scopes_missing
    │   ├── CompanyChanged           409 company_changed
    │   ├── CompanyInUse             409 company_in_use
    │   └── PleoUnavailable          503 pleo_unavailable
    ├── PolicyDenied
    │   ├── RouteNotAllowed          403 route_not_allowed
    │   ├── ScopeNotGranted          403 scope_not_granted
    │   ├── CompanyMismatch          403 company_mismatch
    │   ├── BodyInvalid              400 body_invalid
    │   ├── BodyTooLarge             413 body_too_large
    │   ├── ContentTypeInvalid       400 content_type_invalid
    │   ├── HostNotAllowed           400 host_not_allowed
    │   └── BrowserRequestRefused    403 browser_request_refused
    ├── ConnectError                 (connect links: the admin API's connect-sessions routes)
    │   ├── ConnectDisabled          409 connect_disabled (BROKER_CONNECT_PUBLIC_URL is unset)
    │   └── ConnectSessionUnknown    404 connect_session_unknown
    ├── RequestTimeout               408 request_timeout (a request body slower than allowed)
    ├── UpstreamError
    │   ├── UpstreamUnreachable      502 upstream_unreachable
    │   ├── UpstreamTimeout          504 upstream_timeout
    │   └── UpstreamBusy             503 upstream_busy (no connection to Pleo free in time)
    ├── StoreError                   (the secret store failed; catch this, not the root)
    │   ├── StoreUnavailable         503 store_unavailable
    │   ├── StoreConflict            409 store_conflict (a concurrent write won; retry)
    │   ├── StoreIntegrityError      500 store_integrity (wrong master key or tampered record)
    │   └── UnsealError              (a sealed value did not open; the store answers integrity)
    ├── PleoError                    (introspection failed; broker.pleo translates it)
    │   ├── PleoKeyRejected          (Pleo answered 401/403: the key itself is not accepted)
    │   ├── PleoUnreachable          (connection failure, timeout, 5xx, 429, or a 407)
    │   └── PleoUnexpectedAnswer     (any other answer, or a body that is not an introspection)
    ├── ConfigError                  (a setting is missing or wrong: start-up stops)
    ├── CatalogError                 (the route catalog is unreadable; also a ValueError)
    ├── RequestInvalid               400 request_invalid (a malformed admin request body)
    └── ListenerRefusal              (answered by a listener itself, before or instead of the app)
        ├── RequestMalformed         400 request_malformed
        ├── HeaderTimeout            408 header_timeout
        ├── TargetTooLong            414 target_too_long
        ├── HeaderTooLarge           431 header_too_large
        ├── TooManyConnections       503 too_many_connections
        ├── TooManyPipelined         503 too_many_pipelined
        └── ShuttingDown             503 shutting_down

`to_body()` is the one place an error becomes the JSON body
`{"error": {"code", "message", "tenant", ...details}}`. The classes drawn without a status
and code are never answered over HTTP: they are translated (Pleo's and the sealer's) or stop
the process (configuration, catalog), and keep the root's 500 `internal_error`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BrokerError(Exception):
    """Root of every error the broker answers with."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "The broker failed unexpectedly."

    def __init__(
        self, message: str | None = None, *, tenant: str | None = None, **details: Any
    ) -> None:
        self.message = message or self.default_message
        self.tenant = tenant
        self.details = details
        super().__init__(self.message)

    def to_body(self) -> dict[str, dict[str, object]]:
        """The JSON body of the error response."""
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.tenant is not None:
            error["tenant"] = self.tenant
        error.update(self.details)
        return {"error": error}


class AdminUnauthorized(BrokerError):
    status = 401
    code = "admin_unauthorized"
    default_message = "Send the admin token as 'Authorization: Bearer <token>'."


class CallerError(BrokerError):
    """The caller is not known, or may not do what it asked (BROKER_CALLERS_FILE)."""


class CallerUnauthenticated(CallerError):
    status = 401
    code = "caller_unauthenticated"
    default_message = (
        "This broker knows its callers: send your caller token as"
        " 'Proxy-Authorization: Bearer <token>'."
    )


class CallerNotAllowed(CallerError):
    status = 403
    code = "caller_not_allowed"
    default_message = "This caller may not use this tenant or this route."


class TenantThrottled(BrokerError):
    """Answered locally with `Retry-After` (whole seconds), without calling Pleo."""

    def __init__(
        self, message: str | None = None, *, tenant: str | None = None, retry_after: int = 1
    ) -> None:
        super().__init__(message, tenant=tenant, retry_after=retry_after)
        self.retry_after = retry_after


class UpstreamRateLimited(TenantThrottled):
    status = 429
    code = "upstream_rate_limited"
    default_message = (
        "Pleo rate-limited this tenant; the broker answers for it until Pleo's Retry-After"
        " has passed. Retry after the seconds in Retry-After."
    )


class TenantBusy(TenantThrottled):
    status = 429
    code = "tenant_busy"
    default_message = (
        "This tenant has as many requests in flight to Pleo as the broker allows"
        " (BROKER_TENANT_MAX_IN_FLIGHT); retry when some have finished."
    )


class RequestInvalid(BrokerError):
    status = 400
    code = "request_invalid"
    default_message = "The request body is not valid."


class TenantError(BrokerError):
    """Something is wrong with the tenant a request names."""


class TenantMissing(TenantError):
    status = 400
    code = "tenant_missing"
    default_message = "Name the tenant in the tenant header."


class TenantInvalid(TenantError):
    status = 400
    code = "tenant_invalid"
    default_message = (
        "A tenant id is 1 to 63 characters of a-z, 0-9, '.', '_' or '-',"
        " starting with a letter or digit, given once."
    )


class TenantUnknown(TenantError):
    status = 404
    code = "tenant_unknown"
    default_message = "No such tenant. Connect it first with PUT /v1/tenants/{tenant}/key."


class TenantNotActive(TenantError):
    status = 424
    code = "tenant_not_active"
    default_message = "This tenant's Pleo key is not working; reconnect it with a new key."


class TenantChanged(TenantError):
    status = 409
    code = "tenant_changed"
    default_message = (
        "This tenant's key was replaced while the request was arriving, so it was not sent"
        " with the old key. Send the request again."
    )


class ActivationError(BrokerError):
    """A submitted key could not be activated."""


class KeyInvalid(ActivationError):
    status = 422
    code = "key_invalid"
    default_message = (
        "Pleo did not accept this key. Copy the whole key from Pleo → Settings → Integrations"
        " and try again; keys created in the staging environment do not work here."
    )


class KeyNotApiKey(ActivationError):
    status = 422
    code = "key_not_api_key"
    default_message = (
        "This credential is not a Pleo API key. Paste the Integrated API Key that Pleo"
        " generated when the integration was installed, not an OAuth token."
    )


class KeyNotCompanyScoped(ActivationError):
    status = 422
    code = "key_not_company_scoped"
    default_message = (
        "This key is not tied to a single company. Create the key from the company's own"
        " Pleo account (Settings → Integrations) and paste it again."
    )


class KeyWrongIntegration(ActivationError):
    status = 422
    code = "key_wrong_integration"
    default_message = (
        "This key was made for another integration. In Pleo, open Settings → Integrations,"
        " choose this integration, copy its API key and paste that key here."
    )


class ScopesMissing(ActivationError):
    status = 422
    code = "scopes_missing"
    default_message = (
        "This key lacks permissions the integration needs. Reinstall the integration in"
        " Pleo granting every requested permission, then paste the new key."
    )


class CompanyChanged(ActivationError):
    status = 409
    code = "company_changed"
    default_message = (
        "This key belongs to a different Pleo company than the one this tenant is connected"
        " to. Use a key from the same company, or confirm the change explicitly."
    )


class CompanyInUse(ActivationError):
    status = 409
    code = "company_in_use"
    default_message = (
        "Another tenant is already connected to this Pleo company. Disconnect it first,"
        " or use a key from the right company."
    )


class PleoUnavailable(ActivationError):
    status = 503
    code = "pleo_unavailable"
    default_message = "Pleo could not be reached to check the key. Try again in a few minutes."


class PolicyDenied(BrokerError):
    """The proxy refuses to forward a request."""


class RouteNotAllowed(PolicyDenied):
    status = 403
    code = "route_not_allowed"
    default_message = "This method and path is not a Pleo route the broker forwards."


class ScopeNotGranted(PolicyDenied):
    status = 403
    code = "scope_not_granted"
    default_message = "This tenant's key was not granted the scope this route needs."


class CompanyMismatch(PolicyDenied):
    status = 403
    code = "company_mismatch"
    default_message = "The request names a company other than this tenant's."


class BodyInvalid(PolicyDenied):
    status = 400
    code = "body_invalid"
    default_message = "The JSON body could not be read."


class BodyTooLarge(PolicyDenied):
    status = 413
    code = "body_too_large"
    default_message = "The JSON body is larger than the broker inspects."


class ContentTypeInvalid(PolicyDenied):
    status = 400
    code = "content_type_invalid"
    default_message = (
        "Give one Content-Type header with a single media type, e.g. 'application/json'."
    )


class HostNotAllowed(PolicyDenied):
    status = 400
    code = "host_not_allowed"
    default_message = (
        "The Host header does not name this broker. Call it by one of the names in"
        " BROKER_PROXY_ALLOWED_HOSTS (by default localhost or 127.0.0.1)."
    )


class BrowserRequestRefused(PolicyDenied):
    status = 403
    code = "browser_request_refused"
    default_message = (
        "The proxy does not serve web browsers (the request carries Origin or Sec-Fetch-Site);"
        " call it from a backend service."
    )


class ConnectError(BrokerError):
    """A connect link cannot be made, found or ended."""


class ConnectDisabled(ConnectError):
    status = 409
    code = "connect_disabled"
    default_message = (
        "Connect links are off: set BROKER_CONNECT_PUBLIC_URL to the address where customers"
        " reach the connect listener, and restart the broker."
    )


class ConnectSessionUnknown(ConnectError):
    status = 404
    code = "connect_session_unknown"
    default_message = "No open connect session has this id; it may have ended or expired."


class RequestTimeout(BrokerError):
    status = 408
    code = "request_timeout"
    default_message = "The request body did not arrive in time."


class UpstreamError(BrokerError):
    """Pleo could not be reached or did not answer."""


class UpstreamUnreachable(UpstreamError):
    status = 502
    code = "upstream_unreachable"
    default_message = "Pleo could not be reached."


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    default_message = "Pleo did not answer in time."


class UpstreamBusy(UpstreamError):
    status = 503
    code = "upstream_busy"
    default_message = (
        "Every connection to Pleo is in use and none came free in time; retry shortly."
    )


class StoreError(BrokerError):
    """The secret store could not do what was asked."""


class StoreUnavailable(StoreError):
    status = 503
    code = "store_unavailable"
    default_message = "The key store is unavailable; try again shortly."


class StoreConflict(StoreError):
    status = 409
    code = "store_conflict"
    default_message = "The tenant was changed at the same moment by another request; retry."


class StoreIntegrityError(StoreError):
    status = 500
    code = "store_integrity"
    default_message = "A stored key could not be decrypted: wrong master key or tampered record."


class UnsealError(StoreError):
    """A sealed value did not open: wrong master key, wrong context, or altered bytes."""


class PleoError(BrokerError):
    """Introspection did not produce an answer about the key (see `broker.pleo`)."""


class PleoKeyRejected(PleoError):
    def __init__(self, status: int) -> None:
        super().__init__(f"Pleo rejected the key (HTTP {status})")
        # Pleo's answer (401 or 403). Never answered by the broker itself, so the instance
        # may say what Pleo said where other errors say what the broker answers.
        self.status = status  # type: ignore[misc]


class PleoUnreachable(PleoError):
    pass


class PleoUnexpectedAnswer(PleoError):
    pass


class ConfigError(BrokerError):
    """A setting is missing or wrong; the message is one line for the operator."""


class CatalogError(BrokerError, ValueError):
    """The catalog file is unreadable or malformed; the message is one line."""


class ListenerRefusal(BrokerError):
    """A listener refuses a connection or request before (or instead of) its app."""


class RequestMalformed(ListenerRefusal):
    status = 400
    code = "request_malformed"
    default_message = "The request is not valid HTTP/1.1; the connection is closed."


class HeaderTimeout(ListenerRefusal):
    status = 408
    code = "header_timeout"
    default_message = "The request headers did not arrive in time; the connection is closed."


class TargetTooLong(ListenerRefusal):
    status = 414
    code = "target_too_long"
    default_message = "The request target (path and query) is longer than the broker accepts."


class HeaderTooLarge(ListenerRefusal):
    status = 431
    code = "header_too_large"
    default_message = "The request headers are larger than the broker accepts."


class TooManyConnections(ListenerRefusal):
    status = 503
    code = "too_many_connections"
    default_message = "This listener has as many connections open as it allows; retry shortly."


class TooManyPipelined(ListenerRefusal):
    status = 503
    code = "too_many_pipelined"
    default_message = (
        "Too many requests were sent on this connection before their answers; the connection"
        " closes: send this request and the ones after it again on a new connection."
    )


class ShuttingDown(ListenerRefusal):
    status = 503
    code = "shutting_down"
    default_message = "The broker is shutting down; retry the request."
