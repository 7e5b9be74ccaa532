"""Sealing keys for the local store: AES-256-GCM under one master key.

A sealed value is `nonce (12 random bytes) || ciphertext || tag`. The associated data names
what the value belongs to (for a key: its tenant), so a ciphertext copied into another
tenant's row does not open. The master key is `BROKER_MASTER_KEY`, else the file `master.key`
in the store directory: created once with mode 0600, base64 text (so it can be moved into
`BROKER_MASTER_KEY` as is), and refused if its group or others may read it.

cryptography (its OpenSSL binding, ~6 MiB resident) is imported when the first value is
sealed or opened, not with this module: a broker without tenants never needs it
(docs/decisions.md, "What `broker serve` imports when").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import UnsealError as UnsealError  # its home is errors.py; imported here
from broker.settings import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE_NAME = "master.key"
# What a master key's fingerprint is the HMAC-SHA256 of, under the key (`Sealer.fingerprint`).
_FINGERPRINT_LABEL = b"pleo-key-broker/master-key-fingerprint/v1"


class Sealer:
    """Seals and opens small secrets with AES-256-GCM; its repr never shows the master key."""

    __slots__ = ("_aead", "_master_key")

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ValueError(f"the master key must be exactly {MASTER_KEY_BYTES} bytes")
        self._master_key = master_key
        self._aead: AESGCM | None = None

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """Encrypt `plaintext` bound to `context`, under a fresh random nonce."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._cipher().encrypt(nonce, plaintext, context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        """Decrypt what `seal` made with the same `context`, or raise UnsealError."""
        if len(sealed) < NONCE_BYTES + 16:
            raise UnsealError("sealed value is too short")
        cipher = self._cipher()
        try:
            return cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context)
        except Exception as exc:
            from cryptography.exceptions import InvalidTag  # loaded with the cipher

            if isinstance(exc, InvalidTag):
                raise UnsealError("sealed value did not authenticate") from None
            raise

    def fingerprint(self) -> str:
        """HMAC-SHA256 of a fixed label under the master key, in hex: tells whether two keys
        are the same without holding either (recovering the key from it means breaking
        HMAC-SHA256), and without loading the cipher."""
        return hmac.new(self._master_key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()

    def _cipher(self) -> AESGCM:
        """The AES-GCM cipher, made (and cryptography imported) at the first use."""
        if self._aead is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(self._master_key)
        return self._aead

    def __repr__(self) -> str:
        return "Sealer(<master key hidden>)"


def tenant_context(tenant: str) -> bytes:
    """Associated data binding a sealed key to its tenant."""
    return b"pleo-key-broker/tenant-key/v1:" + tenant.encode()


def load_or_create_master_key(directory: Path) -> bytes:
    """The master key from `<directory>/master.key`, creating the file (0600) if missing."""
    path = directory / KEY_FILE_NAME
    try:
        return read_master_key_file(path)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(MASTER_KEY_BYTES)  # what AESGCM.generate_key does: os.urandom
    # Write a private temporary file, then hard-link it into place: the link fails if another
    # process published a key first, and no reader ever sees a half-written key file.
    temporary = directory / f".{KEY_FILE_NAME}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, base64.b64encode(key) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)
    except FileExistsError:
        return read_master_key_file(path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(directory)
    return key


def read_master_key_file(path: Path) -> bytes:
    """Read a master key file, refusing one others may read or that is not 32 bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"master key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"master key file {path} may be read by group or others"
                f" (mode {stat.S_IMODE(info.st_mode):04o}); run 'chmod 600 {path}'"
            )
        content = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        key = base64.b64decode(content.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise ConfigError(
            f"master key file {path} does not hold {MASTER_KEY_BYTES} base64-encoded bytes;"
            " restore the file this store was created with"
        )
    return key


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
