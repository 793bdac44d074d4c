"""TLS for the gRPC port between nodes, and the checks of the HTTP API's.

`RpcSecurity` is the one place that opens gRPC ports and channels. Built
from nothing it is plain TCP; built from a CA, a certificate and its key it
is mutual TLS: the server asks every caller for a certificate signed by the
CA and refuses the handshake otherwise, and channels present our
certificate and accept only servers whose certificate the CA signed and
names the host dialled (a SAN IP address or DNS name). Every node of a
cluster uses the same CA.

A refused handshake never reaches Python: gRPC's core logs it on stderr
("Handshake failed ..."), and `check` lets the Raft leader refuse, with a
log line naming the server, a peer it cannot talk to before adding it.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from cronmesh.errors import ValidationError

__all__ = ["RpcSecurity", "check_http_tls"]

ChannelOptions = Sequence[tuple[str, Any]]

# A method no service implements: UNIMPLEMENTED proves that a connection,
# TLS handshake included, was made, with no effect on the peer.
_PROBE_METHOD = "/cronmesh.probe.v1.Probe/Ping"


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(f"{flag}: cannot read {path}: {exc.strerror}") from exc


def _certificates(data: bytes, path: str, flag: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValidationError(f"{flag}: {path} holds no PEM certificate") from exc
    now = datetime.now(UTC)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise ValidationError(
                f"{flag}: {path}: certificate {cert.subject.rfc4514_string()} "
                f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
            )
    return certs


class RpcSecurity:
    """How this node's gRPC server listens and its channels connect."""

    def __init__(self, ca: bytes = b"", cert: bytes = b"", key: bytes = b"") -> None:
        self.ca = ca
        self.cert = cert
        self.key = key

    @classmethod
    def from_files(cls, ca: str = "", cert: str = "", key: str = "") -> RpcSecurity:
        """Plain when all three are empty, mutual TLS when all three are set.

        Raises:
            ValidationError: some but not all set, a file that cannot be
                read or parsed, a key that does not match the certificate,
                a certificate the CA did not sign or that has expired; the
                message names the flag and the file.
        """
        given = {"--rpc-ca": ca, "--rpc-cert": cert, "--rpc-key": key}
        if not any(given.values()):
            return cls()
        missing = [flag for flag, path in given.items() if not path]
        if missing:
            raise ValidationError(
                f"{', '.join(missing)}: required with the other --rpc-* flags "
                "(mutual TLS needs a CA, a certificate and its key)"
            )
        ca_pem = _read(ca, "--rpc-ca")
        cert_pem = _read(cert, "--rpc-cert")
        key_pem = _read(key, "--rpc-key")
        authorities = _certificates(ca_pem, ca, "--rpc-ca")
        ours = _certificates(cert_pem, cert, "--rpc-cert")[0]
        try:
            private = load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValidationError(
                f"--rpc-key: {key} is not an unencrypted PEM private key"
            ) from exc
        if private.public_key() != ours.public_key():
            raise ValidationError(
                f"--rpc-key: {key} is not the key of the certificate in {cert}"
            )
        if not any(_issued_by(ours, authority) for authority in authorities):
            raise ValidationError(
                f"--rpc-cert: {cert} is not signed by the CA in {ca}; "
                "other nodes would refuse it"
            )
        return cls(ca_pem, cert_pem, key_pem)

    @property
    def enabled(self) -> bool:
        return bool(self.ca)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on `address`; returns the port bound (0: could not)."""
        if not self.enabled:
            return server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca,
            require_client_auth=True,
        )
        return server.add_secure_port(address, credentials)

    def channel(
        self, target: str, options: ChannelOptions | None = None
    ) -> grpc.aio.Channel:
        """A channel to another node's gRPC port."""
        if not self.enabled:
            return grpc.aio.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.key,
            certificate_chain=self.cert,
        )
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def check(self, target: str, timeout: float = 2.0) -> str | None:
        """Whether a connection to `target` can be opened (TLS handshake
        included): None if so, else gRPC's reason."""
        channel = self.channel(target)
        try:
            ping = channel.unary_unary(
                _PROBE_METHOD,
                request_serializer=None,
                response_deserializer=None,
            )
            await ping(b"", timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            return f"{exc.code().name}: {exc.details()}"
        finally:
            await channel.close()
        return None


def _issued_by(cert: x509.Certificate, authority: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_http_tls(cert: str, key: str) -> None:
    """`--tls-cert` and `--tls-key` both or neither, and loadable together.

    Raises:
        ValidationError: names the flag and the file.
    """
    if not cert and not key:
        return
    if not cert or not key:
        missing = "--tls-cert" if not cert else "--tls-key"
        raise ValidationError(f"{missing}: required with the other --tls-* flag")
    _certificates(_read(cert, "--tls-cert"), cert, "--tls-cert")
    _read(key, "--tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ValidationError(
            f"--tls-key: {key} does not go with the certificate in {cert} "
            f"or is not an unencrypted PEM key ({exc.reason})"
        ) from exc
