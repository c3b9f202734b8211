"""The cluster CA: identity files, certificate contents, real mutual-TLS handshakes in memory."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim

from evserver import tls
from evserver.cluster import ca
from evserver.cluster.ca import ClusterError, ClusterIdentity

NOW = 1_700_000_000  # a fixed instant for certificate contents
DAY = datetime.timedelta(days=1)


def utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def same_key(a: ec.EllipticCurvePrivateKey | None, b: ec.EllipticCurvePrivateKey | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.public_key() == b.public_key() and a.private_numbers() == b.private_numbers()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_a(tmp_path_factory: pytest.TempPathFactory) -> ClusterIdentity:
    """A cluster made now (handshakes check validity against the real clock)."""
    data = tmp_path_factory.mktemp("a1")
    return ca.create_cluster(data, "a1", ["10.0.0.1", "a1.example"], time.time)


@pytest.fixture(scope="module")
def member_a2(
    tmp_path_factory: pytest.TempPathFactory, cluster_a: ClusterIdentity
) -> ClusterIdentity:
    """A second member of cluster A, joined by CSR and without the CA key."""
    data = tmp_path_factory.mktemp("a2")
    key, csr = ca.make_csr("a2", ["10.0.0.2"])
    cert = ca.sign_csr(cluster_a, csr, "a2", ["10.0.0.2"], time.time())
    return ca.install_membership(data, cluster_a.cluster_id, cluster_a.ca_cert, None, key, cert)


@pytest.fixture(scope="module")
def cluster_b(tmp_path_factory: pytest.TempPathFactory) -> ClusterIdentity:
    """Another cluster, with its own CA."""
    return ca.create_cluster(tmp_path_factory.mktemp("b1"), "b1", ["10.0.1.1"], time.time)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ClusterIdentity]:
    """A cluster made at NOW, for inspecting files and certificate contents."""
    data = tmp_path_factory.mktemp("fixed")
    identity = ca.create_cluster(data, "srv-1", ["192.0.2.7", "ev.example", "2001:db8::1"], NOW)
    return data, identity


# -- identity files ------------------------------------------------------------------------


def test_create_cluster_writes_the_identity_with_private_modes(
    fixed: tuple[Path, ClusterIdentity],
) -> None:
    data, identity = fixed
    directory = data / "cluster"
    assert sorted(p.name for p in directory.iterdir()) == [
        "ca.key",
        "ca.pem",
        "cluster-id",
        "server.key",
        "server.pem",
    ]
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # no temporary left
    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600
    assert mode(directory / "server.key") == 0o600
    assert mode(directory / "ca.pem") == 0o644
    assert (directory / "cluster-id").read_text() == identity.cluster_id + "\n"
    assert identity.server_id == "srv-1"
    assert identity.ca_key is not None
    assert (directory / "ca.pem").read_bytes() == ca.certificate_pem(identity.ca_cert)
    assert ca.load_private_key_pem((directory / "server.key").read_bytes()).public_key() == (
        identity.server_cert.public_key()
    )


def test_the_modes_hold_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        ca.create_cluster(tmp_path, "s", [], NOW)
    finally:
        os.umask(old)
    assert mode(tmp_path / "cluster" / "ca.pem") == 0o644
    assert mode(tmp_path / "cluster" / "server.key") == 0o600


def test_ca_certificate_is_a_ten_year_p256_authority(fixed: tuple[Path, ClusterIdentity]) -> None:
    _data, identity = fixed
    cert = identity.ca_cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert cert.subject == cert.issuer
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == f"evserver cluster {identity.cluster_id}"
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert cert.not_valid_after_utc == utc(NOW) + datetime.timedelta(days=3650)
    assert cert.not_valid_before_utc == utc(NOW) - DAY
    assert identity.fingerprint() == cert.fingerprint(hashes.SHA256()).hex()
    assert len(identity.fingerprint()) == 64


def test_server_certificate_names_the_server_for_two_years(
    fixed: tuple[Path, ClusterIdentity],
) -> None:
    _data, identity = fixed
    cert = identity.server_cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "srv-1"
    assert cert.issuer == identity.ca_cert.subject
    cert.verify_directly_issued_by(identity.ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "srv-1.cluster.evserver.invalid",
        "ev.example",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.7"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = identity.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.not_valid_after_utc == utc(NOW) + datetime.timedelta(days=730)
    assert cert.not_valid_before_utc == utc(NOW) - DAY


def test_time_may_be_a_clock(tmp_path: Path) -> None:
    identity = ca.create_cluster(tmp_path, "s", [], lambda: NOW + 0.5)
    assert identity.ca_cert.not_valid_before_utc == utc(NOW) - DAY


def test_two_clusters_are_different(fixed: tuple[Path, ClusterIdentity], tmp_path: Path) -> None:
    _data, first = fixed
    second = ca.create_cluster(tmp_path, "srv-1", [], NOW)
    assert second.cluster_id != first.cluster_id
    assert second.fingerprint() != first.fingerprint()


def test_create_refuses_an_existing_identity(fixed: tuple[Path, ClusterIdentity]) -> None:
    data, identity = fixed
    before = {p.name: p.read_bytes() for p in (data / "cluster").iterdir()}
    with pytest.raises(
        ClusterError, match=f"already holds a cluster identity of cluster {identity.cluster_id}"
    ):
        ca.create_cluster(data, "srv-1", [], NOW)
    assert {p.name: p.read_bytes() for p in (data / "cluster").iterdir()} == before
    assert not [p for p in data.iterdir() if p.name.startswith(".")]


def test_create_refuses_a_half_written_directory(tmp_path: Path) -> None:
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "ca.pem").write_bytes(b"junk")
    with pytest.raises(ClusterError, match="already holds a cluster identity"):
        ca.create_cluster(tmp_path, "s", [], NOW)
    assert [p.name for p in (tmp_path / "cluster").iterdir()] == ["ca.pem"]


def test_create_fills_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "cluster").mkdir()
    identity = ca.create_cluster(tmp_path, "s", [], NOW)
    loaded = ca.load_identity(tmp_path)
    assert loaded == identity


def test_create_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "cluster").write_text("not a directory")
    with pytest.raises(ClusterError, match="already holds"):
        ca.create_cluster(tmp_path, "s", [], NOW)


def test_create_needs_the_data_directory(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="does not exist"):
        ca.create_cluster(tmp_path / "missing", "s", [], NOW)


@pytest.mark.parametrize(
    ("server_id", "hostnames", "message"),
    [
        ("", [], "server id '' is invalid"),
        ("a b", [], "server id 'a b' is invalid"),
        ("x" * 65, [], "is invalid"),
        ("ok", ["bad host!"], "neither an IP address nor a valid host name"),
        ("ok", [""], "must not be empty"),
    ],
)
def test_create_refuses_bad_names_and_writes_nothing(
    tmp_path: Path, server_id: str, hostnames: list[str], message: str
) -> None:
    with pytest.raises(ClusterError, match=message):
        ca.create_cluster(tmp_path, server_id, hostnames, NOW)
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_a_time_that_is_not_a_number(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Unix seconds"):
        ca.create_cluster(tmp_path, "s", [], float("nan"))


# -- loading -------------------------------------------------------------------------------


def test_load_identity_reads_back_what_was_created(fixed: tuple[Path, ClusterIdentity]) -> None:
    data, identity = fixed
    loaded = ca.load_identity(data)
    assert loaded == identity
    assert loaded is not None
    assert same_key(loaded.ca_key, identity.ca_key)
    assert same_key(loaded.server_key, identity.server_key)
    assert ca.load_identity(data, server_id="srv-1") == identity


def test_load_identity_is_none_for_a_standalone_server(tmp_path: Path) -> None:
    assert ca.load_identity(tmp_path) is None
    (tmp_path / "cluster").mkdir()
    assert ca.load_identity(tmp_path) is None


def copy_identity(source: Path, target: Path) -> Path:
    (target / "cluster").mkdir(mode=0o700)
    for p in (source / "cluster").iterdir():
        (target / "cluster" / p.name).write_bytes(p.read_bytes())
    return target / "cluster"


def test_load_identity_without_the_ca_key(
    fixed: tuple[Path, ClusterIdentity], tmp_path: Path
) -> None:
    data, identity = fixed
    directory = copy_identity(data, tmp_path)
    (directory / "ca.key").unlink()
    loaded = ca.load_identity(tmp_path)
    assert loaded is not None and loaded.ca_key is None
    assert loaded == identity


def _other_cluster(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    other.mkdir()
    ca.create_cluster(other, "srv-1", [], NOW)
    return other / "cluster"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d, o: (d / "server.key").unlink(), r"incomplete \(missing server.key\)"),
        (
            lambda d, o: [(d / n).unlink() for n in ("cluster-id", "server.pem")],
            r"incomplete \(missing cluster-id, server.pem\)",
        ),
        (lambda d, o: (d / "ca.pem").write_bytes(b"junk"), "ca.pem is not a PEM certificate"),
        (lambda d, o: (d / "server.key").write_bytes(b""), "server.key is not an unencrypted PEM"),
        (
            lambda d, o: (d / "server.key").write_bytes((o / "server.key").read_bytes()),
            "the server key does not match the server certificate",
        ),
        (
            lambda d, o: (d / "ca.key").write_bytes((o / "ca.key").read_bytes()),
            "the CA key does not match the CA certificate",
        ),
        (
            lambda d, o: [
                (d / n).write_bytes((o / n).read_bytes()) for n in ("server.pem", "server.key")
            ],
            "the server certificate is not signed by the cluster CA",
        ),
        (
            lambda d, o: [(d / n).write_bytes((o / n).read_bytes()) for n in ("ca.pem", "ca.key")],
            "is not the authority of cluster",
        ),
        (
            lambda d, o: (d / "cluster-id").write_bytes((o / "cluster-id").read_bytes()),
            "is not the authority of cluster",
        ),
        (lambda d, o: (d / "cluster-id").write_text("nope\n"), "is not a lowercase UUID"),
        (lambda d, o: (d / "cluster-id").write_bytes(b"\xff\n"), "does not hold a cluster id"),
        (
            lambda d, o: (d / "server.pem").write_bytes((d / "ca.pem").read_bytes()),
            "inconsistent",
        ),
        (
            lambda d, o: (d / "ca.key").write_bytes(
                rsa.generate_private_key(65537, 2048).private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            ),
            "must be an EC P-256 or P-384 key",
        ),
    ],
)
def test_load_identity_reports_what_is_wrong(
    fixed: tuple[Path, ClusterIdentity], tmp_path: Path, damage, message: str
) -> None:
    data, _identity = fixed
    directory = copy_identity(data, tmp_path)
    damage(directory, _other_cluster(tmp_path))
    with pytest.raises(ClusterError, match=message) as info:
        ca.load_identity(tmp_path)
    assert str(directory) in str(info.value)


def test_load_identity_refuses_another_servers_identity(
    fixed: tuple[Path, ClusterIdentity],
) -> None:
    data, _identity = fixed
    with pytest.raises(ClusterError, match=r"belongs to server 'srv-1'.*id is 'srv-2'"):
        ca.load_identity(data, server_id="srv-2")


def test_load_identity_refuses_a_file_instead_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "cluster").write_text("x")
    with pytest.raises(ClusterError, match="is not a directory"):
        ca.load_identity(tmp_path)


def test_identity_is_consistent_by_construction(
    cluster_a: ClusterIdentity, cluster_b: ClusterIdentity
) -> None:
    a = cluster_a
    with pytest.raises(ClusterError, match="names server 'a1', not 'a9'"):
        ClusterIdentity(a.cluster_id, a.ca_cert, a.ca_key, a.server_cert, a.server_key, "a9")
    with pytest.raises(ClusterError, match="not signed by the cluster CA"):
        ClusterIdentity(
            a.cluster_id, a.ca_cert, a.ca_key, cluster_b.server_cert, cluster_b.server_key, "b1"
        )
    with pytest.raises(ClusterError, match="not a self-signed certificate authority"):
        ClusterIdentity(a.cluster_id, a.server_cert, None, a.server_cert, a.server_key, a.server_id)


# -- joining -------------------------------------------------------------------------------


def test_a_joining_server_gets_a_certificate_of_the_cluster(
    fixed: tuple[Path, ClusterIdentity], tmp_path: Path
) -> None:
    _data, identity = fixed
    key, csr = ca.make_csr("srv-2", ["198.51.100.4"])
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "srv-2"
    cert = ca.sign_csr(identity, csr, "srv-2", ["198.51.100.9", "two.example"], NOW + 100)
    cert.verify_directly_issued_by(identity.ca_cert)
    assert cert.public_key() == key.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The signer's names win over the request's.
    assert san.get_values_for_type(x509.DNSName) == [
        "srv-2.cluster.evserver.invalid",
        "two.example",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.51.100.9")]
    assert cert.not_valid_after_utc == utc(NOW + 100) + datetime.timedelta(days=730)

    joined = ca.install_membership(
        tmp_path, identity.cluster_id, identity.ca_cert, identity.ca_key, key, cert
    )
    assert joined.server_id == "srv-2"
    assert joined.fingerprint() == identity.fingerprint()
    assert mode(tmp_path / "cluster" / "ca.key") == 0o600
    assert mode(tmp_path / "cluster" / "server.key") == 0o600
    assert ca.load_identity(tmp_path) == joined


def test_sign_csr_refuses_a_request_for_another_name(fixed: tuple[Path, ClusterIdentity]) -> None:
    _data, identity = fixed
    _key, csr = ca.make_csr("srv-2", [])
    with pytest.raises(ClusterError, match="request is for 'srv-2', not server 'srv-3'"):
        ca.sign_csr(identity, csr, "srv-3", [], NOW)


def test_sign_csr_refuses_the_signers_own_id(fixed: tuple[Path, ClusterIdentity]) -> None:
    _data, identity = fixed
    _key, csr = ca.make_csr("srv-1", [])
    with pytest.raises(ClusterError, match="this server's own"):
        ca.sign_csr(identity, csr, "srv-1", [], NOW)


def test_sign_csr_needs_the_ca_key(member_a2: ClusterIdentity) -> None:
    assert member_a2.ca_key is None
    _key, csr = ca.make_csr("a3", [])
    with pytest.raises(ClusterError, match="does not hold the cluster CA key"):
        ca.sign_csr(member_a2, csr, "a3", [], time.time())


def test_sign_csr_refuses_a_forged_request(fixed: tuple[Path, ClusterIdentity]) -> None:
    _data, identity = fixed
    _key, csr = ca.make_csr("srv-2", [])
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # damage the signature
    forged = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(ClusterError, match="signature is invalid"):
        ca.sign_csr(identity, forged, "srv-2", [], NOW)


def test_sign_csr_refuses_an_rsa_key(fixed: tuple[Path, ClusterIdentity]) -> None:
    _data, identity = fixed
    key = rsa.generate_private_key(65537, 2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "srv-2")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ClusterError, match="EC P-256 or P-384"):
        ca.sign_csr(identity, csr, "srv-2", [], NOW)


def test_certificates_never_outlive_their_authority(fixed: tuple[Path, ClusterIdentity]) -> None:
    _data, identity = fixed
    _key, csr = ca.make_csr("late", [])
    late = NOW + 3600 * 24 * 3600  # 100 days before the CA expires
    cert = ca.sign_csr(identity, csr, "late", [], late)
    assert cert.not_valid_after_utc == identity.ca_cert.not_valid_after_utc
    with pytest.raises(ClusterError, match="CA certificate has expired"):
        ca.sign_csr(identity, csr, "late", [], NOW + 3651 * 86400)


def test_install_membership_refuses_inconsistent_material(
    cluster_a: ClusterIdentity, cluster_b: ClusterIdentity, tmp_path: Path
) -> None:
    key, csr = ca.make_csr("x", [])
    cert = ca.sign_csr(cluster_a, csr, "x", [], time.time())
    with pytest.raises(ClusterError, match="not signed by the cluster CA"):
        ca.install_membership(tmp_path, cluster_b.cluster_id, cluster_b.ca_cert, None, key, cert)
    with pytest.raises(ClusterError, match="server key does not match"):
        ca.install_membership(
            tmp_path, cluster_a.cluster_id, cluster_a.ca_cert, None, cluster_a.server_key, cert
        )
    with pytest.raises(ClusterError, match="not the authority of cluster"):
        ca.install_membership(tmp_path, cluster_b.cluster_id, cluster_a.ca_cert, None, key, cert)
    assert list(tmp_path.iterdir()) == []
    ca.install_membership(tmp_path, cluster_a.cluster_id, cluster_a.ca_cert, None, key, cert)
    with pytest.raises(ClusterError, match="already holds a cluster identity"):
        ca.install_membership(tmp_path, cluster_a.cluster_id, cluster_a.ca_cert, None, key, cert)


def test_pem_helpers_report_garbage() -> None:
    with pytest.raises(ClusterError, match="the CA is not a PEM certificate"):
        ca.load_certificate_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n", "the CA")
    with pytest.raises(ClusterError, match="k is not an unencrypted PEM private key"):
        ca.load_private_key_pem(b"nope", "k")


# -- handshakes ----------------------------------------------------------------------------


class Recorder(Protocol):
    """The client sends a greeting; the server echoes it upper-cased."""

    def __init__(self, greeting: bytes | None = None) -> None:
        self.greeting = greeting
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        if self.greeting is not None:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.greeting is None:
            self.transport.write(data.upper())

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


def handshake(server_creator, client_creator) -> tuple[Recorder, Recorder]:
    """Connect a TLS server and client in memory; return their inner protocols."""
    clock = Clock()
    server = Recorder()
    client = Recorder(greeting=b"hello peer")
    server_factory = tls.wrap_server_factory(
        Factory.forProtocol(lambda: server), server_creator, clock
    )
    client_factory = tls.wrap_client_factory(
        Factory.forProtocol(lambda: client), client_creator, clock
    )
    _c, _s, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    assert not clock.getDelayedCalls()
    return server, client


def assert_connected(server: Recorder, client: Recorder) -> None:
    assert server.received == b"hello peer"
    assert client.received == b"HELLO PEER"
    assert server.lost is None and client.lost is None


def assert_refused(server: Recorder, client: Recorder) -> None:
    assert server.received == b""
    assert client.received == b""
    assert server.lost is not None and client.lost is not None


def ssl_reason(lost: Failure | None) -> str:
    assert lost is not None and lost.check(SSL.Error), lost
    return str(lost.value)


def test_two_servers_of_one_cluster_connect(
    cluster_a: ClusterIdentity, member_a2: ClusterIdentity
) -> None:
    server, client = handshake(
        ca.peer_server_tls_options(cluster_a), ca.peer_client_tls_options(member_a2)
    )
    assert_connected(server, client)
    # Each side learns who the other is from its certificate.
    assert ca.peer_server_id(server.transport) == "a2"
    assert ca.peer_server_id(client.transport) == "a1"
    # And the other way round.
    server, client = handshake(
        ca.peer_server_tls_options(member_a2), ca.peer_client_tls_options(cluster_a, "a2")
    )
    assert_connected(server, client)
    assert ca.peer_server_id(server.transport) == "a1"


def test_client_naming_the_expected_server(
    cluster_a: ClusterIdentity, member_a2: ClusterIdentity
) -> None:
    server, client = handshake(
        ca.peer_server_tls_options(cluster_a), ca.peer_client_tls_options(member_a2, "a1")
    )
    assert_connected(server, client)
    server, client = handshake(
        ca.peer_server_tls_options(cluster_a), ca.peer_client_tls_options(member_a2, "a3")
    )
    assert_refused(server, client)
    assert client.lost is not None and client.lost.check(ClusterError)
    assert ca.describe_tls_failure(client.lost) == (
        "the peer's certificate is for server 'a1', not 'a3'"
    )


def test_a_server_of_another_cluster_is_refused(
    cluster_a: ClusterIdentity, cluster_b: ClusterIdentity
) -> None:
    server, client = handshake(
        ca.peer_server_tls_options(cluster_a), ca.peer_client_tls_options(cluster_b)
    )
    assert_refused(server, client)
    assert "certificate verify failed" in ssl_reason(client.lost)
    assert "unknown ca" in ssl_reason(server.lost)
    assert "not valid under this cluster's authority" in ca.describe_tls_failure(client.lost)
    assert "another cluster" in ca.describe_tls_failure(server.lost)


def test_the_peer_server_refuses_another_clusters_certificate_on_its_own(
    cluster_a: ClusterIdentity, cluster_b: ClusterIdentity
) -> None:
    """Even a client that checks nothing cannot get in with a foreign certificate."""
    careless = ssl.CertificateOptions(
        privateKey=cluster_b.server_key,  # type: ignore[arg-type]
        certificate=cluster_b.server_cert,  # type: ignore[arg-type]
        verify=False,
    )
    server, client = handshake(ca.peer_server_tls_options(cluster_a), careless)
    assert_refused(server, client)
    assert "certificate verify failed" in ssl_reason(server.lost)
    # With joiners allowed, a foreign certificate is still refused.
    server, client = handshake(ca.peer_server_tls_options(cluster_a, allow_joiners=True), careless)
    assert_refused(server, client)
    assert "certificate verify failed" in ssl_reason(server.lost)


def test_the_peer_client_refuses_another_clusters_server_on_its_own(
    cluster_a: ClusterIdentity, cluster_b: ClusterIdentity
) -> None:
    """A server that asks for no client certificate still cannot pass as a peer."""
    lenient = ssl.CertificateOptions(
        privateKey=cluster_b.server_key,  # type: ignore[arg-type]
        certificate=cluster_b.server_cert,  # type: ignore[arg-type]
    )
    server, client = handshake(lenient, ca.peer_client_tls_options(cluster_a))
    assert_refused(server, client)
    assert "certificate verify failed" in ssl_reason(client.lost)


def test_a_client_without_certificate_is_refused(cluster_a: ClusterIdentity) -> None:
    anonymous = ssl.CertificateOptions(verify=False)
    server, client = handshake(ca.peer_server_tls_options(cluster_a), anonymous)
    assert_refused(server, client)
    assert "peer did not return a certificate" in ssl_reason(server.lost)
    assert ca.describe_tls_failure(server.lost).startswith(
        "TLS handshake failed: the peer presented no cluster certificate"
    )


def test_a_certificate_signed_by_a_member_is_refused(cluster_a: ClusterIdentity) -> None:
    """A member's own certificate is no authority (BasicConstraints CA false)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")]))
        .issuer_name(cluster_a.server_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + DAY)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("intruder.cluster.evserver.invalid")]),
            False,
        )
        .sign(cluster_a.server_key, hashes.SHA256())
    )
    intruder = ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=forged,  # type: ignore[arg-type]
        extraCertChain=[cluster_a.server_cert, cluster_a.ca_cert],  # type: ignore[list-item]
        verify=False,
    )
    server, client = handshake(ca.peer_server_tls_options(cluster_a), intruder)
    assert_refused(server, client)
    assert "certificate verify failed" in ssl_reason(server.lost)


