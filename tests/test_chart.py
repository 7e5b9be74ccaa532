"""The Helm chart, rendered offline with the real Helm SDK and checked against Kubernetes schemas.

helm-python-sdk and kubernetes-validate are dev dependencies: a missing one fails the import,
so these tests never skip (and never do under CI=true).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate.utils as kubernetes_validate
import pytest
import yaml

from broker.settings import Settings

pytestmark = pytest.mark.real  # the Helm SDK and Kubernetes' schemas

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "pleo-broker"
EXAMPLE = CHART / "examples" / "app-with-sidecar"
RULES = ROOT / "config" / "prometheus" / "broker-rules.yml"

KUBERNETES_VERSIONS = ("1.29", "1.33")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

MASTER_KEY = base64.b64encode(bytes(range(32))).decode()
SECRET_VALUES = {
    "adminToken": "admin-token-Zq8w1xK3tPp0-Hn4vR7sLc2Wd",
    "masterKey": MASTER_KEY,
    "vaultToken": "hvs.vault-token-Ut5eQ9",
    "vaultSecretId": "secret-id-Lm2nB7cX4",
    "upstreamProxy": "http://egress:Pr0xy-pw-9x@proxy.corp.test:3128",
    "webhookSecret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwQ2xAbc12",
}

CALLER = {"name": "billing", "token_sha256": "ab" * 32, "tenants": ["acme", "beta-*"]}

VAULT_KUBERNETES: dict[str, Any] = {
    "store": {"type": "vault"},
    "vault": {
        "addr": "https://vault.vault.svc:8200",
        "auth": "kubernetes",
        "kubernetesRole": "pleo-broker",
        "caCert": {"configMap": "vault-ca"},
    },
}

FEATURES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "proxy-exposed": {"proxy": {"expose": True}},
    "vault-kubernetes": VAULT_KUBERNETES,
    "vault-approle": {
        "store": {"type": "vault"},
        "vault": {
            "addr": "https://vault.example.com",
            "auth": "approle",
            "roleId": "role-1",
            "caCert": {"secret": "vault-tls", "key": "ca.pem"},
        },
        "secrets": {"vaultSecretId": SECRET_VALUES["vaultSecretId"]},
    },
    "vault-token": {
        "store": {"type": "vault"},
        "vault": {"addr": "http://openbao:8200", "auth": "token"},
        "secrets": {"vaultToken": SECRET_VALUES["vaultToken"]},
    },
    "existing-secret": {"secrets": {"existingSecret": "broker-credentials"}},
    "monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "autoscaling": {**VAULT_KUBERNETES, "autoscaling": {"enabled": True}},
    "replicas-vault": {**VAULT_KUBERNETES, "replicaCount": 3},
    "existing-claim": {"store": {"local": {"persistence": {"existingClaim": "broker-data"}}}},
    "no-persistence": {"store": {"local": {"persistence": {"enabled": False}}}},
    "no-network-policy-egress": {"networkPolicy": {"egress": {"enabled": False}}},
    "callers": {"proxy": {"expose": True}, "callers": {"entries": [CALLER]}},
    "callers-existing": {"proxy": {"expose": True}, "callers": {"existingSecret": "who-calls"}},
    "everything": {
        **VAULT_KUBERNETES,
        "proxy": {"expose": True},
        "autoscaling": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "registry"}],
        "podAnnotations": {"example.com/team": "integrations"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "pleo-broker"}},
            }
        ],
        "broker": {"extraEnv": [{"name": "TZ", "value": "UTC"}]},
    },
}


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict[str, Any]]:
    """Every manifest the chart renders for these values (NOTES.txt left out)."""
    with helm.Chart.load(chart) as loaded:
        files = loaded.render(values or {}, name="rel", namespace="apps")
    manifests: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def notes(values: dict[str, Any] | None = None) -> str:
    with helm.Chart.load(CHART) as loaded:
        files = loaded.render(values or {}, name="rel", namespace="apps")
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def only(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(manifests: list[dict[str, Any]]) -> set[str]:
    return {m["kind"] for m in manifests}


def broker_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    spec = only(manifests, "Deployment")["spec"]["template"]["spec"]
    containers = spec["containers"] + spec.get("initContainers", [])
    return next(c for c in containers if c["name"] == "pleo-broker")


def settings_env(manifests: list[dict[str, Any]]) -> dict[str, str]:
    """The BROKER_* environment the broker container gets, secrets resolved from the Secret."""
    env = dict(only(manifests, "ConfigMap")["data"])
    secret_data = {}
    for m in manifests:
        if m["kind"] == "Secret":
            secret_data = {k: base64.b64decode(v).decode() for k, v in m["data"].items()}
    for var in broker_container(manifests)["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None and ref["key"] in secret_data:
            env[var["name"]] = secret_data[ref["key"]]
        elif "value" in var:
            env[var["name"]] = var["value"]
    return env


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


@pytest.mark.parametrize("kube_version", ["v1.29.0", "v1.33.0"])
@pytest.mark.parametrize("feature", ["defaults", "everything", "vault-approle"])
def test_lint_strict_is_clean(feature: str, kube_version: str) -> None:
    report = helm.lint(CHART, FEATURES[feature], strict=True, kube_version=kube_version)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_every_manifest_is_valid_kubernetes(feature: str) -> None:
    manifests = render(FEATURES[feature])
    assert {"ConfigMap", "Deployment", "Service"} <= kinds(manifests)
    for manifest in manifests:
        if manifest["kind"] in CRD_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_default_render_has_the_expected_objects() -> None:
    manifests = render()
    assert kinds(manifests) == {
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    }
    names = {m["metadata"]["name"] for m in manifests}
    assert names <= {"rel-pleo-broker", "rel-pleo-broker-data"}


def test_optional_features_add_their_objects() -> None:
    manifests = render(FEATURES["everything"])
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"} <= kinds(manifests)
    assert "PersistentVolumeClaim" not in kinds(manifests)
    assert "replicas" not in only(manifests, "Deployment")["spec"]
    hpa = only(manifests, "HorizontalPodAutoscaler")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"] == only(manifests, "Deployment")["metadata"]["name"]
    )
    assert (
        broker_container(manifests)["image"] == "ghcr.io/example/pleo-key-broker@sha256:" + "a" * 64
    )


@pytest.mark.parametrize("feature", ["defaults", "vault-kubernetes"])
def test_security_context_is_hardened(feature: str) -> None:
    manifests = render(FEATURES[feature])
    pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = broker_container(manifests)["securityContext"]
    assert context["runAsNonRoot"] is True
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root needs writable /tmp and /data volumes.
    mounts = {m["mountPath"] for m in broker_container(manifests)["volumeMounts"]}
    assert {"/tmp", "/data"} <= mounts
    assert pod["enableServiceLinks"] is False


def test_service_account_token_is_mounted_only_for_vault_kubernetes_auth() -> None:
    def automount(values: dict[str, Any]) -> bool:
        manifests = render(values)
        pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
        assert (
            only(manifests, "ServiceAccount")["automountServiceAccountToken"]
            is pod["automountServiceAccountToken"]
        )
        return bool(pod["automountServiceAccountToken"])

    assert automount({}) is False
    assert automount(FEATURES["vault-token"]) is False
    assert automount(FEATURES["vault-kubernetes"]) is True


def test_probes_hit_health_and_readiness_on_the_admin_port() -> None:
    container = broker_container(render({"admin": {"port": 9091}}))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"broker-admin": 9091}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "broker-admin"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "broker-admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "broker-admin"}
    assert container["args"] == ["serve"]


def test_proxy_stays_in_the_pod_unless_exposed() -> None:
    manifests = render()
    env = settings_env(manifests)
    assert env["BROKER_PROXY_HOST"] == "127.0.0.1"
    assert env["BROKER_ADMIN_HOST"] == "0.0.0.0"
    service_ports = {p["name"] for p in only(manifests, "Service")["spec"]["ports"]}
    assert service_ports == {"admin"}
    policy = only(manifests, "NetworkPolicy")["spec"]
    assert [rule["ports"][0]["port"] for rule in policy["ingress"]] == ["broker-admin"]

    exposed = render({"proxy": {"expose": True, "port": 9090}})
    assert settings_env(exposed)["BROKER_PROXY_HOST"] == "0.0.0.0"
    ports = {p["name"]: p for p in only(exposed, "Service")["spec"]["ports"]}
    assert ports["proxy"]["port"] == 9090 and ports["proxy"]["targetPort"] == "broker-proxy"
    container_ports = {p["name"]: p["containerPort"] for p in broker_container(exposed)["ports"]}
    assert container_ports["broker-proxy"] == 9090
    ingress = only(exposed, "NetworkPolicy")["spec"]["ingress"]
    assert [rule["ports"][0]["port"] for rule in ingress] == ["broker-admin", "broker-proxy"]


def test_network_policy_opens_vault_egress_only_for_the_vault_store() -> None:
    def egress_ports(values: dict[str, Any]) -> list[int]:
        egress = only(render(values), "NetworkPolicy")["spec"]["egress"]
        return [port["port"] for rule in egress for port in rule["ports"]]

    assert egress_ports({}) == [53, 53, 443]
    assert egress_ports(FEATURES["vault-kubernetes"]) == [53, 53, 443, 8200]


def test_local_store_uses_a_kept_volume_and_recreate_strategy() -> None:
    manifests = render()
    claim = only(manifests, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deployment = only(manifests, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["broker-data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert settings_env(manifests)["BROKER_STORE_PATH"] == "/data"

    vault = only(render(FEATURES["vault-kubernetes"]), "Deployment")
    assert vault["spec"]["strategy"]["type"] == "RollingUpdate"
    assert vault["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


CHART_SETTINGS: dict[str, Any] = {
    "broker": {
        "pleoBaseUrl": "https://pleo.example.test",
        "pleoClientId": "d8b8a6d4-3c4b-4b8e-8b2e-1f2a3d4e5f6a",
        "tenantHeader": "X-Customer",
        "requiredScopes": ["export:read", "companies:read"],
        "catalogPath": "/etc/broker/catalog.json",
        "cacheTtl": 2.5,
        "healthCheckInterval": 600,
        "healthCheckRate": 5,
        "tenantMaxInFlight": 12,
        "installationStatusOnActivation": "PENDING_INTEGRATION",
        "upstreamConnectTimeout": 1.5,
        "upstreamTimeout": 12,
        "maxInspectedBody": 2097152,
        "proxyAllowControlPlane": True,
        "requestBodyTimeout": 12.5,
        "upstreamPoolTimeout": 2.5,
        "maxHeaderBytes": 16384,
        "headerTimeout": 2.5,
        "idleTimeout": 15,
        "shutdownDrainSeconds": 12.5,
        "logLevel": "DEBUG",
        "logFormat": "text",
    },
    "proxy": {"port": 18080, "allowedHosts": ["broker.example.test"], "maxConnections": 500},
    "admin": {"port": 18081, "maxConnections": 32},
    "webhooks": {
        "url": "https://app.example.test/hooks",
        "timeout": 4.5,
        "retrySchedule": "1s,1m,1h",
    },
    "connect": {
        "port": 18082,
        "publicUrl": "https://connect.example.test",
        "returnOrigins": ["https://app.example.test"],
        "maxAttempts": 4,
        "frameAncestors": "https://app.example.test",
        "integrationName": "Acme Books",
    },
    "vault": {
        "addr": "https://vault.example.test:8200",
        "kubernetesRole": "broker-role",
        "kubernetesMount": "k8s-prod",
        "kubernetesTokenPath": "/var/run/secrets/tokens/vault",
        "roleId": "role-42",
        "approleMount": "approle-prod",
        "mount": "kv",
        "prefix": "brokers/prod",
        "namespace": "team-a",
        "timeout": 7.5,
        "threads": 4,
        "caCert": {"secret": "vault-tls", "key": "bundle.pem"},
    },
    "secrets": {k: v for k, v in SECRET_VALUES.items()},
}

EXPECTED_SETTINGS = {
    "webhook_url": "https://app.example.test/hooks",
    "webhook_timeout": 4.5,
    "webhook_retry_schedule": (1.0, 60.0, 3600.0),
    "connect_port": 18082,
    "connect_public_url": "https://connect.example.test",
    "connect_return_origins": ("https://app.example.test",),
    "connect_max_attempts": 4,
    "connect_frame_ancestors": "https://app.example.test",
    "connect_integration_name": "Acme Books",
    "pleo_base_url": "https://pleo.example.test",
    "pleo_client_id": "d8b8a6d4-3c4b-4b8e-8b2e-1f2a3d4e5f6a",
    "tenant_header": "X-Customer",
    "required_scopes": ("export:read", "companies:read"),
    "catalog_path": Path("/etc/broker/catalog.json"),
    "cache_ttl": 2.5,
    "health_check_interval": 600.0,
    "health_check_rate": 5.0,
    "tenant_max_in_flight": 12,
    "installation_status_on_activation": "PENDING_INTEGRATION",
    "upstream_connect_timeout": 1.5,
    "upstream_timeout": 12.0,
    "max_inspected_body": 2097152,
    "proxy_allow_control_plane": True,
    "request_body_timeout": 12.5,
    "upstream_pool_timeout": 2.5,
    "proxy_allowed_hosts": (
        "localhost",
        "127.0.0.1",
        "[::1]",
        "rel-pleo-broker",
        "rel-pleo-broker.apps",
        "rel-pleo-broker.apps.svc",
        "rel-pleo-broker.apps.svc.cluster.local",
        "broker.example.test",
    ),
    "max_header_bytes": 16384,
    "header_timeout": 2.5,
    "idle_timeout": 15.0,
    "shutdown_drain_seconds": 12.5,
    "proxy_max_connections": 500,
    "admin_max_connections": 32,
    "log_level": "DEBUG",
    "log_format": "text",
    "proxy_host": "127.0.0.1",
    "proxy_port": 18080,
    "admin_host": "0.0.0.0",
    "admin_port": 18081,
    "store_path": Path("/data"),
    "vault_addr": "https://vault.example.test:8200",
    "vault_k8s_role": "broker-role",
    "vault_k8s_mount": "k8s-prod",
    "vault_k8s_token_path": Path("/var/run/secrets/tokens/vault"),
    "vault_role_id": "role-42",
    "vault_approle_mount": "approle-prod",
    "vault_mount": "kv",
    "vault_prefix": "brokers/prod",
    "vault_namespace": "team-a",
    "vault_timeout": 7.5,
    "vault_threads": 4,
    "vault_cacert": Path("/etc/pleo-broker/vault-ca/bundle.pem"),
}


def load_broker_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What the real broker makes of this environment."""
    for key in [k for k in os.environ if k.startswith("BROKER_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


@pytest.mark.parametrize(
    ("store", "auth"),
    [("local", None), ("vault", "kubernetes"), ("vault", "approle"), ("vault", "token")],
)
def test_every_value_reaches_the_broker_settings(
    store: str, auth: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = merged(CHART_SETTINGS, {"store": {"type": store}})
    if auth is not None:
        values = merged(values, {"vault": {"auth": auth}})
    manifests = render(values)
    env = settings_env(manifests)
    assert all(key.startswith("BROKER_") for key in env)
    settings = load_broker_settings(env, monkeypatch)

    assert settings.store == store
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == SECRET_VALUES["adminToken"]
    expected = {
        k: v for k, v in EXPECTED_SETTINGS.items() if store == "vault" or not k.startswith("vault_")
    }
    if auth != "kubernetes":
        expected = {k: v for k, v in expected.items() if not k.startswith("vault_k8s_")}
    if auth != "approle":
        expected = {
            k: v for k, v in expected.items() if k not in {"vault_role_id", "vault_approle_mount"}
        }
    for name, value in expected.items():
        assert getattr(settings, name) == value, name
    if store == "local":
        assert settings.master_key is not None
        assert settings.master_key.get_secret_value() == MASTER_KEY
        assert "BROKER_VAULT_ADDR" not in env
    else:
        assert settings.vault_auth == auth
        assert "BROKER_MASTER_KEY" not in env
    if auth == "token":
        assert settings.vault_token is not None
        assert settings.vault_token.get_secret_value() == SECRET_VALUES["vaultToken"]
    if auth == "approle":
        assert settings.vault_secret_id is not None
        assert settings.vault_secret_id.get_secret_value() == SECRET_VALUES["vaultSecretId"]
    assert settings.upstream_proxy is not None
    assert settings.upstream_proxy.get_secret_value() == SECRET_VALUES["upstreamProxy"]
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == SECRET_VALUES["webhookSecret"]


def test_the_chart_covers_every_broker_setting() -> None:
    seen: set[str] = set()
    for store, auth in [
        ("local", "token"),
        ("vault", "kubernetes"),
        ("vault", "approle"),
        ("vault", "token"),
    ]:
        values = merged(CHART_SETTINGS, {"store": {"type": store}, "vault": {"auth": auth}})
        values["callers"] = {"entries": [CALLER]}
        manifests = render(values)
        seen |= set(only(manifests, "ConfigMap")["data"])
        seen |= {var["name"] for var in broker_container(manifests)["env"]}
    wanted = {f"BROKER_{name.upper()}" for name in Settings.model_fields}
    assert wanted - seen == set()


def test_secret_values_never_leave_the_secret() -> None:
    for values in (
        CHART_SETTINGS,
        merged(CHART_SETTINGS, {"store": {"type": "vault"}, "vault": {"auth": "approle"}}),
    ):
        manifests = render(values)
        secret = only(manifests, "Secret")
        stored = {base64.b64decode(v).decode() for v in secret["data"].values()}
        assert SECRET_VALUES["adminToken"] in stored
        for manifest in manifests:
            if manifest["kind"] == "Secret":
                continue
            text = json.dumps(manifest)
            for value in SECRET_VALUES.values():
                assert value not in text, manifest["kind"]
                assert base64.b64encode(value.encode()).decode() not in text, manifest["kind"]
    assert all(value not in notes(CHART_SETTINGS) for value in SECRET_VALUES.values())


def test_admin_token_is_generated_when_not_given() -> None:
    first = only(render(), "Secret")["data"]["admin-token"]
    second = only(render(), "Secret")["data"]["admin-token"]
    assert len(base64.b64decode(first)) >= 32
    assert first != second


def test_existing_secret_is_used_with_its_own_key_names() -> None:
    values = merged(
        FEATURES["vault-token"],
        {
            "secrets": {
                "existingSecret": "broker-credentials",
                "vaultToken": "",
                "keys": {"adminToken": "token", "vaultToken": "vault"},
            }
        },
    )
    manifests = render(values)
    assert "Secret" not in kinds(manifests)
    refs = {
        var["name"]: var["valueFrom"]["secretKeyRef"]
        for var in broker_container(manifests)["env"]
        if "valueFrom" in var
    }
    assert refs["BROKER_ADMIN_TOKEN"] == {"name": "broker-credentials", "key": "token"}
    assert refs["BROKER_VAULT_TOKEN"] == {"name": "broker-credentials", "key": "vault"}
    annotations = only(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" not in annotations
    assert "broker-credentials" in notes(values)

    local = broker_container(render(FEATURES["existing-secret"]))
    master = next(var for var in local["env"] if var["name"] == "BROKER_MASTER_KEY")
    assert master["valueFrom"]["secretKeyRef"] == {
        "name": "broker-credentials",
        "key": "master-key",
        "optional": True,
    }


def test_config_changes_roll_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        metadata = only(render(values), "Deployment")["spec"]["template"]["metadata"]
        return str(metadata["annotations"]["checksum/config"])

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"broker": {"logLevel": "DEBUG"}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"autoscaling": {"enabled": True}}, "autoscaling.enabled=true needs store.type=vault"),
        ({"replicaCount": 2}, "replicaCount > 1 needs store.type=vault"),
        ({"store": {"type": "vault"}}, "store.type=vault needs vault.addr"),
        (
            {"store": {"type": "vault"}, "vault": {"addr": "https://v:8200"}},
            "vault.auth=kubernetes needs vault.kubernetesRole",
        ),
        (
            {"store": {"type": "vault"}, "vault": {"addr": "https://v:8200", "auth": "token"}},
            "vault.auth=token needs secrets.vaultToken",
        ),
        (
            {
                "store": {"type": "vault"},
                "vault": {"addr": "https://v:8200", "auth": "approle", "roleId": "r"},
            },
            "vault.auth=approle needs secrets.vaultSecretId",
        ),
        (
            {"vault": {"caCert": {"configMap": "a", "secret": "b"}}},
            "not both",
        ),
        (
            {"broker": {"shutdownDrainSeconds": 30}},
            "must stay below terminationGracePeriodSeconds",
        ),
        (
            {"broker": {"shutdownDrainSeconds": 50}, "terminationGracePeriodSeconds": 45},
            "must stay below terminationGracePeriodSeconds",
        ),
        (
            {"mode": "sidecar", "broker": {"shutdownDrainSeconds": 25.5}},
            "must stay below terminationGracePeriodSeconds",
        ),
    ],
)
def test_impossible_configurations_fail_with_a_clear_message(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)


