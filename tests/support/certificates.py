"""Self-signed certificates for TLS servers on 127.0.0.1 (the data plane's client, the Vault
store's bulk read): a CA certificate naming one host, its key, and a server context."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class SelfSigned:
    """A self-signed CA certificate (valid for an hour either side of now) and its key."""

    subject: x509.Name
    cert_pem: bytes
    key_pem: bytes

    def server_context(self, certfile: Path, keyfile: Path) -> ssl.SSLContext:
        """Write the certificate and key to these files; a server's TLS context using them."""
        certfile.write_bytes(self.cert_pem)
        keyfile.write_bytes(self.key_pem)
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(certfile, keyfile)
        return server


def self_signed(name: str, *, addresses: tuple[str, ...] = ()) -> SelfSigned:
    """A CA certificate for the host `name` (and these IP addresses), signed by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    alternatives: list[x509.GeneralName] = [x509.DNSName(name)]
    alternatives += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SelfSigned(subject, cert.public_bytes(serialization.Encoding.PEM), key_pem)
