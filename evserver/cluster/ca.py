"""The cluster certificate authority, the servers' certificates and peer TLS.

Enabling multi-site resilience makes ``DATA/cluster/`` (mode 0700)::

    cluster-id   the cluster's id (a UUID4)
    ca.pem       the cluster CA: EC P-256, ten years, subject
                 CN "evserver cluster <cluster-id>"
    ca.key       its private key, mode 0600 (given to every member when it
                 joins, so any member can admit a new server)
    server.pem   this server's certificate, signed by the CA: CN = server id,
                 SAN DNS "<server-id>.cluster.evserver.invalid" plus its
                 external hosts, serverAuth + clientAuth, two years
    server.key   its private key, mode 0600

The directory is written whole or not at all: the files go into a temporary
sibling directory that is then renamed into place.  A member without the CA
key (``ca.key`` absent) still works; it just cannot sign certificates.

Peers authenticate each other with mutual TLS under the cluster CA
(:func:`peer_server_tls_options`, :func:`peer_client_tls_options`); a new
server that has no certificate yet pins the CA by its fingerprint
(:func:`pinned_client_tls_options`).  Everything here is pure: keys,
certificates and files, with the time passed in (Unix seconds, or a
callable returning them).
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import math
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from evserver.config import SERVER_ID_PATTERN, validate_host

CLUSTER_DIRNAME = "cluster"
CLUSTER_ID_FILENAME = "cluster-id"
CA_CERT_FILENAME = "ca.pem"
CA_KEY_FILENAME = "ca.key"
SERVER_CERT_FILENAME = "server.pem"
SERVER_KEY_FILENAME = "server.key"
REQUIRED_FILENAMES = (
    CLUSTER_ID_FILENAME,
    CA_CERT_FILENAME,
    SERVER_CERT_FILENAME,
    SERVER_KEY_FILENAME,
)

#: A server's certificate names it as ``<server-id>`` + this suffix (RFC 6761
#: reserves ``.invalid``, so the name can never be a real host's).
SERVER_NAME_SUFFIX = ".cluster.evserver.invalid"
CA_NAME_PREFIX = "evserver cluster "
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=730)
# Certificates start a day early so that a peer whose clock is behind accepts them.
BACKDATE = datetime.timedelta(days=1)
MINIMUM_TLS = ssl.TLSVersion.TLSv1_2
_CURVES = (ec.SECP256R1, ec.SECP384R1)

# OpenSSL's X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN: the only verification error
# a pinned client forgives, and only for the pinned authority itself.
_SELF_SIGNED_CERT_IN_CHAIN = 19

Clock = Callable[[], float]
#: Unix seconds, or a clock returning them (``time.time``, ``reactor.seconds``).
Now = float | Clock


class ClusterError(Exception):
    """A cluster identity, certificate or request is missing, broken or refused."""


def unix_seconds(now: Now) -> float:
    """``now`` as Unix seconds: the value itself, or what the clock returns."""
    value = now() if callable(now) else now
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"the time must be finite Unix seconds, not {value!r}")
    return float(value)


def _utc(now: Now) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(unix_seconds(now), datetime.UTC)


def server_dns_name(server_id: str) -> str:
    """The DNS name every certificate of ``server_id`` carries in its SAN."""
    return f"{server_id}{SERVER_NAME_SUFFIX}"


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex (64 characters)."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def _validate_server_id(server_id: object) -> str:
    if not isinstance(server_id, str) or not SERVER_ID_PATTERN.fullmatch(server_id):
        raise ClusterError(f"server id {server_id!r} is invalid: use 1-64 of A-Z a-z 0-9 . _ -")
    return server_id


def _validate_cluster_id(cluster_id: object) -> str:
    try:
        ok = isinstance(cluster_id, str) and str(uuid.UUID(cluster_id)) == cluster_id
    except ValueError:
        ok = False
    if not ok:
        raise ClusterError(f"cluster id {cluster_id!r} is not a lowercase UUID")
    return str(cluster_id)


def _general_names(server_id: str, hostnames: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(server_dns_name(server_id))]
    for host in dict.fromkeys(hostnames):
        try:
            validate_host(host)
        except ValueError as e:
            raise ClusterError(str(e)) from None
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return list(dict.fromkeys(names))


def _common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        return None
    return values[0].value


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _check_key_type(key: object, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) or not (
        isinstance(key.curve, _CURVES)
    ):
        raise ClusterError(f"{what} must be an EC P-256 or P-384 key, not {type(key).__name__}")


# -- certificates -------------------------------------------------------------------------


def _make_ca(
    cluster_id: str, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME_PREFIX + cluster_id)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    server_id: str,
    hostnames: Iterable[str],
    now: datetime.datetime,
) -> x509.Certificate:
    not_after = min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ClusterError("the cluster CA certificate has expired: it cannot sign any more")
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_general_names(server_id, hostnames)), False)
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
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_identity(
    cluster_id: str,
    ca_cert: x509.Certificate,
    ca_key: object,
    server_cert: x509.Certificate,
    server_key: object,
    server_id: str,
) -> None:
    """Raise ClusterError unless these form one consistent cluster identity."""
    _validate_cluster_id(cluster_id)
    _validate_server_id(server_id)
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca or not _is_issued_by(ca_cert, ca_cert):
        raise ClusterError("the CA certificate is not a self-signed certificate authority")
    ca_name = _common_name(ca_cert.subject)
    if ca_name != CA_NAME_PREFIX + cluster_id:
        raise ClusterError(
            f"the CA certificate ({ca_name!r}) is not the authority of cluster {cluster_id}"
        )
    if ca_key is not None:
        _check_key_type(ca_key, "the CA key")
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        if ca_key.public_key() != ca_cert.public_key():
            raise ClusterError("the CA key does not match the CA certificate")
    if not _is_issued_by(server_cert, ca_cert):
        raise ClusterError("the server certificate is not signed by the cluster CA")
    _check_key_type(server_key, "the server key")
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    if server_key.public_key() != server_cert.public_key():
        raise ClusterError("the server key does not match the server certificate")
    cert_id = _common_name(server_cert.subject)
    if cert_id != server_id:
        raise ClusterError(f"the server certificate names server {cert_id!r}, not {server_id!r}")


@attrs.frozen
class ClusterIdentity:
    """This server's membership: the cluster CA and this server's certificate.

    Consistent by construction (ClusterError otherwise): the server
    certificate is signed by the CA, the keys match their certificates,
    the CA names ``cluster_id`` and the server certificate ``server_id``.
    """

    cluster_id: str
    ca_cert: x509.Certificate
    #: None on a member that does not hold the CA key (it cannot sign).
    ca_key: ec.EllipticCurvePrivateKey | None = attrs.field(eq=False, repr=False)
    server_cert: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey = attrs.field(eq=False, repr=False)
    server_id: str

    def __attrs_post_init__(self) -> None:
        _check_identity(
            self.cluster_id,
            self.ca_cert,
            self.ca_key,
            self.server_cert,
            self.server_key,
            self.server_id,
        )

    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (DER), lowercase hex: what join tokens pin."""
        return certificate_fingerprint(self.ca_cert)


