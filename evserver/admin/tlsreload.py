"""Server TLS whose certificate can be replaced without a restart.

:class:`ReloadingTLSOptions` is an ``IOpenSSLServerConnectionCreator`` (what
:func:`evserver.tls.wrap_server_factory` takes) that serves the certificate
and key files it was given and looks at them again at most once every
``check_interval`` seconds, when a new connection arrives.  If either file
changed (size, modification time or inode: an atomic ``os.replace`` counts)
and the pair loads, new connections get the new certificate; connections
already open keep theirs.  A pair that does not load (half written, key not
matching the certificate) is logged once and the previous certificate stays
in use, so a botched replacement never takes the site down.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from evserver.tls import MINIMUM_TLS, certificate_hostnames

log = Logger()

_Signature = tuple[tuple[int, int, int], tuple[int, int, int]]


@attrs.frozen
class CertificateInfo:
    """What an administrator wants to know about the served certificate."""

    path: str
    names: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    sha256: str  # colon-separated upper-case hex, as browsers show it
    self_signed: bool


def certificate_info(cert_path: str | os.PathLike[str]) -> CertificateInfo:
    """Describe the first certificate of a PEM file (raises ValueError or OSError)."""
    pem = Path(cert_path).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return CertificateInfo(
        path=str(cert_path),
        names=tuple(certificate_hostnames(cert_path)),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256=":".join(digest[i : i + 2] for i in range(0, len(digest), 2)),
        self_signed=cert.issuer == cert.subject,
    )


def _stat_signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


def _load_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """CertificateOptions for the pair; raises if they do not load or do not match."""
    pem = cert_path.read_bytes() + b"\n" + key_path.read_bytes()
    private = ssl.PrivateCertificate.loadPEM(pem)
    chain = x509.load_pem_x509_certificates(cert_path.read_bytes())[1:]
    options = ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=[
            ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)).original
            for c in chain
        ],
        raiseMinimumTo=MINIMUM_TLS,
    )
    context = options.getContext()  # builds the context: fails now on a mismatched key
    context.check_privatekey()
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingTLSOptions:
    """Server-side TLS (1.2 or newer) from files that are re-read when they change.

    ``cert_path`` may hold a chain (the server's certificate first).  The
    constructor loads the pair and raises if it cannot.  ``clock`` (default:
    the global reactor) limits how often the files are looked at.
    """

    def __init__(
        self,
        cert_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        clock: IReactorTime | None = None,
        check_interval: float = 2.0,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.cert_path = Path(cert_path)
        self.key_path = Path(key_path)
        self._clock = clock
        self.check_interval = check_interval
        self._signature = self._read_signature()
        self._options = _load_options(self.cert_path, self.key_path)
        self._checked_at = clock.seconds()
        self._failed_signature: _Signature | None = None
        #: How many times a new pair was loaded after the first.
        self.reloads = 0

    def _read_signature(self) -> _Signature:
        return _stat_signature(self.cert_path), _stat_signature(self.key_path)

    def check(self) -> bool:
        """Look at the files now; load them if they changed.  True if reloaded."""
        self._checked_at = self._clock.seconds()
        try:
            signature = self._read_signature()
        except OSError as e:
            if self._failed_signature is None:
                log.warn("TLS certificate files unreadable, keeping the current one: {e}", e=e)
                self._failed_signature = ((0, 0, 0), (0, 0, 0))
            return False
        if signature == self._signature or signature == self._failed_signature:
            return False
        try:
            options = _load_options(self.cert_path, self.key_path)
        except Exception as e:  # any parse or OpenSSL error: keep serving the old pair
            log.warn(
                "new TLS certificate {cert} does not load, keeping the current one: {e}",
                cert=str(self.cert_path),
                e=e,
            )
            self._failed_signature = signature
            return False
        self._options = options
        self._signature = signature
        self._failed_signature = None
        self.reloads += 1
        log.info("TLS certificate {cert} reloaded", cert=str(self.cert_path))
        return True

    def _maybe_check(self) -> None:
        if self._clock.seconds() - self._checked_at >= self.check_interval:
            self.check()

    def getContext(self) -> SSL.Context:
        """The current context (also lets old-style context factory users work)."""
        self._maybe_check()
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)
