from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.settings import ConfigError, load_settings

TOKEN = "an-admin-token-of-forty-characters-0123"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("BROKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    (tmp_path / "no-secrets").mkdir()
    monkeypatch.setenv("BROKER_SECRETS_DIR", str(tmp_path / "no-secrets"))


def test_defaults_match_the_design() -> None:
    settings = load_settings()
    assert settings.pleo_base_url == "https://external.pleo.io"
    assert (settings.proxy_host, settings.proxy_port) == ("127.0.0.1", 8080)
    assert (settings.admin_host, settings.admin_port) == ("127.0.0.1", 8081)
    assert settings.tenant_header == "X-Broker-Tenant"
    assert settings.store == "local"
    assert settings.store_path == Path("./broker-data")
    assert settings.vault_mount == "secret"
    assert settings.vault_prefix == "pleo-broker"


def test_required_scopes_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_REQUIRED_SCOPES", "export-jobs:read, export-jobs:write,,")
    assert load_settings().required_scopes == ("export-jobs:read", "export-jobs:write")


def test_env_file_and_secrets_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    Path(".env").write_text("BROKER_ADMIN_PORT=9001\n")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "broker_admin_token").write_text("from-a-secret-file-of-32-chars-or-more\n")
    monkeypatch.setenv("BROKER_SECRETS_DIR", str(secrets_dir))
    settings = load_settings()
    assert settings.admin_port == 9001
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "from-a-secret-file-of-32-chars-or-more"


@pytest.mark.parametrize("value", ["http://[::1", "https://", "http://pleo.example:port"])
def test_a_pleo_base_url_without_a_host_and_port_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # The control plane's HTTP client is made at its first call, not at start (docs/
    # decisions.md, "What `broker serve` imports when"): the URL is checked here instead.
    monkeypatch.setenv("BROKER_PLEO_BASE_URL", value)
    with pytest.raises(ConfigError, match="BROKER_PLEO_BASE_URL: must be a URL with a host"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("BROKER_PROXY_PORT", "eighty", "BROKER_PROXY_PORT"),
        ("BROKER_ADMIN_PORT", "70000", "BROKER_ADMIN_PORT"),
        ("BROKER_STORE", "postgres", "BROKER_STORE"),
        ("BROKER_PLEO_BASE_URL", "external.pleo.io", "must start with http"),
        ("BROKER_MASTER_KEY", "not base64!", "must be base64"),
        ("BROKER_MASTER_KEY", base64.b64encode(b"short").decode(), "exactly 32 bytes"),
        ("BROKER_TENANT_HEADER", "X Broker", "BROKER_TENANT_HEADER"),
        ("BROKER_CACHE_TTL", "-1", "BROKER_CACHE_TTL"),
        ("BROKER_LOG_LEVEL", "loud", "BROKER_LOG_LEVEL"),
        ("BROKER_ADMIN_TOKEN", "short", "at least 32 characters"),
        ("BROKER_ADMIN_TOKEN", " " * 40, "at least 32 characters"),
        ("BROKER_ADMIN_TOKEN", "a" * 20 + " " * 20, "at least 32 characters"),
        ("BROKER_ADMIN_TOKEN", "a" * 20 + " " + "b" * 20, "must not contain whitespace"),
    ],
)
def test_bad_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert name in message
    assert says in message


def test_vault_store_needs_its_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_STORE", "vault")
    with pytest.raises(ConfigError, match="BROKER_VAULT_ADDR is required"):
        load_settings()
    monkeypatch.setenv("BROKER_VAULT_ADDR", "http://127.0.0.1:8200")
    monkeypatch.setenv("BROKER_VAULT_AUTH", "approle")
    with pytest.raises(ConfigError, match="BROKER_VAULT_ROLE_ID is required"):
        load_settings()


def test_missing_secrets_dir_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BROKER_SECRETS_DIR", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="BROKER_SECRETS_DIR"):
        load_settings()


def test_secret_values_are_not_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = base64.b64encode(b"x" * 31).decode()
    monkeypatch.setenv("BROKER_MASTER_KEY", secret)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert secret not in str(caught.value)