# -- PEM ----------------------------------------------------------------------------------


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the file's mode protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_certificate_pem(data: bytes, what: str = "certificate") -> x509.Certificate:
    """One PEM certificate; ClusterError naming ``what`` if it is not one."""
    try:
        return x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as e:
        raise ClusterError(f"{what} is not a PEM certificate: {e}") from None


def load_private_key_pem(data: bytes, what: str = "key") -> ec.EllipticCurvePrivateKey:
    """One unencrypted PEM EC private key; ClusterError naming ``what`` otherwise."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ClusterError(f"{what} is not an unencrypted PEM private key: {e}") from None
    except Exception as e:  # cryptography's UnsupportedAlgorithm
        raise ClusterError(f"{what} is not a usable private key: {e}") from None
    _check_key_type(key, what)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


# -- files --------------------------------------------------------------------------------


def cluster_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / CLUSTER_DIRNAME


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_existing(directory: Path) -> None:
    if directory.is_dir() and not any(directory.iterdir()):
        return
    if not directory.exists():
        return
    try:
        cluster_id = (directory / CLUSTER_ID_FILENAME).read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        cluster_id = ""
    member = f" of cluster {cluster_id}" if cluster_id else ""
    raise ClusterError(
        f"{str(directory)!r} already holds a cluster identity{member}: this server is "
        "already a cluster member (move that directory away only to leave the cluster for good)"
    )


def _write_cluster_dir(
    data_dir: str | os.PathLike[str], files: dict[str, tuple[bytes, int]]
) -> None:
    """Write ``files`` (name -> (content, mode)) as DATA/cluster, all or nothing.

    ClusterError if DATA is missing, DATA/cluster holds anything, or the
    files cannot be written (nothing is left behind then).
    """
    data = Path(data_dir)
    if not data.is_dir():
        raise ClusterError(f"data directory {str(data)!r} does not exist")
    target = data / CLUSTER_DIRNAME
    _refuse_existing(target)
    tmp = data / f".{CLUSTER_DIRNAME}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        os.mkdir(tmp, 0o700)
        try:
            for name, (content, mode) in files.items():
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), mode)  # whatever the umask
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o700)
            _fsync_dir(tmp)
            # Atomic; replaces only a missing or empty directory.
            os.rename(tmp, target)
        except BaseException:
            if tmp.is_dir():
                for child in tmp.iterdir():
                    child.unlink(missing_ok=True)
                tmp.rmdir()
            raise
        _fsync_dir(data)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            _refuse_existing(target)  # lost a race: say who won
        raise ClusterError(f"cannot write {str(target)!r}: {e}") from None


def _identity_files(identity: ClusterIdentity) -> dict[str, tuple[bytes, int]]:
    files = {
        CLUSTER_ID_FILENAME: ((identity.cluster_id + "\n").encode("ascii"), 0o644),
        CA_CERT_FILENAME: (certificate_pem(identity.ca_cert), 0o644),
        SERVER_CERT_FILENAME: (certificate_pem(identity.server_cert), 0o644),
        SERVER_KEY_FILENAME: (private_key_pem(identity.server_key), 0o600),
    }
    if identity.ca_key is not None:
        files[CA_KEY_FILENAME] = (private_key_pem(identity.ca_key), 0o600)
    return files


def create_cluster(
    data_dir: str | os.PathLike[str], server_id: str, hostnames: Sequence[str], now: Now
) -> ClusterIdentity:
    """Make a new cluster with this server as its only member, in DATA/cluster.

    ``hostnames`` are the external host names and IP addresses the server
    is reached by (they go into its certificate's SAN).  Raises ClusterError
    if DATA/cluster already holds an identity, or for an invalid server id
    or host name.
    """
    _validate_server_id(server_id)
    when = _utc(now)
    _refuse_existing(cluster_dir(data_dir))
    cluster_id = str(uuid.uuid4())
    ca_cert, ca_key = _make_ca(cluster_id, when)
    server_key = _new_key()
    server_cert = _issue_server_certificate(
        ca_cert, ca_key, server_key.public_key(), server_id, hostnames, when
    )
    identity = ClusterIdentity(cluster_id, ca_cert, ca_key, server_cert, server_key, server_id)
    _write_cluster_dir(data_dir, _identity_files(identity))
    return identity


def install_membership(
    data_dir: str | os.PathLike[str],
    cluster_id: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey | None,
    server_key: ec.EllipticCurvePrivateKey,
    server_cert: x509.Certificate,
) -> ClusterIdentity:
    """Store what a joining server received (JoinAccept) and its own key, as DATA/cluster.

    Checks that it is all consistent first (ClusterError otherwise); refuses
    if DATA/cluster already holds an identity.  The server id is the
    certificate's CN.
    """
    server_id = _common_name(server_cert.subject)
    if server_id is None:
        raise ClusterError("the server certificate has no single common name")
    identity = ClusterIdentity(cluster_id, ca_cert, ca_key, server_cert, server_key, server_id)
    _write_cluster_dir(data_dir, _identity_files(identity))
    return identity


def load_identity(
    data_dir: str | os.PathLike[str], server_id: str | None = None
) -> ClusterIdentity | None:
    """This server's cluster identity from DATA/cluster; None if it has none.

    None when DATA/cluster is missing or empty (a standalone server).
    ClusterError, naming the directory and what is wrong, when it is
    incomplete, unreadable or inconsistent.  With ``server_id`` (from
    DATA/server-id), also refuses a certificate made for another server.
    """
    directory = cluster_dir(data_dir)
    if not directory.exists():
        return None
    where = str(directory)
    if not directory.is_dir():
        raise ClusterError(f"{where!r} is not a directory")
    try:
        present = {p.name for p in directory.iterdir()}
    except OSError as e:
        raise ClusterError(f"cannot read {where!r}: {e.strerror}") from None
    if not present:
        return None
    missing = [name for name in REQUIRED_FILENAMES if name not in present]
    if missing:
        raise ClusterError(
            f"{where!r} is incomplete (missing {', '.join(missing)}): restore it from a "
            "backup, or move it away and join the cluster again"
        )

    def read(name: str) -> bytes:
        try:
            return (directory / name).read_bytes()
        except OSError as e:
            raise ClusterError(f"cannot read {str(directory / name)!r}: {e.strerror}") from None

    try:
        cluster_id = read(CLUSTER_ID_FILENAME).decode("ascii").strip()
    except UnicodeDecodeError:
        raise ClusterError(f"{where}/{CLUSTER_ID_FILENAME} does not hold a cluster id") from None
    ca_cert = load_certificate_pem(read(CA_CERT_FILENAME), f"{where}/{CA_CERT_FILENAME}")
    ca_key = (
        load_private_key_pem(read(CA_KEY_FILENAME), f"{where}/{CA_KEY_FILENAME}")
        if CA_KEY_FILENAME in present
        else None
    )
    server_cert = load_certificate_pem(
        read(SERVER_CERT_FILENAME), f"{where}/{SERVER_CERT_FILENAME}"
    )
    server_key = load_private_key_pem(read(SERVER_KEY_FILENAME), f"{where}/{SERVER_KEY_FILENAME}")
    cert_id = _common_name(server_cert.subject)
    if cert_id is None:
        raise ClusterError(f"{where}/{SERVER_CERT_FILENAME} has no single common name")
    try:
        identity = ClusterIdentity(cluster_id, ca_cert, ca_key, server_cert, server_key, cert_id)
    except ClusterError as e:
        raise ClusterError(f"{where!r} is inconsistent: {e}") from None
    if server_id is not None and server_id != cert_id:
        raise ClusterError(
            f"{where!r} belongs to server {cert_id!r}, but this server's id is {server_id!r}"
        )
    return identity


# -- joining: certificate requests --------------------------------------------------------


def make_csr(
    server_id: str, hostnames: Sequence[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    """A new key for a joining server and a request (CN = server id) to sign it."""
    _validate_server_id(server_id)
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_id)]))
        .add_extension(x509.SubjectAlternativeName(_general_names(server_id, hostnames)), False)
        .sign(key, hashes.SHA256())
    )
    return key, csr


def sign_csr(
    identity: ClusterIdentity,
    csr: x509.CertificateSigningRequest,
    server_id: str,
    hostnames: Sequence[str],
    now: Now,
) -> x509.Certificate:
    """Sign a joining server's request: its certificate for ``server_id`` and ``hostnames``.

    Only the request's key and CN are used; the names come from the
    arguments.  Refuses (ClusterError) without the CA key, a request with a
    bad signature, a CN other than ``server_id``, this server's own id, or
    a key that is not EC P-256/P-384.  The caller checks the token and that
    no other member has ``server_id``.
    """
    if identity.ca_key is None:
        raise ClusterError("this server does not hold the cluster CA key: it cannot sign")
    _validate_server_id(server_id)
    if server_id == identity.server_id:
        raise ClusterError(f"server id {server_id!r} is this server's own")
    if not csr.is_signature_valid:
        raise ClusterError("the certificate request's signature is invalid")
    cn = _common_name(csr.subject)
    if cn != server_id:
        raise ClusterError(f"the certificate request is for {cn!r}, not server {server_id!r}")
    public_key = csr.public_key()
    _check_key_type(public_key, "the requested key")
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return _issue_server_certificate(
        identity.ca_cert, identity.ca_key, public_key, server_id, hostnames, _utc(now)
    )


# -- peer TLS -----------------------------------------------------------------------------


def _x509(certificate: x509.Certificate) -> crypto.X509:
    return crypto.X509.from_cryptography(certificate)


def peer_server_tls_options(
    identity: ClusterIdentity, *, allow_joiners: bool = False
) -> IOpenSSLServerConnectionCreator:
    """Server side of the peer port: mutual TLS under the cluster CA.

    Presents this server's certificate and the CA (so that a pinned joiner
    can check it).  Requires a client certificate signed by the cluster CA;
    a server of another cluster fails the handshake.

    ``allow_joiners=True`` also lets a client without any certificate
    through (a new server sending JoinRequest); a client that presents a
    certificate must still present one of this cluster.  The protocol then
    must accept nothing but a join request from a connection where
    :func:`peer_certificate` is None.
    """
    options: IOpenSSLServerConnectionCreator = ssl.CertificateOptions(
        privateKey=identity.server_key,  # type: ignore[arg-type]
        certificate=identity.server_cert,  # type: ignore[arg-type]
        extraCertChain=[identity.ca_cert],  # type: ignore[list-item]
        verify=True,
        caCerts=[_x509(identity.ca_cert)],
        requireCertificate=not allow_joiners,
        raiseMinimumTo=MINIMUM_TLS,
    )
    return options


@implementer(IOpenSSLClientConnectionCreator)
class _VerifyingClientCreator:
    """Client connections from ``options`` whose peer certificate ``check`` judges.

    ``check(certificate, error, depth, ok)`` is OpenSSL's verification
    callback (``ok`` is OpenSSL's own verdict) and returns its verdict or
    raises ClusterError with the reason, which the connection is closed
    with (as Twisted's own host name check does).
    """

    def __init__(
        self,
        options: ssl.CertificateOptions,
        check: Callable[[x509.Certificate, int, int, bool], bool],
    ) -> None:
        self._options = options
        self._check = check

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        protocol: TLSMemoryBIOProtocol | None = tlsProtocol

        def callback(
            conn: SSL.Connection, cert: crypto.X509, error: int, depth: int, ok: int
        ) -> bool:
            nonlocal protocol
            try:
                verdict = self._check(cert.to_cryptography(), error, depth, bool(ok))
            except ClusterError:
                if protocol is not None:
                    protocol.failVerification(Failure())
                verdict = False
            except Exception:  # never let an exception escape into OpenSSL
                verdict = False
            if depth == 0 or not verdict:
                protocol = None  # the leaf comes last: no cycle through the connection
            return verdict

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, callback)
        return connection


def _check_names_server(certificate: x509.Certificate, server_id: str) -> None:
    cn = _common_name(certificate.subject)
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        dns_names = set()
    if cn != server_id:
        raise ClusterError(f"the peer's certificate is for server {cn!r}, not {server_id!r}")
    if server_dns_name(server_id).lower() not in dns_names:
        raise ClusterError(
            f"the peer's certificate for {cn!r} lacks the name {server_dns_name(server_id)!r}"
        )


def peer_client_tls_options(
    identity: ClusterIdentity, server_id: str | None = None
) -> IOpenSSLClientConnectionCreator:
    """Client side of a peer connection: mutual TLS under the cluster CA.

    Presents this server's certificate; accepts only a server certificate
    signed by the cluster CA (and valid now, for serverAuth).  The host name
    dialled is NOT checked: peers are reached by IP addresses and remapped
    ports that certificates do not list.  A peer is named by its server id
    instead: with ``server_id``, the certificate must carry CN = server id
    and SAN DNS ``<server-id>.cluster.evserver.invalid``, else the handshake
    fails with a ClusterError saying whose it is.  Without ``server_id``
    (dialling an address whose server is not known yet), the caller compares
    :func:`peer_server_id` with the id the peer claims in its Hello.
    """
    if server_id is not None:
        _validate_server_id(server_id)
    options = ssl.CertificateOptions(
        privateKey=identity.server_key,  # type: ignore[arg-type]
        certificate=identity.server_cert,  # type: ignore[arg-type]
        extraCertChain=[identity.ca_cert],  # type: ignore[list-item]
        verify=True,
        caCerts=[_x509(identity.ca_cert)],
        raiseMinimumTo=MINIMUM_TLS,
    )

    def check(certificate: x509.Certificate, error: int, depth: int, ok: bool) -> bool:
        if ok and depth == 0 and server_id is not None:
            _check_names_server(certificate, server_id)
        return ok

    return _VerifyingClientCreator(options, check)


def pinned_client_tls_options(fingerprint: str) -> IOpenSSLClientConnectionCreator:
    """Client TLS for a joining server: trust the CA whose SHA-256 is ``fingerprint``.

    No client certificate.  OpenSSL verifies the server's chain as usual
    (signatures, validity, CA constraints, serverAuth); the only error
    forgiven is "self-signed certificate in chain" for the certificate whose
    fingerprint is the pinned one, i.e. the chain must end at exactly that
    CA.  Any other server fails the handshake with a ClusterError.
    """
    pinned = fingerprint.lower() if isinstance(fingerprint, str) else ""
    if len(pinned) != 64 or any(c not in "0123456789abcdef" for c in pinned):
        raise ClusterError(f"{fingerprint!r} is not a SHA-256 fingerprint (64 hex digits)")
    options = ssl.CertificateOptions(raiseMinimumTo=MINIMUM_TLS)

    def check(certificate: x509.Certificate, error: int, depth: int, ok: bool) -> bool:
        if not ok:
            if (
                error == _SELF_SIGNED_CERT_IN_CHAIN
                and depth > 0
                and certificate_fingerprint(certificate) == pinned
            ):
                return True
            raise ClusterError(
                "the server's certificate is not issued by the cluster authority "
                f"pinned by the join token (fingerprint {pinned[:16]}...)"
            )
        return True

    return _VerifyingClientCreator(options, check)


# -- after the handshake ------------------------------------------------------------------


def peer_certificate(transport_or_certificate: object) -> x509.Certificate | None:
    """The peer's certificate from a TLS transport (or a certificate itself); None if none."""
    obj = transport_or_certificate
    if isinstance(obj, x509.Certificate):
        return obj
    if isinstance(obj, crypto.X509):
        return obj.to_cryptography()
    get_handle = getattr(obj, "getHandle", None)
    if get_handle is not None:
        try:
            handle = get_handle()
        except Exception:
            handle = None
        if isinstance(handle, SSL.Connection):
            return handle.get_peer_certificate(as_cryptography=True)
    get_peer = getattr(obj, "getPeerCertificate", None)
    if get_peer is None:
        raise TypeError(f"{type(obj).__name__} is neither a TLS transport nor a certificate")
    cert = get_peer()
    if cert is None:
        return None
    return peer_certificate(cert)


def peer_server_id(transport_or_certificate: object) -> str:
    """The server id a peer's certificate names (CN), for checking its Hello.

    Only meaningful after a handshake under :func:`peer_server_tls_options`
    or :func:`peer_client_tls_options`, which verified the certificate.
    ClusterError if there is no certificate or it names no valid server.
    """
    cert = peer_certificate(transport_or_certificate)
    if cert is None:
        raise ClusterError("the peer presented no certificate")
    server_id = _common_name(cert.subject)
    if server_id is None:
        raise ClusterError("the peer's certificate has no single common name")
    _validate_server_id(server_id)
    _check_names_server(cert, server_id)
    return server_id


_TLS_REASONS = (
    (
        "certificate verify failed",
        "the peer's certificate is not valid under this cluster's authority "
        "(a server of another cluster, or an expired certificate)",
    ),
    (
        "alert unknown ca",
        "the peer does not trust this server's certificate (a server of another cluster?)",
    ),
    ("certificate expired", "the peer says this server's certificate has expired"),
    ("bad certificate", "the peer refused this server's certificate"),
    ("unsupported certificate", "the peer refused this server's certificate"),
    ("peer did not return a certificate", "the peer presented no cluster certificate"),
    ("certificate required", "the peer requires a cluster certificate, and this side has none"),
    ("wrong version number", "the peer does not speak TLS (plain text?)"),
    ("http request", "the peer does not speak TLS (plain text?)"),
    ("unsupported protocol", "the peer's TLS version is too old"),
    ("protocol version", "the peer's TLS version is too old"),
)


def describe_tls_failure(reason: Failure | BaseException) -> str:
    """A short explanation, for the log, of why a peer connection's TLS failed.

    Takes the ``connectionLost`` reason: a ClusterError (our own checks)
    gives its message, an ``SSL.Error`` is translated from OpenSSL's words
    (with those words kept in parentheses), anything else is described as
    it is.
    """
    error = reason.value if isinstance(reason, Failure) else reason
    if isinstance(error, ClusterError):
        return str(error)
    if isinstance(error, SSL.Error):
        words = "; ".join(
            str(part[2]) if isinstance(part, tuple) and len(part) == 3 else str(part)
            for part in (error.args[0] if error.args and isinstance(error.args[0], list) else [])
        ) or str(error)
        for needle, text in _TLS_REASONS:
            if needle in words:
                return f"TLS handshake failed: {text} ({words})"
        return f"TLS handshake failed: {words}"
    return f"connection lost: {error}"