def test_an_expired_server_certificate_is_refused(
    cluster_a: ClusterIdentity, tmp_path: Path
) -> None:
    three_years_ago = time.time() - 3 * 365 * 86400
    key, csr = ca.make_csr("old", [])
    old_cert = ca.sign_csr(cluster_a, csr, "old", [], three_years_ago)
    old = ca.install_membership(
        tmp_path, cluster_a.cluster_id, cluster_a.ca_cert, None, key, old_cert
    )
    server, client = handshake(
        ca.peer_server_tls_options(old), ca.peer_client_tls_options(cluster_a)
    )
    assert_refused(server, client)
    assert "certificate verify failed" in ssl_reason(client.lost)
    server, client = handshake(
        ca.peer_server_tls_options(cluster_a), ca.peer_client_tls_options(old)
    )
    assert_refused(server, client)
    assert "certificate verify failed" in ssl_reason(server.lost)


def test_joiners_may_connect_without_a_certificate_when_allowed(
    cluster_a: ClusterIdentity, member_a2: ClusterIdentity
) -> None:
    server, client = handshake(
        ca.peer_server_tls_options(cluster_a, allow_joiners=True),
        ca.pinned_client_tls_options(cluster_a.fingerprint()),
    )
    assert_connected(server, client)
    assert ca.peer_certificate(server.transport) is None
    with pytest.raises(ClusterError, match="presented no certificate"):
        ca.peer_server_id(server.transport)
    assert ca.peer_server_id(client.transport) == "a1"
    # A member still connects to the same options with its certificate.
    server, client = handshake(
        ca.peer_server_tls_options(cluster_a, allow_joiners=True),
        ca.peer_client_tls_options(member_a2),
    )
    assert_connected(server, client)
    assert ca.peer_server_id(server.transport) == "a2"


