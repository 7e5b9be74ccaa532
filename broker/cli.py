"""The `broker` command (docs/contract.md, "Command line")."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from broker import __version__
from broker.errors import BrokerError
from broker.installation import STATUSES as INSTALLATION_STATUSES
from broker.records import valid_tenant_id
from broker.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `broker` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker", description="Pleo Key Broker: holds Pleo Integrated API Keys per tenant."
    )
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy and admin listeners")
    serve.set_defaults(run=_serve)

    sandbox = commands.add_parser("sandbox", help="run the local Pleo sandbox")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8090)
    sandbox.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="keep keys and records in this JSON file across restarts",
    )
    sandbox.set_defaults(run=_sandbox)

    demo = commands.add_parser("demo", help="walk through a tenant's lifecycle against the sandbox")
    demo.add_argument("--keep-running", action="store_true", help="leave everything running")
    demo.set_defaults(run=_demo)

    catalog = commands.add_parser("catalog", help="print the route → scope inventory")
    catalog.add_argument("--file", type=Path, help="a catalog file to print instead")
    catalog.set_defaults(run=_catalog)

    tenants = commands.add_parser("tenants", help="manage tenants through the admin API")
    tenants.add_argument("--admin-url", help="admin API base URL (default: from settings)")
    verbs = tenants.add_subparsers(dest="verb", required=True, metavar="VERB")
    listing = verbs.add_parser("list", help="list tenants")
    listing.add_argument("--state", choices=["pending", "active", "broken"])
    listing.set_defaults(run=_tenants_list)
    for verb, helptext, run in (
        ("show", "show one tenant", _tenants_show),
        ("check", "re-validate a tenant's key with Pleo now", _tenants_check),
        ("disconnect", "forget a tenant and destroy its key", _tenants_disconnect),
    ):
        sub = verbs.add_parser(verb, help=helptext)
        sub.add_argument("tenant")
        sub.set_defaults(run=run)
        if verb == "disconnect":
            sub.add_argument(
                "--uninstall",
                action="store_true",
                help="also delete the installation in Pleo (revokes the key there; asks first)",
            )
            sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    installation = verbs.add_parser(
        "installation", help="set the status of a tenant's installation in Pleo"
    )
    installation.add_argument("tenant")
    installation.add_argument("--status", required=True, choices=INSTALLATION_STATUSES)
    installation.add_argument("--metadata", help="a JSON object to merge into its metadata")
    installation.set_defaults(run=_tenants_installation)
    connect = verbs.add_parser(
        "connect", help="activate or rotate a tenant's key (read from a prompt, file or stdin)"
    )
    connect.add_argument("tenant")
    connect.add_argument("--key-file", type=Path, help="read the key from this file")
    connect.add_argument(
        "--allow-company-change",
        action="store_true",
        help="accept a key of a different Pleo company than the tenant's",
    )
    connect.set_defaults(run=_tenants_connect)
    link = verbs.add_parser("link", help="make a one-time link to the connect page and print it")
    link.add_argument("tenant")
    link.add_argument(
        "--ttl", type=_duration, default=1800, help="how long the link works (e.g. 30m, 2h, 900s)"
    )
    link.add_argument("--return-url", help="where the page sends the customer when done")
    link.add_argument(
        "--allow-company-change",
        action="store_true",
        help="let the customer confirm a key of another Pleo company than the tenant's",
    )
    link.set_defaults(run=_tenants_link)
    migrate = verbs.add_parser("migrate", help="copy every tenant from one store to another")
    migrate.add_argument("--from", dest="source", choices=["local", "vault"], required=True)
    migrate.add_argument("--to", dest="target", choices=["local", "vault"], required=True)
    migrate.set_defaults(run=_tenants_migrate)

    events = commands.add_parser("events", help="print the event feed (and follow it)")
    events.add_argument("--admin-url", help="admin API base URL (default: from settings)")
    events.add_argument("--tenant", help="only this tenant's events")
    events.add_argument("--follow", action="store_true", help="wait for new events (Ctrl-C ends)")
    events.add_argument("--json", action="store_true", help="one JSON object a line")
    events.add_argument(
        "--interval", type=float, default=2.0, help="seconds between polls when following"
    )
    events.set_defaults(run=_events)

    callers = commands.add_parser("callers", help="tools for BROKER_CALLERS_FILE")
    caller_verbs = callers.add_subparsers(dest="verb", required=True, metavar="VERB")
    hashing = caller_verbs.add_parser(
        "hash",
        help="print the token_sha256 of a caller token (hidden prompt, or standard input)",
    )
    hashing.set_defaults(run=_callers_hash)
    return parser


def _callers_hash(args: argparse.Namespace) -> int:
    from broker.callers import token_hash
    from broker.settings import MIN_ADMIN_TOKEN_LENGTH

    if sys.stdin.isatty():
        token = getpass.getpass("Caller token (input hidden): ").strip()
    else:
        token = sys.stdin.readline().strip()
    if len(token) < MIN_ADMIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        print(
            f"error: a caller token is at least {MIN_ADMIN_TOKEN_LENGTH} characters without"
            " spaces (e.g. `openssl rand -hex 32`)",
            file=sys.stderr,
        )
        return 2
    print(token_hash(token))
    return 0


def _events(args: argparse.Namespace) -> int:
    from broker.cli_events import run_events

    return run_events(
        _client(args),
        tenant=args.tenant,
        follow=args.follow,
        as_json=args.json,
        interval=args.interval,
        fail=_fail,
    )


# -- serving ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from broker.catalog import CatalogError, load_catalog
    from broker.events import configure_logging, emit
    from broker.server import serve

    settings = load_settings()
    try:
        load_catalog(settings.catalog_path)  # fail here, in one line, not inside the server
    except CatalogError as exc:
        raise ConfigError(f"configuration error: BROKER_CATALOG_PATH: {exc}") from None
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise ConfigError(
            "configuration error: BROKER_ADMIN_TOKEN: required;"
            " the admin API never starts without one"
        )
    configure_logging(settings.log_level, settings.log_format)

    def started(proxy_port: int, admin_port: int, connect_port: int | None) -> None:
        emit(
            "broker.started",
            proxy=f"{settings.proxy_host}:{proxy_port}",
            admin=f"{settings.admin_host}:{admin_port}",
            connect=f"{settings.connect_host}:{connect_port}" if connect_port else None,
            store=settings.store,
            version=__version__,
        )

    try:
        _run(serve(settings, started=started))
    except (ConfigError, CatalogError):
        raise  # start-up configuration, not a failure of the running broker: see main
    except (OSError, BrokerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from broker.sandbox import run
    from broker.sandbox.persist import StateFileError

    print(f"Pleo sandbox on http://{args.host}:{args.port} (control API under /_sandbox/)")
    try:
        run(args.host, args.port, args.state_file)
    except StateFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from broker.demo import run_demo

    return int(_run(run_demo(keep_running=args.keep_running)))


def _catalog(args: argparse.Namespace) -> int:
    from broker.catalog import CatalogError, format_table, load_catalog

    path = args.file
    if path is None:
        path = load_settings().catalog_path
    try:
        print(format_table(load_catalog(path)))
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(coro: Coroutine[object, None, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- tenants (through the admin API) ------------------------------------------------------


class AdminClient:
    """A small synchronous client of the admin API for the command line."""

    def __init__(self, settings: Settings, admin_url: str | None) -> None:
        if settings.admin_token is None:
            raise ConfigError(
                "configuration error: BROKER_ADMIN_TOKEN: required to call the admin API"
            )
        host = settings.admin_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        self.base_url = (admin_url or f"http://{host}:{settings.admin_port}").rstrip("/")
        import httpx  # the admin API's commands only: `broker serve` does not load it

        self._client = httpx.Client(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {settings.admin_token.get_secret_value()}",
                "X-Broker-Actor": "cli",  # the events of its changes name the CLI
            },
            timeout=30.0,
            trust_env=False,
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: object = None,
    ) -> httpx.Response:
        import httpx

        try:
            return self._client.request(method, path, params=params, json=json)
        except httpx.TransportError as exc:
            raise SystemExit(
                f"error: cannot reach the broker's admin API at {self.base_url}"
                f" ({type(exc).__name__})."
                " Is `broker serve` running, and is BROKER_ADMIN_PORT right?"
            ) from None


def _client(args: argparse.Namespace) -> AdminClient:
    tenant = getattr(args, "tenant", None)
    if tenant is not None and not valid_tenant_id(tenant):
        # Checked here, not only by the API: a path like "x/../other" would otherwise be
        # normalised on the way and act on another tenant.
        raise SystemExit(
            f"error: {tenant!r} is not a tenant id (1 to 63 characters of a-z, 0-9, '.', '_'"
            " or '-', starting with a letter or digit)"
        )
    return AdminClient(load_settings(), args.admin_url)


def _fail(response: httpx.Response) -> int:
    try:
        error = response.json()["error"]
        print(f"error: {error['message']} ({error['code']})", file=sys.stderr)
        if error.get("missing_scopes"):
            print("missing scopes: " + ", ".join(error["missing_scopes"]), file=sys.stderr)
    except (ValueError, KeyError, TypeError):
        print(f"error: the admin API answered HTTP {response.status_code}", file=sys.stderr)
    return 1


def _tenants_list(args: argparse.Namespace) -> int:
    params = {"state": args.state} if args.state else None
    response = _client(args).call("GET", "/v1/tenants", params=params)
    if response.status_code != 200:
        return _fail(response)
    print(format_tenants(response.json()["tenants"]))
    return 0


def _show_view(response: httpx.Response) -> int:
    if response.status_code != 200:
        return _fail(response)
    print(format_tenant(response.json()))
    return 0


def _tenants_show(args: argparse.Namespace) -> int:
    return _show_view(_client(args).call("GET", f"/v1/tenants/{args.tenant}"))


def _tenants_check(args: argparse.Namespace) -> int:
    return _show_view(_client(args).call("POST", f"/v1/tenants/{args.tenant}/check"))


def _tenants_disconnect(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.uninstall and not (args.yes or _confirm_uninstall(args.tenant)):
        print("Nothing was changed.", file=sys.stderr)
        return 1
    params = {"uninstall": "true"} if args.uninstall else None
    response = client.call("DELETE", f"/v1/tenants/{args.tenant}", params=params)
    if response.status_code != 204:
        return _fail(response)
    done = INSTALLATION_OUTCOMES.get(response.headers.get("X-Broker-Installation", ""))
    print(f"Disconnected {args.tenant}; its key was destroyed{done or ''}.")
    return 0


# What DELETE's `X-Broker-Installation` says became of the installation in Pleo.
INSTALLATION_OUTCOMES = {
    "inactive": " and its installation in Pleo set INACTIVE",
    "deleted": (" and its installation deleted in Pleo, which revoked the key's access there too"),
    "none": "; Pleo had no installation for it",
    "failed": (
        "; its installation in Pleo could not be set INACTIVE (Pleo did not answer; see the"
        " broker's log, tenant.installation_sync_failed): set it in Pleo if it matters"
    ),
    "key_rejected": (
        "; its installation in Pleo was left as it is (Pleo no longer accepts the key):"
        " remove it in Pleo → Settings → Integrations"
    ),
}


def _confirm_uninstall(tenant: str) -> bool:
    print(
        f"This deletes {tenant}'s installation in Pleo, which revokes the key's access there"
        " too: the customer must install the integration again to reconnect.",
        file=sys.stderr,
    )
    try:
        answer = input(f"Type the tenant id ({tenant}) to confirm: ")
    except EOFError:
        return False
    return answer.strip() == tenant


def _tenants_installation(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"status": args.status}
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            print('error: --metadata must be a JSON object, like \'{"k": "v"}\'', file=sys.stderr)
            return 2
        body["metadata"] = metadata
    response = _client(args).call("PUT", f"/v1/tenants/{args.tenant}/installation", json=body)
    return _show_view(response)


def _tenants_connect(args: argparse.Namespace) -> int:
    key = _read_key(args.key_file)
    if not key:
        print("error: no key given", file=sys.stderr)
        return 2
    body = {"api_key": key, "allow_company_change": args.allow_company_change}
    response = _client(args).call("PUT", f"/v1/tenants/{args.tenant}/key", json=body)
    if response.status_code != 200:
        return _fail(response)
    view = response.json()
    print(
        f"Connected {view['tenant']} to Pleo company {view['company_id']} (key {view['key_hint']})."
    )
    print(format_tenant(view))
    return 0


def _tenants_link(args: argparse.Namespace) -> int:
    body: dict[str, object] = {
        "ttl_seconds": args.ttl,
        "allow_company_change": args.allow_company_change,
    }
    if args.return_url:
        body["return_url"] = args.return_url
    response = _client(args).call("POST", f"/v1/tenants/{args.tenant}/connect-sessions", json=body)
    if response.status_code != 201:
        return _fail(response)
    link = response.json()
    print(link["url"])
    print(f"(session {link['id']}, works once, until {link['expires_at']})", file=sys.stderr)
    return 0


def _duration(text: str) -> int:
    """Seconds in `90`, `900s`, `30m` or `2h`."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30m, 2h or 900s")
    return int(number) * units[unit]


