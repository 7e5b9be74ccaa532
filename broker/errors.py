"""The broker's errors: one tree, each class with its HTTP status and stable code.

    BrokerError
    ├── AdminUnauthorized            401 admin_unauthorized
    ├── TenantError
    │   ├── TenantMissing            400 tenant_missing
    │   ├── TenantInvalid            400 tenant_invalid
    │   ├── TenantUnknown            404 tenant_unknown
    │   └── TenantNotActive          424 tenant_not_active
    ├── ActivationError              (PUT /v1/tenants/{tenant}/key)
    │   ├── KeyInvalid               422 key_invalid
    │   ├── KeyNotApiKey             422 key_not_api_key
    │   ├── KeyNotCompanyScoped      422 key_not_company_scoped
    │   ├── ScopesMissing            422 scopes_missing
    │   ├── CompanyChanged           409 company_changed
    │   ├── CompanyInUse             409 company_in_use
    │   └── PleoUnavailable          503 pleo_unavailable
    ├── PolicyDenied
    │   ├── RouteNotAllowed          403 route_not_allowed
    │   ├── ScopeNotGranted          403 scope_not_granted
    │   ├── CompanyMismatch          403 company_mismatch
    │   ├── BodyInvalid              400 body_invalid
    │   └── BodyTooLarge             413 body_too_large
    ├── UpstreamError
    │   ├── UpstreamUnreachable      502 upstream_unreachable
    │   └── UpstreamTimeout          504 upstream_timeout
    ├── StoreUnavailable             503 store_unavailable
    ├── StoreConflict                409 store_conflict (a concurrent write won; retry)
    ├── StoreIntegrityError          500 store_integrity (wrong master key or tampered record)
    ├── RequestInvalid               400 request_invalid (a malformed admin request body)
    └── ListenerRefusal              (answered by a listener itself, before or instead of the app)
        ├── RequestMalformed         400 request_malformed
        ├── HeaderTimeout            408 header_timeout
        ├── RequestTimeout           408 request_timeout (an admin request body too slow)
        ├── TargetTooLong            414 target_too_long
        ├── HeaderTooLarge           431 header_too_large
        ├── TooManyConnections       503 too_many_connections
        └── ShuttingDown             503 shutting_down

`to_body()` is the one place an error becomes the JSON body
`{"error": {"code", "message", "tenant", ...details}}`.
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

    def to_body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.tenant is not None:
            error["tenant"] = self.tenant
        error.update(self.details)
        return {"error": error}


class AdminUnauthorized(BrokerError):
    status = 401
    code = "admin_unauthorized"
    default_message = "Send the admin token as 'Authorization: Bearer <token>'."


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


class StoreUnavailable(BrokerError):
    status = 503
    code = "store_unavailable"
    default_message = "The key store is unavailable; try again shortly."


class StoreConflict(BrokerError):
    status = 409
    code = "store_conflict"
    default_message = "The tenant was changed at the same moment by another request; retry."


class StoreIntegrityError(BrokerError):
    status = 500
    code = "store_integrity"
    default_message = "A stored key could not be decrypted: wrong master key or tampered record."


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


class RequestTimeout(ListenerRefusal):
    status = 408
    code = "request_timeout"
    default_message = "The request body did not arrive in time; send it at once."


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


class ShuttingDown(ListenerRefusal):
    status = 503
    code = "shutting_down"
    default_message = "The broker is shutting down; retry the request."