def test_a_pinned_joiner_is_refused_by_a_server_that_requires_certificates(
    cluster_a: ClusterIdentity,
) -> None:
    server, client = handshake(
        ca.peer_server_tls_options(cluster_a),
        ca.pinned_client_tls_options(cluster_a.fingerprint()),
    )
    assert_refused(server, client)


def test_a_pinned_joiner_connects_only_to_the_pinned_cluster(
    cluster_a: ClusterIdentity, cluster_b: ClusterIdentity, member_a2: ClusterIdentity
) -> None:
    # Any member of the pinned cluster will do, also one without the CA key.
    server, client = handshake(
        ca.peer_server_tls_options(member_a2, allow_joiners=True),
        ca.pinned_client_tls_options(cluster_a.fingerprint().upper()),
    )
    assert_connected(server, client)
    server, client = handshake(
        ca.peer_server_tls_options(cluster_b, allow_joiners=True),
        ca.pinned_client_tls_options(cluster_a.fingerprint()),
    )
    assert_refused(server, client)
    assert client.lost is not None and client.lost.check(ClusterError)
    assert "not issued by the cluster authority pinned by the join token" in (
        ca.describe_tls_failure(client.lost)
    )


def test_a_pinned_joiner_needs_the_chain_to_end_at_the_pinned_ca(
    cluster_a: ClusterIdentity,
) -> None:
    # The server certificate alone, without the CA: nothing to pin.
    bare = ssl.CertificateOptions(
        privateKey=cluster_a.server_key,  # type: ignore[arg-type]
        certificate=cluster_a.server_cert,  # type: ignore[arg-type]
    )
    server, client = handshake(bare, ca.pinned_client_tls_options(cluster_a.fingerprint()))
    assert_refused(server, client)
    assert client.lost is not None and client.lost.check(ClusterError)
    # Pinning a member's own certificate is not pinning an authority.
    server, client = handshake(
        bare, ca.pinned_client_tls_options(ca.certificate_fingerprint(cluster_a.server_cert))
    )
    assert_refused(server, client)


