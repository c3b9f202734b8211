"""Tests for evserver.tls: certificate files and real TLS handshakes in memory."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim

from evserver import tls


class Recorder(Protocol):
    """Records what it receives; the client sends a greeting, the server echoes it."""

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


def handshake(server_creator, client_creator):
    """Connect a TLS server and client in memory; return their inner protocols."""
    clock = Clock()
    inner_server = Recorder()
    inner_client = Recorder(greeting=b"hello over tls")
    server_factory = tls.wrap_server_factory(
        Factory.forProtocol(lambda: inner_server), server_creator, clock
    )
    client_factory = tls.wrap_client_factory(
        Factory.forProtocol(lambda: inner_client), client_creator, clock
    )
    _client, _server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    assert not clock.getDelayedCalls()
    return inner_server, inner_client


@pytest.fixture(scope="module")
def server_files(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    cert, key = tls.ensure_server_certificate(data_dir, ["localhost", "127.0.0.1", "ev.example"])
    return data_dir, cert, key


def test_files_are_made_with_private_key_mode(server_files) -> None:
    data_dir, cert, key = server_files
    assert cert == data_dir / "tls" / "server.pem"
    assert key == data_dir / "tls" / "server.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data_dir / "tls").st_mode) == 0o700
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert parsed.public_key() == loaded.public_key()


def test_certificate_names_every_host_and_lasts_ten_years(server_files) -> None:
    _data_dir, cert, _key = server_files
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    assert parsed.issuer == parsed.subject
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "ev.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    lifetime = parsed.not_valid_after_utc - parsed.not_valid_before_utc
    assert lifetime >= datetime.timedelta(days=3650)
    assert tls.certificate_hostnames(cert) == ["localhost", "127.0.0.1", "ev.example"]


def test_existing_files_are_reused(server_files) -> None:
    data_dir, cert, key = server_files
    before = (cert.read_bytes(), key.read_bytes())
    again = tls.ensure_server_certificate(data_dir, ["other.example"])
    assert again == (cert, key)
    assert (cert.read_bytes(), key.read_bytes()) == before


def test_a_lone_file_is_replaced_by_a_matching_pair(tmp_path: Path) -> None:
    cert, _key = tls.ensure_server_certificate(tmp_path, ["localhost"])
    old_cert = cert.read_bytes()
    cert.unlink()
    cert2, key2 = tls.ensure_server_certificate(tmp_path, ["localhost"])
    assert cert2.read_bytes() != old_cert
    parsed = x509.load_pem_x509_certificate(cert2.read_bytes())
    loaded = serialization.load_pem_private_key(key2.read_bytes(), password=None)
    assert parsed.public_key() == loaded.public_key()
    assert [p.name for p in (tmp_path / "tls").iterdir()] != []
    assert not [p for p in (tmp_path / "tls").iterdir() if p.name.startswith(".")]


def test_no_hostnames_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one host name"):
        tls.ensure_server_certificate(tmp_path, [])


def test_handshake_with_pinned_certificate(server_files) -> None:
    _data_dir, cert, key = server_files
    server, client = handshake(
        tls.server_tls_options(cert, key), tls.client_tls_options("localhost", cert)
    )
    assert server.received == b"hello over tls"
    assert client.received == b"HELLO OVER TLS"
    assert client.lost is None and server.lost is None


def test_handshake_with_ip_address_name(server_files) -> None:
    _data_dir, cert, key = server_files
    _server, client = handshake(
        tls.server_tls_options(cert, key), tls.client_tls_options("127.0.0.1", cert)
    )
    assert client.received == b"HELLO OVER TLS"


def test_wrong_hostname_is_refused(server_files) -> None:
    _data_dir, cert, key = server_files
    server, client = handshake(
        tls.server_tls_options(cert, key), tls.client_tls_options("evil.example", cert)
    )
    assert server.received == b""
    assert client.received == b""
    assert client.lost is not None


def test_untrusted_certificate_is_refused(server_files, tmp_path: Path) -> None:
    _data_dir, cert, key = server_files
    other_cert, _other_key = tls.ensure_server_certificate(tmp_path, ["localhost"])
    server, client = handshake(
        tls.server_tls_options(cert, key), tls.client_tls_options("localhost", other_cert)
    )
    assert server.received == b""
    assert client.received == b""
    assert client.lost is not None
    assert client.lost.check(SSL.Error)


def test_insecure_client_skips_verification(server_files, tmp_path: Path) -> None:
    _data_dir, cert, key = server_files
    _server, client = handshake(
        tls.server_tls_options(cert, key),
        tls.client_tls_options("evil.example", None, insecure=True),
    )
    assert client.received == b"HELLO OVER TLS"


def test_bundle_with_several_certificates_is_trusted(server_files, tmp_path: Path) -> None:
    _data_dir, cert, key = server_files
    other_cert, _ = tls.ensure_server_certificate(tmp_path, ["x.example"])
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other_cert.read_bytes() + cert.read_bytes())
    _server, client = handshake(
        tls.server_tls_options(cert, key), tls.client_tls_options("localhost", bundle)
    )
    assert client.received == b"HELLO OVER TLS"


def test_server_refuses_tls_older_than_1_2(server_files) -> None:
    _data_dir, cert, key = server_files

    class OldClient:
        """A client connection creator limited to TLS 1.1, verifying nothing."""

        def clientConnectionForTLS(self, tlsProtocol):
            ctx = SSL.Context(SSL.TLS_METHOD)
            ctx.set_min_proto_version(SSL.TLS1_VERSION)
            ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
            ctx.set_cipher_list(b"ALL:@SECLEVEL=0")
            conn = SSL.Connection(ctx, None)
            conn.set_app_data(tlsProtocol)
            conn.set_connect_state()
            return conn

    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
    from zope.interface import directlyProvides

    old = OldClient()
    directlyProvides(old, IOpenSSLClientConnectionCreator)
    server, client = handshake(tls.server_tls_options(cert, key), old)
    assert server.received == b""
    assert client.received == b""
    assert client.lost is not None


def test_creators_provide_the_connection_creator_interfaces(server_files) -> None:
    from twisted.internet.interfaces import (
        IOpenSSLClientConnectionCreator,
        IOpenSSLServerConnectionCreator,
    )

    _data_dir, cert, key = server_files
    assert IOpenSSLServerConnectionCreator.providedBy(tls.server_tls_options(cert, key))
    for creator in (
        tls.client_tls_options("localhost", cert),
        tls.client_tls_options("localhost", None, insecure=True),
    ):
        assert IOpenSSLClientConnectionCreator.providedBy(creator)


def test_mismatched_key_is_refused(server_files, tmp_path: Path) -> None:
    _data_dir, cert, _key = server_files
    _other_cert, other_key = tls.ensure_server_certificate(tmp_path, ["localhost"])
    with pytest.raises(ValueError, match="is not the key of"):
        tls.server_tls_options(cert, other_key)
