"""A stand-in for the Kubernetes TokenReview API, for OpenBao's kubernetes auth method.

Serves `POST /apis/authentication.k8s.io/v1/tokenreviews` on 127.0.0.1: a token issued by
`issue()` is authenticated as its service account, any other token is not. Tokens are real
RS256-signed service account JWTs, as a kubelet would project them.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str
    uid: str

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


class TokenReviewServer:
    """A TokenReview endpoint that knows the tokens it issued; `close()` stops it."""

    def __init__(self) -> None:
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._accounts: dict[str, ServiceAccount] = {}
        self.reviews = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def ca_pem(self) -> str:
        """A cluster CA certificate (OpenBao requires one; the stand-in speaks plain HTTP)."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenreview-stand-in")])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._signing_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._signing_key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, namespace: str, name: str) -> str:
        """A signed service account JWT that this server will authenticate."""
        account = ServiceAccount(namespace, name, str(uuid.uuid4()))
        claims = {
            "iss": "kubernetes/serviceaccount",
            "sub": account.username,
            "kubernetes.io/serviceaccount/namespace": namespace,
            "kubernetes.io/serviceaccount/secret.name": f"{name}-token",
            "kubernetes.io/serviceaccount/service-account.name": name,
            "kubernetes.io/serviceaccount/service-account.uid": account.uid,
        }
        token = self._sign(claims)
        self._accounts[token] = account
        return token

    def revoke(self, token: str) -> None:
        self._accounts.pop(token, None)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _sign(self, claims: dict[str, Any]) -> str:
        header = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "test"}).encode())
        payload = _b64(json.dumps(claims).encode())
        signing_input = f"{header}.{payload}".encode()
        signature = self._signing_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{payload}.{_b64(signature)}"

    def _review(self, body: dict[str, Any]) -> dict[str, Any]:
        self.reviews += 1
        token = str(body.get("spec", {}).get("token", ""))
        account = self._accounts.get(token)
        status: dict[str, Any] = {"authenticated": False}
        if account is not None:
            status = {
                "authenticated": True,
                "user": {
                    "username": account.username,
                    "uid": account.uid,
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{account.namespace}",
                    ],
                },
            }
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
            "status": status,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        review = self._review

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path.split("?")[0] != REVIEW_PATH:
                    self._send(404, {"kind": "Status", "code": 404})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                self._send(201, review(json.loads(self.rfile.read(length) or b"{}")))

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return  # tokens must not reach the test output

        return Handler


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
