"""Alert rules, their promtool unit tests, the Grafana dashboard, and a live /metrics scrape.

promtool (Debian `prometheus`, installed by scripts/system-deps.sh) is a real component: these
tests skip without it on a laptop, and fail without it under CI=true.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "config" / "prometheus" / "broker-rules.yml"
RULE_TESTS = sorted((ROOT / "config" / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = ROOT / "config" / "grafana" / "pleo-broker.json"

REQUIRED_ALERTS = {
    "PleoBrokerTenantBroken",
    "PleoBrokerActivationsFailing",
    "PleoBrokerStoreErrors",
    "PleoBrokerStoreDown",
    "PleoBrokerUpstreamErrorRate",
    "PleoBrokerUpstreamLatencyHigh",
    "PleoBrokerWebhooksFailing",
    "PleoBrokerWebhooksGivenUp",
    "PleoBrokerHealthChecksFailing",
}

PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promtool() -> str:
    """The promtool binary; a skip on a laptop without it, a failure in CI."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: scripts/system-deps.sh installs Debian's prometheus")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def exported_metric_names() -> set[str]:
    """Every series name the broker's registry can expose, suffixes included."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text, flags=re.I
    )
    text = re.sub(r"\$\w+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
        for inner in panel.get("panels", []):
            exprs.extend(target["expr"] for target in inner.get("targets", []))
    return exprs


def test_metric_names_parser_finds_names_and_ignores_functions() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(broker_upstream_duration_seconds_bucket{job=~"$job"}[$__rate_interval]))) > 5 '
        'unless on (job) up{code="5.."} == 0'
    )
    assert metric_names(expr) == {"broker_upstream_duration_seconds_bucket", "up"}


@pytest.mark.real  # promtool
def test_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.real  # promtool
def test_rules_unit_tests_pass() -> None:
    assert RULE_TESTS, "config/prometheus/tests/ holds no promtool unit tests"
    result = subprocess.run(
        [promtool(), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS[0].parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_documented_and_tested_both_ways() -> None:
    rules = load_rules()
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert set(alerts) >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name

    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alerts) <= fires, f"no test shows these firing: {set(alerts) - fires}"
    assert set(alerts) <= quiet, f"no test shows these quiet: {set(alerts) - quiet}"


def test_rules_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for rule in load_rules():
        used = metric_names(rule["expr"])
        assert used, rule
        assert used <= exported, (rule.get("alert"), used - exported)


def test_traffic_alerts_aggregate_per_deployment() -> None:
    # One incident is one alert, not one per route, method or replica.
    for rule in load_rules():
        if "broker_proxy_requests_total" in rule["expr"] or "broker_upstream" in rule["expr"]:
            assert re.search(r"by \(namespace, job(, le)?\)", rule["expr"]), rule["alert"]


def test_dashboard_uses_only_exported_metrics() -> None:
    exported = exported_metric_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, (expr, names - exported)
        used |= names
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+)(\{.*\})?, *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            assert match.group(1) in exported
    # Every family of DESIGN §9 has a panel.
    families = {family.name for family in Metrics().registry.collect()}
    for family in families:
        assert any(name.startswith(family) for name in used), f"no panel shows {family}"


def test_dashboard_shows_webhook_deliveries_and_health_checks_by_result() -> None:
    exprs = dashboard_exprs()
    for metric in ("broker_webhook_deliveries_total", "broker_health_checks_total"):
        assert any(metric in e and re.search(r"by \((\w+, )*result", e) for e in exprs), metric
    assert any("broker_webhook_pending" in e for e in exprs)
    for result in ("error", "broken"):  # the health-check outcomes an operator acts on
        assert any(f'broker_health_checks_total{{result="{result}"' in e for e in exprs), result


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "pleo-key-broker"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"], panel["title"]
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]


@pytest.mark.real  # promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses every expression when it checks a rule file, so check them as recording rules.
    concrete = [
        expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$namespace", ".*")
        for expr in dashboard_exprs()
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel{i}", "expr": expr}
                    for i, expr in enumerate(concrete)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def broker_command() -> list[str]:
    script = Path(sys.executable).parent / "broker"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "broker", "serve"]


@pytest.fixture
def live_broker(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real `broker serve`; yields the admin and proxy base URLs."""
    admin_port, proxy_port = free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BROKER_", "VAULT_", "BAO_"))
    }
    env.update(
        BROKER_ADMIN_TOKEN=secrets.token_urlsafe(32),
        BROKER_ADMIN_PORT=str(admin_port),
        BROKER_PROXY_PORT=str(proxy_port),
        BROKER_STORE_PATH=str(tmp_path / "data"),
        BROKER_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        BROKER_SECRETS_DIR=str(tmp_path / "no-secrets"),
    )
    (tmp_path / "no-secrets").mkdir()
    log = (tmp_path / "broker.log").open("wb")
    process = subprocess.Popen(
        broker_command(), env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"broker serve exited: {(tmp_path / 'broker.log').read_text()}")
            try:
                if http_get(f"{admin}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"broker did not answer /healthz: {(tmp_path / 'broker.log').read_text()}"
                )
            time.sleep(0.05)  # poll interval, not a wait for an outcome
        yield admin, f"http://127.0.0.1:{proxy_port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


@pytest.mark.real  # promtool, a real `broker serve`
def test_live_metrics_pass_promtool_and_match_the_contract(live_broker: tuple[str, str]) -> None:
    admin, proxy = live_broker
    tool = promtool()
    # A request without a tenant gives the proxy counters a sample.
    status, _ = http_get(f"{proxy}/v1/introspect")
    assert status == 400
    status, ready = http_get(f"{admin}/readyz")
    assert status == 200
    assert json.loads(ready)["status"] == "ok"

    status, body = http_get(f"{admin}/metrics")
    assert status == 200
    result = subprocess.run([tool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()

    text = body.decode()
    assert 'broker_proxy_denials_total{reason="tenant_missing"} 1.0' in text
    assert re.search(r'broker_proxy_requests_total\{[^}]*code="400"[^}]*\} 1\.0', text)
    typed = set(re.findall(r"^# TYPE (\w+) ", text, flags=re.M))
    expected = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
    }
    assert expected <= typed, expected - typed
    # What the rules and the dashboard select is what a real broker serves.
    served = typed | {name + suffix for name in typed for suffix in ("_bucket", "_count", "_sum")}
    for rule in load_rules():
        assert metric_names(rule["expr"]) <= served, rule["alert"]
    for expr in dashboard_exprs():
        assert metric_names(expr) <= served, expr


def test_activation_alert_ignores_every_refusal_a_customer_fixes_with_another_key() -> None:
    from broker import errors

    (rule,) = [r for r in load_rules() if r.get("alert") == "PleoBrokerActivationsFailing"]
    ignored = set(re.search(r'result!~"([^"]+)"', rule["expr"]).group(1).split("|"))  # type: ignore[union-attr]
    customer_fixable = {
        cls.code for cls in errors.ActivationError.__subclasses__() if 400 <= cls.status < 500
    }
    assert customer_fixable <= ignored
