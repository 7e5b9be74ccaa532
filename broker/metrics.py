"""Prometheus metrics (docs/contract.md), registered on a registry the app is handed.

Labels are bounded: route labels are catalog templates (or `unmatched`), never a raw
path, a tenant id or a key.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0)


class Metrics:
    """Every metric the broker exports, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.proxy_requests = Counter(
            "broker_proxy_requests",
            "Requests answered by the proxy listener (caller: from BROKER_CALLERS_FILE, or"
            " anonymous).",
            ["method", "route", "code", "caller"],
            registry=r,
        )
        self.proxy_denials = Counter(
            "broker_proxy_denials",
            "Requests the proxy refused, by error code.",
            ["reason"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "broker_upstream_duration_seconds",
            "Time from forwarding a request to Pleo until its response headers arrived.",
            ["route"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "broker_overhead_seconds",
            "Time the proxy spent on a request itself until its answer started, the wait for"
            " Pleo excluded (the Server-Timing header's broker;dur).",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.callers_file_stale = Gauge(
            "broker_callers_file_stale",
            "1 while the last read of BROKER_CALLERS_FILE failed and older callers are in"
            " force, else 0.",
            registry=r,
        )
        self.tenants = Gauge(
            "broker_tenants", "Tenants known to this broker, by state.", ["state"], registry=r
        )
        self.tenant_transitions = Counter(
            "broker_tenant_transitions",
            "Tenant state changes.",
            ["to_state", "reason"],
            registry=r,
        )
        self.activations = Counter(
            "broker_activations",
            "Key activations and rotations, by result (ok or the error code).",
            ["result"],
            registry=r,
        )
        self.store_operations = Counter(
            "broker_store_operations",
            "Secret store operations, by backend, operation and result.",
            ["backend", "op", "result"],
            registry=r,
        )
        self.health_checks = Counter(
            "broker_health_checks",
            "Periodic health checks, by result (ok, broken, recovered, error).",
            ["result"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "broker_webhook_deliveries",
            "Webhook delivery attempts, by result (delivered, retried, given_up).",
            ["result"],
            registry=r,
        )
        self.webhook_pending = Gauge(
            "broker_webhook_pending",
            "Events neither delivered nor given up (the store's count, the same on every"
            " replica that delivers or waits to).",
            registry=r,
        )

        self.throttled = Counter(
            "broker_proxy_throttled",
            "Requests the proxy answered 429 itself, without calling Pleo, by reason"
            " (upstream_rate_limited, tenant_busy).",
            ["reason"],
            registry=r,
        )
