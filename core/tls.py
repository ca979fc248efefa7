"""A self-signed TLS certificate, generated on first start: the gateway's under data/tls/, and the workers'
under data/tls-worker/ when the gateway reaches them over TLS (``service.worker_tls``).

Browsers only give a page the microphone on a secure origin, so the gateway serves HTTPS by default
(``--http`` opts out). The certificate is an ECDSA P-256 one (fast to make, accepted everywhere) with
SANs for localhost, 127.0.0.1, ::1, this machine's host name and any host the gateway was told to bind.
It is reused while valid for at least a week more and while it names every host asked for; otherwise a
new one replaces it. The key file is written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Iterable
from pathlib import Path

CERT_NAME, KEY_NAME = "cert.pem", "key.pem"
VALID_DAYS = 825  # the longest validity Apple platforms accept for a TLS server certificate
RENEW_BEFORE = dt.timedelta(days=7)
_WILDCARD_BINDS = {"", "0.0.0.0", "::", "*"}


class TLSError(RuntimeError):
    """The certificate could not be read or written (the message says which file)."""


def default_hosts(extra: Iterable[str] = ()) -> list[str]:
    """localhost, loopback addresses, this host's name, and ``extra`` (wildcard binds skipped)."""
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    for host in extra:
        if host and host not in _WILDCARD_BINDS and host not in hosts:
            hosts.append(host)
    return hosts


def _san_entries(hosts: Iterable[str]) -> list[object]:
    from cryptography import x509

    entries: list[object] = []
    for host in dict.fromkeys(h.strip("[]") for h in hosts if h):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def certificate_hosts(cert_path: Path) -> set[str]:
    """The DNS names and IP addresses a certificate's SAN lists."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    }


def _usable(cert_path: Path, key_path: Path, hosts: list[str]) -> bool:
    from cryptography import x509

    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = certificate_hosts(cert_path)
    except (ValueError, x509.ExtensionNotFound, OSError):
        return False
    fresh = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE
    wanted = {str(ipaddress.ip_address(h.strip("[]"))) if _is_ip(h) else h for h in hosts}
    return fresh and wanted <= names


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def generate_certificate(cert_path: Path, key_path: Path, hosts: list[str]) -> None:
    """Write a new self-signed certificate and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(key_path, key_pem)
    tmp = cert_path.with_suffix(".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, cert_path)


def ensure_certificate(tls_dir: str | Path, hosts: Iterable[str] = ()) -> tuple[Path, Path]:
    """The (certificate, key) paths under ``tls_dir``, generated when missing, stale or lacking a host."""
    directory = Path(tls_dir)
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    wanted = default_hosts(hosts)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not _usable(cert_path, key_path, wanted):
            generate_certificate(cert_path, key_path, wanted)
    except OSError as exc:
        raise TLSError(f"cannot write the TLS certificate under {directory}: {exc}") from None
    return cert_path, key_path
