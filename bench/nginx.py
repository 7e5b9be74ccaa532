"""nginx as the upstream and as the reference proxy: configuration rendered into a temp dir.

Each nginx runs one worker in the foreground (`daemon off`) with its own prefix, pid file,
logs and temp paths, so no root and no system directory is needed.
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

JSON_PATH = "/v3/export-jobs"
DOWNLOAD_PATH = "/v2/export-jobs/download"
UPLOAD_PREFIX = "/v2/export-jobs/"


@dataclass(frozen=True)
class Layout:
    """Where one nginx keeps its files."""

    prefix: Path

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"


def find_nginx() -> str | None:
    """The nginx binary, or None (then an asyncio upstream stands in)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def _common(layout: Layout, body: str) -> str:
    temp = layout.prefix / "temp"
    # As root, nginx would run its worker as `nobody`, which cannot read a private temp dir;
    # not as root, nginx ignores this line.
    user = pwd.getpwuid(os.getuid()).pw_name
    return f"""user {user};
worker_processes 1;
daemon off;
master_process on;
pid {layout.pid_file};
error_log {layout.error_log} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
{body}}}
"""


def upstream_conf(layout: Layout, port: int, data_dir: Path) -> str:
    """The upstream: the JSON body, the download file, and PUT uploads written to disk.

    Uploads go through the DAV module into `data_dir/uploads`, so the benchmark can check
    that every byte arrived by the size of the written file.
    """
    return _common(
        layout,
        f"""    open_file_cache max=16 inactive=600s;
    open_file_cache_valid 600s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {JSON_PATH} {{
            default_type application/json;
            alias {data_dir / "export-jobs.json"};
        }}
        location = {DOWNLOAD_PATH} {{
            default_type application/octet-stream;
            alias {data_dir / "download.bin"};
        }}
        location {UPLOAD_PREFIX} {{
            root {data_dir / "uploads"};
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
            client_body_buffer_size 1m;
        }}
        location / {{
            return 404;
        }}
    }}
""",
    )


def proxy_conf(
    layout: Layout, port: int, upstream_port: int, authorization: str, *, keepalive: bool
) -> str:
    """A reverse proxy adding a static Authorization header.

    Without `keepalive` it is nginx's default `proxy_pass` (HTTP/1.0, a new upstream
    connection per request): the reference docs/performance.md measured (21 µs a request).
    With it, upstream connections are pooled as the broker pools them: a stricter bar.
    """
    pool = "        keepalive 256;\n" if keepalive else ""
    reuse = (
        '            proxy_http_version 1.1;\n            proxy_set_header Connection "";\n'
        if keepalive
        else ""
    )
    return _common(
        layout,
        f"""    upstream pleo {{
        server 127.0.0.1:{upstream_port};
{pool}    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://pleo;
{reuse}            proxy_set_header Authorization "{authorization}";
            proxy_buffering on;
        }}
    }}
""",
    )


def prepare(layout: Layout, conf: str) -> list[str]:
    """Write the configuration and temp dirs; the argv that runs this nginx."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (layout.prefix / "temp" / sub).mkdir(parents=True, exist_ok=True)
    layout.conf.write_text(conf)
    binary = find_nginx()
    if binary is None:
        raise FileNotFoundError("nginx is not installed")
    return [binary, "-p", str(layout.prefix), "-c", str(layout.conf), "-e", str(layout.error_log)]
