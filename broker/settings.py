"""Settings: the only module that reads the environment.

Every setting is `BROKER_<NAME>` in the environment, a `.env` file, or a file named
`broker_<name>` in the secrets directory (`BROKER_SECRETS_DIR`, default `/run/secrets`
when it exists). A bad value stops start-up with one line naming the setting.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from broker.errors import ConfigError as ConfigError  # its home is errors.py; imported here

DEFAULT_SECRETS_DIR = Path("/run/secrets")
# A host name, an IPv4 address, a bracketed IPv6 address, '*', or '*.' and a name.
_HOST_PATTERN = re.compile(r"\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")
MIN_ADMIN_TOKEN_LENGTH = 32
WEBHOOK_SECRET_PREFIX = "whsec_"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class Settings(BaseSettings):
    """The broker's configuration (docs/contract.md, "Settings")."""

    model_config = SettingsConfigDict(
        env_prefix="BROKER_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    pleo_base_url: str = "https://external.pleo.io"
    pleo_client_id: str | None = None
    proxy_host: str = "127.0.0.1"
    proxy_port: int = Field(8080, ge=0, le=65535)
    # Host names the proxy answers to (DNS rebinding); empty: loopback names and PROXY_HOST.
    proxy_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(8081, ge=0, le=65535)
    admin_token: SecretStr | None = None
    tenant_header: str = "X-Broker-Tenant"
    required_scopes: Annotated[tuple[str, ...], NoDecode] = ()
    catalog_path: Path | None = None

    store: Literal["local", "vault"] = "local"
    store_path: Path = Path("./broker-data")
    master_key: SecretStr | None = None

    vault_addr: str | None = None
    vault_auth: Literal["token", "approle", "kubernetes"] = "token"
    vault_token: SecretStr | None = None
    vault_role_id: str | None = None
    vault_secret_id: SecretStr | None = None
    vault_k8s_role: str | None = None
    vault_k8s_mount: str = "kubernetes"
    vault_approle_mount: str = "approle"
    vault_k8s_token_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    vault_mount: str = "secret"
    vault_prefix: str = "pleo-broker"
    vault_cacert: Path | None = None
    vault_namespace: str | None = None
    vault_timeout: float = Field(5.0, gt=0)
    vault_threads: int = Field(8, ge=1, le=64)

    cache_ttl: float = Field(10.0, gt=0)
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_timeout: float = Field(30.0, gt=0)
    upstream_proxy: SecretStr | None = None
    max_inspected_body: int = Field(1_048_576, ge=1024)
    proxy_allow_control_plane: bool = False
    request_body_timeout: float = Field(30.0, gt=0)
    upstream_pool_timeout: float = Field(5.0, gt=0)
    max_header_bytes: int = Field(32_768, ge=1024)
    header_timeout: float = Field(10.0, gt=0)
    idle_timeout: float = Field(5.0, gt=0)
    proxy_max_connections: int = Field(4096, ge=1)
    admin_max_connections: int = Field(64, ge=1)
    shutdown_drain_seconds: float = Field(20.0, ge=0)
    connect_host: str = "127.0.0.1"
    connect_port: int = Field(8082, ge=0, le=65535)
    # None: the connect listener is off and no connect link can be made.
    connect_public_url: str | None = None
    connect_return_origins: Annotated[tuple[str, ...], NoDecode] = ()
    connect_max_attempts: int = Field(10, ge=1, le=1000)
    connect_frame_ancestors: str = "'none'"
    connect_integration_name: str = Field("the integration", min_length=1, max_length=80)
    event_retention_days: int = Field(30, ge=1, le=3650)
    health_check_interval: float = Field(3600.0, ge=0)  # 0: no periodic health checks
    health_check_rate: float = Field(2.0, gt=0)  # checks a second towards Pleo, all replicas
    webhook_url: str | None = None  # None: no webhooks are sent
    webhook_secret: SecretStr | None = None  # whsec_ + base64: signs every webhook
    webhook_timeout: float = Field(10.0, gt=0)  # seconds for one delivery attempt
    # Seconds between a failed attempt and the next (one entry a retry; jitter of ±10 % added).
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = (
        5.0,
        300.0,
        1800.0,
        7200.0,
        18000.0,
        36000.0,
        36000.0,
    )
    # YAML naming who may use which tenant (Proxy-Authorization); None: every caller trusted.
    callers_file: Path | None = None
    tenant_max_in_flight: int = Field(64, ge=1)  # one tenant's requests in flight to Pleo
    # The status a tenant's installation in Pleo gets after an activation (broker.installation).
    installation_status_on_activation: Literal[
        "ACTIVATED", "INACTIVE", "AUTHORIZED", "PENDING_INTEGRATION", "ERROR"
    ] = "ACTIVATED"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("required_scopes", mode="before")
    @classmethod
    def _split_scopes(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(
                part.strip() for part in value.replace(" ", ",").split(",") if part.strip()
            )
        return value

    @field_validator("pleo_client_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("proxy_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.replace(" ", ",").split(",")
        if isinstance(value, list | tuple):
            hosts = tuple(str(part).strip().lower() for part in value if str(part).strip())
            for host in hosts:
                if not _HOST_PATTERN.fullmatch(host):
                    raise ValueError(
                        "must be host names separated by commas, without scheme or port"
                        " (e.g. broker.payments.svc,localhost; '*.example.com' and '*' match more)"
                    )
            return hosts
        return value

    @field_validator("connect_public_url", mode="before")
    @classmethod
    def _public_url(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().rstrip("/") or None
        if isinstance(value, str) and not (
            value.startswith(("http://", "https://")) and urlsplit(value).hostname
        ):
            raise ValueError("must be an http:// or https:// URL, e.g. https://connect.example.com")
        return value

    @field_validator("connect_return_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.replace(" ", ",").split(",")
        if isinstance(value, list | tuple):
            origins = tuple(str(part).strip().rstrip("/") for part in value if str(part).strip())
            for origin in origins:
                parts = urlsplit(origin)
                if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
                    raise ValueError(
                        "must be origins separated by commas, scheme and host only"
                        " (e.g. https://app.example.com,https://admin.example.com)"
                    )
            return tuple(origin.lower() for origin in origins)
        return value

    @field_validator("connect_frame_ancestors")
    @classmethod
    def _frame_ancestors(cls, value: str) -> str:
        if not value.strip() or any(c in value for c in ';,\r\n"'):
            raise ValueError("must be a CSP source list such as 'none' or https://app.example.com")
        return value.strip()

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _webhook_url(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip() or None
        if isinstance(value, str):
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    "must be an http:// or https:// URL, e.g. https://app.example.com/webhooks"
                )
            _check_webhook_url(value)
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Never quote the value: it signs every webhook.
        if value is None or not value.get_secret_value().strip():
            return None
        text = value.get_secret_value().strip()
        if not text.startswith(WEBHOOK_SECRET_PREFIX):
            raise ValueError(
                "must start with whsec_ followed by base64 (e.g. whsec_ and the output of"
                " `openssl rand -base64 32`)"
            )
        try:
            raw = base64.b64decode(text.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be whsec_ followed by valid base64") from None
        if not 24 <= len(raw) <= 64:
            raise ValueError("must decode to 24 to 64 bytes after whsec_ (32 is usual)")
        return SecretStr(text)

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _retry_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = tuple(_seconds(part) for part in value.split(",") if part.strip())
            except ValueError:
                raise ValueError(
                    "must be durations separated by commas, e.g. 5s,5m,30m,2h,5h,10h,10h"
                ) from None
        if isinstance(value, list | tuple):
            if not value or not all(0 < float(part) < math.inf for part in value):
                raise ValueError("must list at least one duration, each above zero")
            if len(value) > 20:
                raise ValueError("must list at most 20 retries")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("pleo_base_url", "vault_addr")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:  # checked here: the control plane's HTTP client is made at its first call
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            parts = None
        if parts is None or not parts.hostname:
            raise ValueError("must be a URL with a host (and a port number, if any)") from None
        return value.rstrip("/")

    @field_validator("tenant_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c == "-" for c in value):
            raise ValueError("must be a header name of letters, digits and '-'")
        return value

    @field_validator("master_key")
    @classmethod
    def _master_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                raw = base64.b64decode(value.get_secret_value(), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("must be base64") from None
            if len(raw) != 32:
                raise ValueError("must decode to exactly 32 bytes")
        return value

    @field_validator("upstream_proxy")
    @classmethod
    def _proxy_url(cls, value: SecretStr | None) -> SecretStr | None:
        # The URL may hold a password: no message here may quote any part of it.
        if value is None or not value.get_secret_value().strip():
            return None
        try:
            parts = urlsplit(value.get_secret_value().strip())
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError("must be a URL such as http://proxy.example:3128") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("must name the proxy's host, e.g. http://proxy.example:3128")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must be only scheme, optional user:password@, host and port")
        return SecretStr(value.get_secret_value().strip())

    @field_validator("admin_token")
    @classmethod
    def _admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        # A guessable token guards every tenant's key: refuse it at start-up. Surrounding
        # whitespace (a Secret made from a file ends in a newline) is not part of the token.
        if value is None:
            return None
        token = value.get_secret_value().strip()
        if len(token) < MIN_ADMIN_TOKEN_LENGTH:
            raise ValueError(
                f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters"
                " (e.g. `openssl rand -hex 32`)"
            )
        if any(c.isspace() for c in token):
            raise ValueError("must not contain whitespace")
        return SecretStr(token)

    @model_validator(mode="after")
    def _vault_complete(self) -> Settings:
        if self.store != "vault":
            return self
        if not self.vault_addr:
            raise ValueError("BROKER_VAULT_ADDR is required when BROKER_STORE=vault")
        needed = {
            "token": ("vault_token",),
            "approle": ("vault_role_id", "vault_secret_id"),
            "kubernetes": ("vault_k8s_role",),
        }[self.vault_auth]
        for name in needed:
            if getattr(self, name) is None:
                raise ValueError(
                    f"BROKER_{name.upper()} is required when BROKER_VAULT_AUTH={self.vault_auth}"
                )
        return self

    @model_validator(mode="after")
    def _webhook_complete(self) -> Settings:
        if self.webhook_url is not None and self.webhook_secret is None:
            raise ValueError("BROKER_WEBHOOK_SECRET is required when BROKER_WEBHOOK_URL is set")
        return self

    def webhook_key(self) -> bytes | None:
        """The decoded webhook signing secret, if one was configured."""
        if self.webhook_secret is None:
            return None
        text = self.webhook_secret.get_secret_value().removeprefix(WEBHOOK_SECRET_PREFIX)
        return base64.b64decode(text)

    def master_key_bytes(self) -> bytes | None:
        """The decoded master key, if one was configured."""
        if self.master_key is None:
            return None
        return base64.b64decode(self.master_key.get_secret_value())


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise ConfigError with one line on a bad value."""
    secrets_dir = os.environ.get("BROKER_SECRETS_DIR")
    if secrets_dir is None:
        secrets_dir = str(DEFAULT_SECRETS_DIR) if DEFAULT_SECRETS_DIR.is_dir() else None
    elif not Path(secrets_dir).is_dir():
        raise ConfigError(
            f"configuration error: BROKER_SECRETS_DIR: {secrets_dir} is not a directory"
        )
    try:
        return Settings(_secrets_dir=secrets_dir, **overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def _seconds(text: str) -> float:
    """A duration such as `5s`, `30m`, `2h`, `250ms` or `7.5` (seconds), in seconds."""
    text = text.strip().lower()
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            return float(text.removesuffix(unit)) * _UNITS[unit]
    return float(text)


def _check_webhook_url(value: str) -> None:
    """Refuse a webhook URL the HTTP client cannot send to (never quoting its credentials)."""
    import httpx  # the data plane's settings need no HTTP client otherwise

    try:
        httpx.URL(value)
    except httpx.InvalidURL as exc:
        reason, password = str(exc), urlsplit(value).password
        if not reason or (password and password in reason):
            reason = "not a valid URL"
        raise ValueError(f"{reason}, e.g. https://app.example.com/webhooks") from None
    try:
        port = urlsplit(value).port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad setting and what is wrong, never its value."""
    first = exc.errors(include_input=False, include_url=False)[0]
    location = [str(part) for part in first["loc"]]
    message = str(first["msg"]).removeprefix("Value error, ")
    if location:
        return f"configuration error: BROKER_{location[0].upper()}: {message}"
    return f"configuration error: {message}"
