"""Shared gossip keys: AES-GCM with a primary key and rotation.

Theory of operation: every member holds the same set of installed keys.
The primary key encrypts everything we send; every installed key is tried
on what we receive, so a rotation is three cluster-wide steps with no
downtime: ``install`` the new key everywhere, ``use`` it everywhere, then
``remove`` the old one. Keys are 16, 24 or 32 bytes (AES-128/192/256) and
travel in config as base64. The ring persists as a JSON list of base64
keys, primary first (the layout of serf's keyring file), written
atomically into a directory the agent chooses.

Each sealed message is ``nonce (12 bytes) || ciphertext || tag (16)``; the
nonce is random per message (``os.urandom``), which is safe for far more
messages than a cluster sends under one key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cronmesh.errors import RemoteError, StorageError, ValidationError

__all__ = [
    "KEYRING_FILE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "DecodeError",
    "Keyring",
    "decode_key",
    "generate_key",
]

# Name of the persisted keyring inside the directory given to save/load.
KEYRING_FILE = "keyring.json"
NONCE_SIZE = 12
TAG_SIZE = 16
_KEY_SIZES = (16, 24, 32)


class DecodeError(RemoteError):
    """A packet or stream from a peer is truncated, garbage or sealed with a
    key we do not hold."""


def generate_key() -> str:
    """Return a new random AES-256 key as base64 (what ``cronmesh keygen``
    prints)."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def decode_key(key: str | bytes) -> bytes:
    """Turn a base64 string (or raw key bytes) into a checked raw key.

    Raises:
        ValidationError: not base64, or not 16, 24 or 32 bytes long.
    """
    if isinstance(key, str):
        try:
            raw = base64.b64decode(key.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValidationError("gossip key is not valid base64", "key") from exc
    else:
        raw = bytes(key)
    if len(raw) not in _KEY_SIZES:
        raise ValidationError(
            f"gossip key is {len(raw)} bytes; it must be 16, 24 or 32", "key"
        )
    return raw


class Keyring:
    """Installed keys plus the primary one; mutate only via the methods."""

    def __init__(
        self, keys: Sequence[str | bytes], primary: str | bytes | None = None
    ) -> None:
        """Build a ring; ``primary`` defaults to the first key.

        Raises:
            ValidationError: no keys, a malformed key, or a primary key that
                is not among ``keys``.
        """
        raw_keys = [decode_key(key) for key in keys]
        if not raw_keys:
            raise ValidationError("a keyring needs at least one key", "keys")
        self._ciphers: dict[bytes, AESGCM] = {}
        for raw in raw_keys:
            self._ciphers.setdefault(raw, AESGCM(raw))
        self._primary = raw_keys[0]
        if primary is not None:
            self.use(primary)

    @property
    def primary_key(self) -> bytes:
        """The key that encrypts outgoing data."""
        return self._primary

    @property
    def keys(self) -> list[bytes]:
        """All installed keys, primary first."""
        return [self._primary, *(k for k in self._ciphers if k != self._primary)]

    def install(self, key: str | bytes) -> None:
        """Add a key for decryption (no-op if already installed)."""
        raw = decode_key(key)
        self._ciphers.setdefault(raw, AESGCM(raw))

    def use(self, key: str | bytes) -> None:
        """Make an installed key the primary one.

        Raises:
            ValidationError: the key is not installed.
        """
        raw = decode_key(key)
        if raw not in self._ciphers:
            raise ValidationError("install a key before using it", "key")
        self._primary = raw

    def remove(self, key: str | bytes) -> None:
        """Uninstall a key.

        Raises:
            ValidationError: the key is the primary one, or not installed.
        """
        raw = decode_key(key)
        if raw == self._primary:
            raise ValidationError("cannot remove the primary key", "key")
        if self._ciphers.pop(raw, None) is None:
            raise ValidationError("key is not installed", "key")

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Seal ``plaintext`` with the primary key: nonce, ciphertext, tag."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._ciphers[self._primary].encrypt(nonce, plaintext, aad)

    def decrypt(self, sealed: bytes, aad: bytes) -> bytes:
        """Open data sealed by any installed key, the primary tried first.

        Raises:
            DecodeError: too short, or no installed key authenticates it.
        """
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise DecodeError("encrypted payload is too short")
        nonce, body = sealed[:NONCE_SIZE], sealed[NONCE_SIZE:]
        for key in self.keys:
            try:
                return self._ciphers[key].decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        raise DecodeError("no installed key decrypts the payload")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the ring atomically to ``directory/keyring.json`` (mode 0600).

        Raises:
            StorageError: the file could not be written.
        """
        path = Path(directory) / KEYRING_FILE
        text = json.dumps([base64.b64encode(k).decode("ascii") for k in self.keys])
        try:
            _atomic_write(path, text.encode())
        except OSError as exc:
            raise StorageError(f"cannot write keyring {path}: {exc}") from exc
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Keyring:
        """Read ``directory/keyring.json`` written by :meth:`save`.

        Raises:
            StorageError: the file cannot be read.
            ValidationError: the file is not a JSON list of valid keys.
        """
        path = Path(directory) / KEYRING_FILE
        try:
            text = path.read_text()
        except OSError as exc:
            raise StorageError(f"cannot read keyring {path}: {exc}") from exc
        try:
            keys = json.loads(text)
        except ValueError as exc:
            raise ValidationError(f"keyring {path} is not JSON", "keyring") from exc
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValidationError(f"keyring {path} must be a list", "keyring")
        return cls(keys)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, rename, fsync dir."""
    fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