@pytest.mark.parametrize(
    "values",
    [
        {"mode": "daemonset"},
        {"proxy": {"port": "eighty"}},
        {"store": {"type": "s3"}},
        {"broker": {"logLevel": "TRACE"}},
        {"broker": {"installationStatusOnActivation": "DONE"}},
        {"brokr": {}},
        {"broker": {"pleoBaseUrl": "external.pleo.io"}},
        {"secrets": {"adminToken": "too-short"}},
        {"secrets": {"adminToken": "a" * 20 + " " + "b" * 20}},
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_prometheus_rule_carries_the_shared_rules() -> None:
    shipped = CHART / "files" / "broker-rules.yml"
    assert shipped.read_bytes() == RULES.read_bytes(), (
        "charts/pleo-broker/files/broker-rules.yml must be a copy of "
        "config/prometheus/broker-rules.yml"
    )
    manifests = render({"prometheusRule": {"enabled": True, "labels": {"release": "kube-prom"}}})
    rule = only(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prom"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_service_monitor_scrapes_the_admin_port() -> None:
    manifests = render({"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prom"}}})
    monitor = only(manifests, "ServiceMonitor")
    service = only(manifests, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["apps"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "admin"


def test_sidecar_mode_renders_only_shared_objects() -> None:
    manifests = render({"mode": "sidecar", **VAULT_KUBERNETES, "prometheusRule": {"enabled": True}})
    assert kinds(manifests) == {"ConfigMap", "Secret", "PrometheusRule"}
    data = only(manifests, "ConfigMap")["data"]
    assert data["BROKER_PROXY_HOST"] == "127.0.0.1"
    # Exposing the proxy is a Deployment feature: a sidecar's proxy never leaves its pod.
    exposed = render({"mode": "sidecar", "proxy": {"expose": True}, **VAULT_KUBERNETES})
    assert only(exposed, "ConfigMap")["data"]["BROKER_PROXY_HOST"] == "127.0.0.1"
    # ... and answers to loopback names only (DNS rebinding).
    assert data["BROKER_PROXY_ALLOWED_HOSTS"] == "localhost,127.0.0.1,[::1]"


def example_chart(tmp_path: Path) -> Path:
    """The example application chart with this chart as its unpacked dependency."""
    app = tmp_path / "invoice-sync"
    shutil.copytree(EXAMPLE, app)
    shutil.copytree(
        CHART, app / "charts" / "pleo-broker", ignore=shutil.ignore_patterns("examples")
    )
    return app


@pytest.mark.parametrize("native", [False, True])
def test_sidecar_example_adds_the_broker_to_the_application_pod(
    tmp_path: Path, native: bool
) -> None:
    app = example_chart(tmp_path)
    values = {"pleo-broker": {"sidecar": {"native": native}}}
    report = helm.lint(app, values, strict=True, with_subcharts=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    manifests = render(values, chart=app)
    for manifest in manifests:
        if manifest["kind"] not in CRD_KINDS:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(manifest, version, strict=True)
    assert kinds(manifests) == {"ConfigMap", "Secret", "PrometheusRule", "Deployment"}

    pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
    if native:
        assert [c["name"] for c in pod["containers"]] == ["app"]
        assert [c["name"] for c in pod["initContainers"]] == ["pleo-broker"]
        assert pod["initContainers"][0]["restartPolicy"] == "Always"
        # The kubelet stops a native sidecar after the application: no sleep needed.
        assert "lifecycle" not in pod["initContainers"][0]
    else:
        assert [c["name"] for c in pod["containers"]] == ["app", "pleo-broker"]
        assert "restartPolicy" not in pod["containers"][1]
        # Every container gets SIGTERM at once: the broker sleeps first, so the
        # application can still call Pleo through it while it shuts down.
        assert pod["containers"][1]["lifecycle"] == {
            "preStop": {"exec": {"command": ["sleep", "5"]}}
        }
    assert pod["terminationGracePeriodSeconds"] == 30
    broker = broker_container(manifests)
    configmap = only(manifests, "ConfigMap")
    assert broker["envFrom"][0]["configMapRef"]["name"] == configmap["metadata"]["name"]
    token = next(var for var in broker["env"] if var["name"] == "BROKER_ADMIN_TOKEN")
    assert (
        token["valueFrom"]["secretKeyRef"]["name"] == only(manifests, "Secret")["metadata"]["name"]
    )
    assert configmap["data"]["BROKER_PROXY_HOST"] == "127.0.0.1"
    assert [p["name"] for p in broker["ports"]] == ["broker-admin"]
    app_env = {var["name"]: var.get("value") for var in pod["containers"][0]["env"]}
    assert app_env["PLEO_BASE_URL"] == f"http://127.0.0.1:{configmap['data']['BROKER_PROXY_PORT']}"
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in broker["volumeMounts"]} <= volumes
    assert broker["securityContext"]["readOnlyRootFilesystem"] is True


def test_sidecar_template_refuses_deployment_mode_values(tmp_path: Path) -> None:
    app = example_chart(tmp_path)
    with pytest.raises(helm.HelmError, match="mode: sidecar"):
        render({"pleo-broker": {"mode": "deployment"}}, chart=app)


def test_notes_tell_how_to_reach_the_broker() -> None:
    text = notes()
    assert "rel-pleo-broker.apps.svc:8081" in text
    assert "127.0.0.1:8080 inside the pod only" in text
    assert "master key in a file" in text
    exposed = notes({"proxy": {"expose": True}})
    assert "rel-pleo-broker.apps.svc:8080" in exposed


def test_the_upstream_proxy_comes_from_the_secret_and_may_be_absent() -> None:
    for values in (FEATURES["defaults"], FEATURES["existing-secret"]):
        manifests = render(values)
        var = next(
            v for v in broker_container(manifests)["env"] if v["name"] == "BROKER_UPSTREAM_PROXY"
        )
        assert var["valueFrom"]["secretKeyRef"]["key"] == "upstream-proxy"
        assert var["valueFrom"]["secretKeyRef"]["optional"] is True
        assert "BROKER_UPSTREAM_PROXY" not in only(manifests, "ConfigMap")["data"]


def test_shutdown_values_reach_the_broker_and_fit_the_grace_period() -> None:
    manifests = render()
    env = settings_env(manifests)
    assert env["BROKER_SHUTDOWN_DRAIN_SECONDS"] == "20"
    pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
    assert float(env["BROKER_SHUTDOWN_DRAIN_SECONDS"]) < pod["terminationGracePeriodSeconds"]
    # A Deployment's broker stops on SIGTERM: no preStop sleep outside sidecar mode.
    assert "lifecycle" not in broker_container(manifests)
    longer = render({"terminationGracePeriodSeconds": 90, "broker": {"shutdownDrainSeconds": 60}})
    assert settings_env(longer)["BROKER_SHUTDOWN_DRAIN_SECONDS"] == "60"


def test_sidecar_pre_stop_sleep_is_configurable(tmp_path: Path) -> None:
    app = example_chart(tmp_path)
    pod = only(
        render({"pleo-broker": {"sidecar": {"preStopSleepSeconds": 8}}}, chart=app), "Deployment"
    )
    broker = next(
        c for c in pod["spec"]["template"]["spec"]["containers"] if c["name"] == "pleo-broker"
    )
    assert broker["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "8"]
    pod = only(
        render({"pleo-broker": {"sidecar": {"preStopSleepSeconds": 0}}}, chart=app), "Deployment"
    )
    broker = next(
        c for c in pod["spec"]["template"]["spec"]["containers"] if c["name"] == "pleo-broker"
    )
    assert "lifecycle" not in broker
    with pytest.raises(helm.HelmError, match="below terminationGracePeriodSeconds"):
        render({"pleo-broker": {"sidecar": {"preStopSleepSeconds": 12}}}, chart=app)


def test_callers_are_rendered_into_a_secret_mounted_as_a_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker.callers import parse_callers

    scoped = {**CALLER, "name": "reader", "token_sha256": "cd" * 32, "scopes": ["export:read"]}
    manifests = render(merged(FEATURES["callers"], {"callers": {"entries": [CALLER, scoped]}}))
    secret = next(m for m in manifests if m["metadata"]["name"] == "rel-pleo-broker-callers")
    table = parse_callers(base64.b64decode(secret["data"]["callers.yaml"]).decode())
    assert table.names == ("billing", "reader")
    env = settings_env(manifests)
    assert env["BROKER_CALLERS_FILE"] == "/etc/pleo-broker/callers/callers.yaml"
    assert load_broker_settings(env, monkeypatch).callers_file == Path(
        "/etc/pleo-broker/callers/callers.yaml"
    )
    (mount,) = [
        m for m in broker_container(manifests)["volumeMounts"] if m["name"] == "broker-callers"
    ]
    assert mount == {
        "name": "broker-callers",
        "mountPath": "/etc/pleo-broker/callers",
        "readOnly": True,
    }
    volumes = only(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == "broker-callers"]
    assert volume["secret"]["secretName"] == "rel-pleo-broker-callers"
    assert "WARNING: no callers" not in notes(FEATURES["callers"])


def test_an_existing_callers_secret_is_mounted_with_its_key() -> None:
    values = merged(FEATURES["callers-existing"], {"callers": {"key": "who.yaml"}})
    manifests = render(values)
    assert [m["metadata"]["name"] for m in manifests if m["kind"] == "Secret"] == [
        "rel-pleo-broker"
    ]
    assert settings_env(manifests)["BROKER_CALLERS_FILE"] == "/etc/pleo-broker/callers/who.yaml"
    volumes = only(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == "broker-callers"]
    assert volume["secret"] == {
        "secretName": "who-calls",
        "items": [{"key": "who.yaml", "path": "who.yaml"}],
    }


def test_without_callers_nothing_is_mounted_and_an_exposed_proxy_is_warned_about() -> None:
    for values in ({}, {"mode": "sidecar"}, {"proxy": {"expose": True}}):
        manifests = render(values)
        assert "BROKER_CALLERS_FILE" not in only(manifests, "ConfigMap")["data"]
    container = broker_container(render({}))
    assert all(m["name"] != "broker-callers" for m in container["volumeMounts"])
    assert "WARNING: no callers are set" in notes({"proxy": {"expose": True}})
    assert "WARNING: no callers" not in notes()  # the proxy stays in the pod


@pytest.mark.parametrize(
    "callers",
    [
        {"entries": [{**CALLER, "token_sha256": "not-a-hash"}]},
        {"entries": [{**CALLER, "tenants": []}]},
        {"entries": [{"name": "billing", "tenants": ["*"]}]},
        {"entries": [{**CALLER, "colour": "red"}]},
        {"key": "../etc/passwd"},
    ],
)
def test_schema_rejects_bad_callers(callers: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render({"callers": callers})


def test_callers_from_both_places_fail_clearly() -> None:
    with pytest.raises(helm.HelmError, match=r"existingSecret or callers\.entries, not both"):
        render({"callers": {"existingSecret": "x", "entries": [CALLER]}})