def test_a_pinned_joiner_refuses_a_forgery_shown_with_the_real_ca(
    cluster_a: ClusterIdentity,
) -> None:
    """A certificate claiming the pinned CA as issuer, signed by another key."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_ski = cluster_a.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a1")]))
        .issuer_name(cluster_a.ca_cert.subject)
        .public_key(attacker.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + DAY)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value), False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(attacker, hashes.SHA256())
    )
    impostor = ssl.CertificateOptions(
        privateKey=attacker,  # type: ignore[arg-type]
        certificate=forged,  # type: ignore[arg-type]
        extraCertChain=[cluster_a.ca_cert],  # type: ignore[list-item]
    )
    server, client = handshake(impostor, ca.pinned_client_tls_options(cluster_a.fingerprint()))
    assert_refused(server, client)
    assert client.lost is not None and client.lost.check(ClusterError)


def test_pinned_options_need_a_fingerprint() -> None:
    for bad in ("", "abc", "g" * 64, "a" * 63, "a" * 65):
        with pytest.raises(ClusterError, match="not a SHA-256 fingerprint"):
            ca.pinned_client_tls_options(bad)


def test_a_plain_text_peer_fails_the_handshake(cluster_a: ClusterIdentity) -> None:
    clock = Clock()
    server = Recorder()
    factory = tls.wrap_server_factory(
        Factory.forProtocol(lambda: server), ca.peer_server_tls_options(cluster_a), clock
    )
    plain = Recorder(greeting=b"EVSP\x00\x01 peer hello in plain text\r\n")
    _c, _s, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(None), lambda: plain, clock=clock
    )
    pump.flush()
    assert server.received == b""
    assert "does not speak TLS" in ca.describe_tls_failure(server.lost)  # type: ignore[arg-type]


def test_the_creators_provide_the_connection_creator_interfaces(
    cluster_a: ClusterIdentity,
) -> None:
    from twisted.internet.interfaces import (
        IOpenSSLClientConnectionCreator,
        IOpenSSLServerConnectionCreator,
    )

    assert IOpenSSLServerConnectionCreator.providedBy(ca.peer_server_tls_options(cluster_a))
    assert IOpenSSLClientConnectionCreator.providedBy(ca.peer_client_tls_options(cluster_a))
    assert IOpenSSLClientConnectionCreator.providedBy(
        ca.pinned_client_tls_options(cluster_a.fingerprint())
    )


# -- peer ids ------------------------------------------------------------------------------


def test_peer_server_id_from_certificates(cluster_a: ClusterIdentity) -> None:
    assert ca.peer_server_id(cluster_a.server_cert) == "a1"
    assert ca.peer_server_id(crypto.X509.from_cryptography(cluster_a.server_cert)) == "a1"
    with pytest.raises(ClusterError, match=r"server id 'evserver cluster .*' is invalid"):
        ca.peer_server_id(cluster_a.ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    no_san = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a1")]))
        .issuer_name(cluster_a.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + DAY)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ClusterError, match=r"for 'a1' lacks the name 'a1\.cluster\.evserver"):
        ca.peer_server_id(no_san)
    with pytest.raises(TypeError):
        ca.peer_server_id(object())


def test_describe_tls_failure_of_other_errors() -> None:
    assert ca.describe_tls_failure(ClusterError("x")) == "x"
    assert ca.describe_tls_failure(SSL.Error([("SSL routines", "", "odd thing")])) == (
        "TLS handshake failed: odd thing"
    )
    assert ca.describe_tls_failure(Failure(ConnectionResetError("reset"))).startswith(
        "connection lost: "
    )


def test_create_loses_a_race_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process creates DATA/cluster between the check and the rename."""
    real_fsync_dir = ca._fsync_dir

    def meddle(path: Path) -> None:
        if path.name.endswith(".tmp") and not (tmp_path / "cluster").exists():
            (tmp_path / "cluster").mkdir()
            (tmp_path / "cluster" / "cluster-id").write_text("winner\n")
        real_fsync_dir(path)

    monkeypatch.setattr(ca, "_fsync_dir", meddle)
    with pytest.raises(ClusterError, match="already holds a cluster identity of cluster winner"):
        ca.create_cluster(tmp_path, "s", [], NOW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster"]
    assert [p.name for p in (tmp_path / "cluster").iterdir()] == ["cluster-id"]


def test_create_reports_a_failed_write_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    def full_disk(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # the third file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ca.os, "fsync", full_disk)
    with pytest.raises(ClusterError, match=r"cannot write .*No space left on device"):
        ca.create_cluster(tmp_path, "s", [], NOW)
    assert list(tmp_path.iterdir()) == []
