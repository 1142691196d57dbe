"""Mutual TLS for the accelerator link (Python's :mod:`ssl`) and a test PKI (``asymml certs``).

Both sides present a certificate signed by the deployment's CA and verify the peer's against it
(``CERT_REQUIRED`` on both ends, TLS ≥ 1.2). The client also checks the server's name against its address
(tcp only). :func:`write_test_pki` creates a CA and the two key pairs for a test deployment with the
``cryptography`` package.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class TLSConfig:
    """Paths of this side's certificate chain and private key, and of the CA that signs the peer."""

    cert: str
    key: str
    ca: str

    @classmethod
    def from_options(cls, cert: str | os.PathLike | None, key: str | os.PathLike | None,
                     ca: str | os.PathLike | None) -> TLSConfig | None:
        """``None`` when no option is given; all three are required together."""
        given = [x is not None for x in (cert, key, ca)]
        if not any(given):
            return None
        if not all(given):
            raise ConfigError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca "
                              "(create a test set with `asymml certs --out DIR`)")
        for what, p in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
            if not os.path.isfile(p):
                raise ConfigError(f"{what} {p}: no such file")
        return cls(os.fspath(cert), os.fspath(key), os.fspath(ca))

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(cafile=self.ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"cannot load TLS credentials (cert {self.cert}, key {self.key}, CA {self.ca}): {e}") from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """A server context that requires a client certificate signed by the CA."""
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        """A client context that presents our certificate and verifies the server's (and its name)."""
        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = check_hostname
        return ctx


def write_test_pki(out: str | os.PathLike, hosts: list[str] | None = None, *, days: int = 30) -> dict[str, Path]:
    """Write ``ca.pem``, ``server.pem``/``server.key`` and ``client.pem``/``client.key`` into ``out``.

    For tests and trial deployments: the CA key is not kept (nothing else can be signed later). The server
    certificate is valid for ``hosts`` (default: localhost, 127.0.0.1, ::1). Keys are written 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = hosts or ["localhost", "127.0.0.1", "::1"]
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "asymml test PKI"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("asymml test CA")).issuer_name(name("asymml test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[str]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            alt: list[x509.GeneralName] = []
            for h in sans:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    alt.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key

    files: dict[str, Path] = {}

    def write(fname: str, data: bytes, private: bool) -> None:
        p = outp / fname
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if private:
            os.chmod(p, 0o600)
        files[fname] = p

    write("ca.pem", ca.public_bytes(serialization.Encoding.PEM), False)
    for role, usage, sans in (("server", ExtendedKeyUsageOID.SERVER_AUTH, hosts),
                              ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [])):
        cert_pem, key_pem = leaf(f"asymml {role}", usage, sans)
        write(f"{role}.pem", cert_pem, False)
        write(f"{role}.key", key_pem, True)
    return files
