"""TLS for every evserver port: the server's certificate and connection creators.

On first start the server makes a self-signed certificate in its data
directory (``tls/server.key``, mode 0600, and ``tls/server.pem``) naming every
host name and IP address it is reached by; later starts reuse the files.
Clients trust it by being given ``server.pem`` (``client_tls_options(...,
ca_path=...)``) or, for tests only, by not verifying at all.

TLS is layered on plain stream endpoints with
:class:`twisted.protocols.tls.TLSMemoryBIOFactory`, so one code path serves
TCP, UNIX sockets and in-memory test transports alike.  TLS 1.2 is the
minimum.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.protocols.tls import TLSMemoryBIOFactory

if TYPE_CHECKING:  # Twisted does not export the interface publicly
    from twisted.internet._sslverify import IOpenSSLTrustRoot

TLS_DIRNAME = "tls"
KEY_FILENAME = "server.key"
CERT_FILENAME = "server.pem"
VALIDITY = datetime.timedelta(days=3650)
# Start validity a day early so a peer whose clock is somewhat behind accepts it.
BACKDATE = datetime.timedelta(days=1)
MINIMUM_TLS = ssl.TLSVersion.TLSv1_2


def _general_name(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def make_self_signed_certificate(
    hostnames: Sequence[str], now: datetime.datetime | None = None,
    unique: str | None = None,
) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed certificate for ``hostnames``, as PEM.

    The subject CN is the first name; every name is in subjectAltName (IP
    addresses as IP entries).  Valid for ten years.  Returns (cert, key).
    ``unique`` (a server id) goes into the subject's serialNumber, so that
    servers sharing a host name (behind one NAT) have distinct subjects:
    OpenSSL finds trust anchors by subject, and a client trusting several
    servers' certificates would otherwise verify only one of them.
    """
    names = list(dict.fromkeys(hostnames))  # drop duplicates, keep order
    if not names:
        raise ValueError("a certificate needs at least one host name")
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]
    if unique:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, unique[:64]))
    subject = x509.Name(attributes)
    start = (now or datetime.datetime.now(datetime.UTC)) - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + BACKDATE + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        # A self-signed end-entity certificate: clients pin it as their trust root.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # in case the file existed with another mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_server_certificate(
    data_dir: str | os.PathLike[str], hostnames: Sequence[str], unique: str | None = None
) -> tuple[Path, Path]:
    """Return ``(cert_path, key_path)`` of the server's certificate, making it if missing.

    The files are ``data_dir/tls/server.pem`` and ``data_dir/tls/server.key``.
    If both exist they are reused as they are (a client that pinned the
    certificate keeps working), even if ``hostnames`` changed since.  If
    only one exists, both are made anew.
    """
    tls_dir = Path(data_dir) / TLS_DIRNAME
    cert_path = tls_dir / CERT_FILENAME
    key_path = tls_dir / KEY_FILENAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_pem, key_pem = make_self_signed_certificate(hostnames, unique=unique)
    # Key first: a crash between the two leaves no certificate without its key.
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert_pem, 0o644)
    return cert_path, key_path


def certificate_hostnames(cert_path: str | os.PathLike[str]) -> list[str]:
    """The subjectAltName entries (DNS names and IP addresses) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san if isinstance(name, x509.DNSName | x509.IPAddress)]


def server_tls_options(
    cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
) -> IOpenSSLServerConnectionCreator:
    """Server-side TLS (1.2 or newer) with the given certificate and key files."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if cert.public_key() != key.public_key():
        raise ValueError(f"{str(key_path)!r} is not the key of {str(cert_path)!r}")
    # pyOpenSSL (>= 24.3) takes cryptography's objects directly; its own
    # X509/PKey wrappers are deprecated.
    options: IOpenSSLServerConnectionCreator = ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=cert,  # type: ignore[arg-type]
        raiseMinimumTo=MINIMUM_TLS,
    )
    return options


def load_trust_root(ca_path: str | os.PathLike[str]) -> IOpenSSLTrustRoot:
    """A trust root made of every certificate in the PEM file ``ca_path``."""
    certs = x509.load_pem_x509_certificates(Path(ca_path).read_bytes())
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certs]
    )


def client_tls_options(
    hostname: str, ca_path: str | os.PathLike[str] | None, insecure: bool = False
) -> IOpenSSLClientConnectionCreator:
    """Client-side TLS (1.2 or newer) for connecting to ``hostname``.

    - ``ca_path`` given: trust only the certificates in that PEM file (for
      a standalone server, its ``tls/server.pem``) and check that the
      server's certificate names ``hostname``.
    - ``ca_path`` None: trust the system's certificate authorities.
    - ``insecure=True``: FOR TESTS AND BENCHMARKS ONLY.  Nothing is verified,
      neither the certificate's issuer nor its name: the connection is
      encrypted but anyone in the path can impersonate the server.
    """
    if insecure:
        unverified: IOpenSSLClientConnectionCreator = ssl.CertificateOptions(
            verify=False, raiseMinimumTo=MINIMUM_TLS
        )
        return unverified
    trust_root = load_trust_root(ca_path) if ca_path is not None else None
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=trust_root,
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS},
    )


def wrap_server_factory(
    factory: IProtocolFactory,
    creator: IOpenSSLServerConnectionCreator,
    clock: IReactorTime | None = None,
) -> TLSMemoryBIOFactory:
    """``factory`` behind server-side TLS: listen with the result instead.

    ``clock`` schedules the flushing of small writes (Twisted aggregates
    them until the next reactor turn); the global reactor if None.  Pass the
    test's Clock for in-memory connections.
    """
    return TLSMemoryBIOFactory(creator, False, factory, clock)


def wrap_client_factory(
    factory: IProtocolFactory,
    creator: IOpenSSLClientConnectionCreator,
    clock: IReactorTime | None = None,
) -> TLSMemoryBIOFactory:
    """``factory`` behind client-side TLS: connect with the result instead."""
    return TLSMemoryBIOFactory(creator, True, factory, clock)