def serve_with(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """`broker serve` with only `settings` (and an empty secrets directory) configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_SECRETS_DIR=str(tmp_path), **settings)
    return subprocess.run(
        [sys.executable, "-m", "broker", "serve"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )


@pytest.mark.real  # a real `broker serve`
def test_serve_stops_with_one_line_on_bad_config(tmp_path: Path) -> None:
    result = serve_with(tmp_path, BROKER_PROXY_PORT="eighty")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "BROKER_PROXY_PORT" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.real  # a real `broker serve`
def test_serve_stops_with_one_line_on_a_bad_catalog(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.json"
    catalog.write_text('{"routes": [{"method": "FETCH", "path": "/x", "scope": null}]}')
    result = serve_with(tmp_path, BROKER_ADMIN_TOKEN=TOKEN, BROKER_CATALOG_PATH=str(catalog))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "BROKER_CATALOG_PATH" in result.stderr
    assert "FETCH" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.real  # a real `broker serve`
def test_serve_refuses_to_start_without_admin_token(tmp_path: Path) -> None:
    result = serve_with(tmp_path)
    assert result.returncode == 2
    assert "BROKER_ADMIN_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_proxy_allowed_hosts_are_comma_separated_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().proxy_allowed_hosts == ()  # loopback names and the bind address
    monkeypatch.setenv("BROKER_PROXY_ALLOWED_HOSTS", "Broker.Payments.svc, localhost,[::1],*.x.io")
    assert load_settings().proxy_allowed_hosts == (
        "broker.payments.svc",
        "localhost",
        "[::1]",
        "*.x.io",
    )


@pytest.mark.parametrize("value", ["http://broker", "broker:8080", "a/b", "*.", "a*b"])
def test_proxy_allowed_hosts_refuse_urls_and_ports(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("BROKER_PROXY_ALLOWED_HOSTS", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("configuration error: BROKER_PROXY_ALLOWED_HOSTS: must be")


def test_admin_token_is_stripped_of_surrounding_whitespace(monkeypatch: pytest.MonkeyPatch) -> None:
    # A token stored with a trailing newline (a Secret made from a file) still matches
    # what a client sends, which is stripped too.
    monkeypatch.setenv("BROKER_ADMIN_TOKEN", f"  {TOKEN}\n")
    settings = load_settings()
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == TOKEN


@pytest.mark.real  # a real `broker serve`
def test_serve_refuses_a_short_admin_token_in_one_line(tmp_path: Path) -> None:
    result = serve_with(tmp_path, BROKER_ADMIN_TOKEN="   tiny   ")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "BROKER_ADMIN_TOKEN" in result.stderr
    assert "at least 32 characters" in result.stderr
    assert "tiny" not in result.stderr
    assert "Traceback" not in result.stderr


def test_connect_settings_default_to_off_and_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.connect_public_url is None  # no connect listener, no links
    assert (settings.connect_host, settings.connect_port) == ("127.0.0.1", 8082)
    assert settings.connect_max_attempts == 10
    assert settings.connect_frame_ancestors == "'none'"
    assert settings.connect_integration_name == "the integration"
    monkeypatch.setenv("BROKER_CONNECT_PUBLIC_URL", "https://connect.example.com/")
    monkeypatch.setenv("BROKER_CONNECT_RETURN_ORIGINS", "https://App.example.com, http://x.io:8080")
    settings = load_settings()
    assert settings.connect_public_url == "https://connect.example.com"
    assert settings.connect_return_origins == ("https://app.example.com", "http://x.io:8080")
    monkeypatch.setenv("BROKER_CONNECT_PUBLIC_URL", "")
    assert load_settings().connect_public_url is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BROKER_CONNECT_PUBLIC_URL", "connect.example.com"),
        ("BROKER_CONNECT_PUBLIC_URL", "https://"),
        ("BROKER_CONNECT_RETURN_ORIGINS", "https://app.example.com/path"),
        ("BROKER_CONNECT_RETURN_ORIGINS", "app.example.com"),
        ("BROKER_CONNECT_FRAME_ANCESTORS", "'none'; script-src *"),
        ("BROKER_CONNECT_MAX_ATTEMPTS", "0"),
    ],
)
def test_bad_connect_settings_stop_start_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert name in str(caught.value)