def _read_key(key_file: Path | None) -> str:
    """The key from a file, standard input, or a hidden prompt — never from an argument."""
    if key_file is not None:
        try:
            return key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SystemExit(f"error: cannot read {key_file}: {exc.strerror}") from None
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    return getpass.getpass("Pleo API key (input hidden): ").strip()


def _tenants_migrate(args: argparse.Namespace) -> int:
    from broker.stores.factory import open_store
    from broker.stores.migrate import MigrationReport, migrate

    if args.source == args.target:
        print("error: --from and --to name the same store", file=sys.stderr)
        return 2
    source_settings = load_settings(store=args.source)
    target_settings = load_settings(store=args.target)

    async def run() -> MigrationReport:
        source = open_store(source_settings)
        try:
            target = open_store(target_settings)
            try:
                return await migrate(source, target)
            finally:
                await target.close()
        finally:
            await source.close()

    try:
        report = asyncio.run(run())
    except ConfigError:
        raise  # main reports a setting (exit 2)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"Migrated {args.source} → {args.target}: {report.copied} copied,"
        f" {report.updated} updated, {report.unchanged} unchanged."
    )
    return 0


# -- formatting ---------------------------------------------------------------------------

COLUMNS = ("tenant", "state", "company_id", "key_hint", "reason", "updated_at")


def format_tenants(views: Sequence[Mapping[str, object]]) -> str:
    """Tenant views as an aligned table."""
    if not views:
        return "No tenants."
    rows = [[str(view.get(col) or "-") for col in COLUMNS] for view in views]
    header = [col.upper() for col in COLUMNS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def format_tenant(view: Mapping[str, object]) -> str:
    """One tenant view as aligned `name: value` lines."""
    width = max(len(name) for name in view)
    lines = []
    for name, value in view.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "-"
        if isinstance(value, dict):
            value = " ".join(f"{k}={v if v not in (None, '') else '-'}" for k, v in value.items())
        lines.append(f"{name.ljust(width)}  {value if value not in (None, '') else '-'}")
    return "\n".join(lines)
