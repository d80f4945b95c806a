"""TLS to glusterd and to the bricks, set up as gluster's socket transport sets up OpenSSL.

Two paths, switched on separately, as in gluster:

* **I/O path** (client ↔ brick): on when the volfile's ``protocol/client`` carries
  ``transport.socket.ssl-enabled on`` (``gluster volume set V client.ssl on``). The same xlator may name
  ``transport.socket.ssl-own-cert``, ``-private-key``, ``-ca-list``, ``-crl-path``, ``-cert-depth`` and
  ``-cipher-list`` (``volume set V ssl.own-cert …``, ``ssl.certificate-depth``, ``ssl.cipher-list``…).
* **management path** (client ↔ glusterd on 24007: GETSPEC, PORTBYBRICK, the volfile watcher): on when
  ``/var/lib/glusterd/secure-access`` exists on this node (gluster's clients look for the same file), or
  with the mount option ``secure-mgmt=yes``. Its certificate depth is the ``option
  transport.socket.ssl-cert-depth N`` line of that file (default 1) — and, as in gluster, that depth then
  applies to the brick connections too.

What every TLS connection does (gluster's ``ssl_setup_connection_params``): our certificate chain and key
(``glusterfs.pem``, ``glusterfs.key``) are presented, the peer's certificate must verify against the CA
list (``glusterfs.ca``, plus the CRL directory if one is given, checked for the whole chain) with at most
``depth`` intermediate certificates; its name is *not* checked (gluster identifies clients and servers by
the CA and, on the brick, by the certificate's CN against ``auth.ssl-allow``); the TLS 1.2 cipher list is
``ssl.cipher-list`` (default gluster's ``AES128:EECDH:EDH:HIGH:!3DES:!RC4:!DES:!MD5:!aNULL:!eNULL``); no
session tickets, no compression. TLS 1.3 suites are OpenSSL's defaults (gluster does not set them either).
Python's ``ssl`` module does the cryptography; trio's ``SSLStream`` carries it (see
:mod:`gfuse.transport`).

Where the files are (node admin's choice, mount options parsed in :mod:`gfuse.options`): ``ssl-cert=``,
``ssl-key=``, ``ssl-ca=`` name each file; ``ssl-dir=DIR`` means ``DIR/glusterfs.{pem,key,ca}``; both win
over the volfile's paths, which win over OpenSSL's directory (``/usr/lib/ssl`` on Debian, where Debian's
glusterfs looks; upstream builds of glusterfs use ``/etc/ssl``: say ``ssl-dir=/etc/ssl`` there).

A volume or glusterd that asks for TLS is never spoken to in plain text: without usable files the
connection is refused with one line (:class:`TlsError`) naming the file and the options.
"""

from __future__ import annotations

import errno
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import MountOptions
    from .volfile import Graph

#: OpenSSL's directory as Python's OpenSSL sees it (``OPENSSLDIR``), where gluster's build looks too
OPENSSL_DIR = os.path.dirname(ssl.get_default_verify_paths().openssl_cafile or "") or "/usr/lib/ssl"
#: gluster's clients turn on management TLS when this file exists (``SECURE_ACCESS_FILE``)
SECURE_ACCESS_FILE = "/var/lib/glusterd/secure-access"
CERT_FILE, KEY_FILE, CA_FILE = "glusterfs.pem", "glusterfs.key", "glusterfs.ca"
#: gluster's socket.c defaults
DEFAULT_CIPHER_LIST = "AES128:EECDH:EDH:HIGH:!3DES:!RC4:!DES:!MD5:!aNULL:!eNULL"
DEFAULT_CERT_DEPTH = 1

#: ``protocol/client`` options glusterd's volgen writes (``client.ssl``, ``ssl.*`` volume options)
OPT_ENABLED = "transport.socket.ssl-enabled"
OPT_CERT = "transport.socket.ssl-own-cert"
OPT_KEY = "transport.socket.ssl-private-key"
OPT_CA = "transport.socket.ssl-ca-list"
OPT_CRL = "transport.socket.ssl-crl-path"
OPT_DEPTH = "transport.socket.ssl-cert-depth"
OPT_CIPHERS = "transport.socket.ssl-cipher-list"

_TRUE = frozenset({"on", "yes", "true", "enable", "enabled", "1"})
_DEPTH_LINE = re.compile(r"^option transport\.socket\.ssl-cert-depth")
#: mount options that choose the files, named in error messages
PATH_OPTIONS = "ssl-dir=, or ssl-cert=, ssl-key=, ssl-ca="


class TlsError(OSError):
    """TLS cannot be set up or was refused; ``str()`` is one line for the user."""

    def __init__(self, message: str, errno_: int = errno.EACCES) -> None:
        super().__init__(errno_, message)

    def __str__(self) -> str:
        return str(self.strerror)


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUE


def read_secure_access_depth(path: str = SECURE_ACCESS_FILE) -> int:
    """The certificate depth in the secure-access file, as gluster reads it (missing, 0 or junk: 1)."""
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = _DEPTH_LINE.match(line)
                if m:
                    digits = re.match(r"\s*([+-]?\d+)", line[m.end():])
                    depth = int(digits.group(1)) if digits else 0
                    return depth if depth != 0 else DEFAULT_CERT_DEPTH
    except OSError:
        pass
    return DEFAULT_CERT_DEPTH


class _DepthCheckedSSLObject(ssl.SSLObject):
    """OpenSSL's verify depth (``SSL_CTX_set_verify_depth``) is not in Python's ssl module: check the
    verified chain once the handshake is done — at most ``depth`` certificates between the peer's and
    the trust anchor, as OpenSSL counts (``openssl verify -verify_depth``)."""

    max_depth = DEFAULT_CERT_DEPTH

    def do_handshake(self) -> None:
        super().do_handshake()
        chain = _verified_chain(self)
        if chain is not None and len(chain) > self.max_depth + 2:
            err = ssl.SSLCertVerificationError(
                f"certificate chain too long: {len(chain) - 2} intermediate certificate(s), "
                f"ssl-cert-depth is {self.max_depth}")
            err.verify_message = "certificate chain too long"
            raise err


def _verified_chain(obj: ssl.SSLObject) -> list[Any] | None:
    public = getattr(obj, "get_verified_chain", None)  # Python 3.13+
    if public is not None:
        return list(public())
    inner = getattr(obj, "_sslobj", None)  # 3.10-3.12: the C object has it, the wrapper not yet
    method = getattr(inner, "get_verified_chain", None)
    return list(method()) if method is not None else None


@dataclass(frozen=True)
class TlsSetup:
    """Everything one TLS connection needs; ``why`` says who asked for TLS (for error messages)."""

    why: str
    cert: str
    key: str
    ca: str
    crl_path: str | None = None
    depth: int = DEFAULT_CERT_DEPTH
    ciphers: str = DEFAULT_CIPHER_LIST

    def check_files(self) -> None:
        """One :class:`TlsError` line if a file is missing (before any connection is tried)."""
        for what, path in (("certificate", self.cert), ("private key", self.key), ("CA list", self.ca)):
            if not os.path.exists(path):
                raise TlsError(f"{self.why} but {path} (the client's {what}) does not exist; put the client's "
                               f"certificate, key and CA there or choose them with the mount options "
                               f"{PATH_OPTIONS}", errno.ENOENT)

    def context(self) -> ssl.SSLContext:
        """A client context as gluster builds its SSL_CTX; :class:`TlsError` if it cannot be built."""
        self.check_files()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # gluster checks the CA (and the CN on the server), not host names
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
        try:
            ctx.set_ciphers(self.ciphers)
        except ssl.SSLError:
            raise TlsError(f"{self.why} but its cipher list {self.ciphers!r} (ssl.cipher-list) selects no "
                           f"cipher OpenSSL knows", errno.EINVAL) from None
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"{self.why} but the certificate {self.cert} with the key {self.key} cannot be used "
                           f"({_reason(e)})", errno.EINVAL) from None
        try:
            ctx.load_verify_locations(cafile=self.ca, capath=self.crl_path)
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"{self.why} but the CA list {self.ca} cannot be used ({_reason(e)})",
                           errno.EINVAL) from None
        if self.crl_path:
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
        ctx.sslobject_class = type("DepthCheckedSSLObject", (_DepthCheckedSSLObject,), {"max_depth": self.depth})
        return ctx

    def own_cn(self) -> str | None:
        """The CN of our certificate (what a brick matches against ``auth.ssl-allow``), if readable."""
        decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)  # the stdlib's PEM decoder
        try:
            info = decode(self.cert) if decode is not None else None
        except (OSError, ValueError, ssl.SSLError):
            return None
        for rdn in (info or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None

    def auth_hint(self) -> str:
        """Why a brick that completed the TLS handshake refuses SETVOLUME."""
        cn = self.own_cn()
        return (f"over TLS the brick admits the CN of our certificate {self.cert}"
                f"{f' (CN={cn})' if cn is not None else ''} only if the volume's auth.ssl-allow matches it")

    def describe(self) -> str:
        extra = f", CRLs {self.crl_path}" if self.crl_path else ""
        ciphers = "" if self.ciphers == DEFAULT_CIPHER_LIST else f", ciphers {self.ciphers}"
        return f"certificate {self.cert}, key {self.key}, CA {self.ca}{extra}, depth {self.depth}{ciphers}"


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).replace("_", " ").lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


@dataclass(frozen=True)
class TlsConfig:
    """The node's choices (mount options): where the files are, whether glusterd speaks TLS.

    ``None`` means "not given": the volfile's option, then gluster's default, applies.
    """

    ssl_dir: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    #: management TLS: None = on iff :attr:`secure_access_file` exists (gluster's rule)
    secure_mgmt: bool | None = None
    secure_access_file: str = SECURE_ACCESS_FILE

    @classmethod
    def from_options(cls, opts: MountOptions) -> TlsConfig:
        return cls(ssl_dir=opts.ssl_dir, cert=opts.ssl_cert, key=opts.ssl_key, ca=opts.ssl_ca,
                   secure_mgmt=opts.secure_mgmt)

    def _path(self, explicit: str | None, name: str, volfile: str | None) -> str:
        if explicit:
            return explicit
        if self.ssl_dir:
            return os.path.join(self.ssl_dir, name)
        return volfile or os.path.join(OPENSSL_DIR, name)

    def mgmt_on(self) -> bool:
        if self.secure_mgmt is not None:
            return self.secure_mgmt
        return os.path.exists(self.secure_access_file)

    def mgmt_why(self) -> str:
        if self.secure_mgmt:
            return "secure-mgmt=yes"
        return f"{self.secure_access_file} exists"

    def mgmt(self, server: object = "glusterd") -> TlsSetup | None:
        """The setup of a connection to glusterd, or None for plain TCP."""
        if not self.mgmt_on():
            return None
        return TlsSetup(why=f"glusterd at {server} is used with TLS ({self.mgmt_why()})",
                        cert=self._path(self.cert, CERT_FILE, None), key=self._path(self.key, KEY_FILE, None),
                        ca=self._path(self.ca, CA_FILE, None),
                        depth=read_secure_access_depth(self.secure_access_file))

    def brick(self, options: Mapping[str, str], volume: str = "") -> TlsSetup | None:
        """The setup of a connection to the brick of a ``protocol/client`` with ``options``, or None."""
        if not _is_true(options.get(OPT_ENABLED)):
            return None
        if self.mgmt_on():
            depth = read_secure_access_depth(self.secure_access_file)  # gluster: ctx->ssl_cert_depth wins
        else:
            try:
                depth = int(options.get(OPT_DEPTH) or DEFAULT_CERT_DEPTH)
            except ValueError:
                depth = DEFAULT_CERT_DEPTH
        crl = options.get(OPT_CRL)
        return TlsSetup(why=f"volume {volume or '?'} requires TLS (client.ssl on)",
                        cert=self._path(self.cert, CERT_FILE, options.get(OPT_CERT)),
                        key=self._path(self.key, KEY_FILE, options.get(OPT_KEY)),
                        ca=self._path(self.ca, CA_FILE, options.get(OPT_CA)),
                        crl_path=None if not crl or crl.upper() == "NULL" else crl,
                        depth=depth, ciphers=options.get(OPT_CIPHERS) or DEFAULT_CIPHER_LIST)


#: gluster's behaviour with no mount options
DEFAULT = TlsConfig()


def check_graph(graph: Graph, config: TlsConfig, volume: str) -> None:
    """Before connecting: one :class:`TlsError` line if a brick of ``graph`` needs TLS this node cannot do
    (missing or unusable certificate, key, CA; a cipher list that selects nothing)."""
    for xl in graph.clients():
        setup = config.brick(xl.options, volume)
        if setup is not None:
            setup.context()


def describe(graph: Graph, config: TlsConfig, volume: str) -> str:
    """How ``gfuse probe`` says which paths use TLS."""
    setups = {s for s in (config.brick(xl.options, volume) for xl in graph.clients()) if s is not None}
    n = len(graph.clients())
    if not setups:
        bricks = "bricks: plain TCP (client.ssl off)"
    elif len(setups) == 1:
        bricks = f"bricks: TLS (client.ssl on; {next(iter(setups)).describe()})"
    else:
        bricks = f"bricks: TLS ({len(setups)} different setups over {n} bricks)"
    mgmt = config.mgmt()
    glusterd = (f"glusterd: TLS ({config.mgmt_why()}; depth {mgmt.depth})" if mgmt is not None
                else "glusterd: plain TCP (no secure-access)")
    return f"transport: {bricks}; {glusterd}"


def handshake_error(e: BaseException, setup: TlsSetup, peer: str) -> TlsError:
    """A failed handshake (trio's BrokenResourceError, its SSL cause) as one line for the user."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        msg = (cause.args[0] if cause.args and "too long" in str(cause.args[0])
               else cause.verify_message or _reason(cause))
        return TlsError(f"TLS: the certificate of {peer} is not trusted: {msg} (CA list {setup.ca}, "
                        f"depth {setup.depth})", errno.EACCES)
    if isinstance(cause, ssl.SSLError) and "alert" in _reason(cause):
        return TlsError(f"TLS: {peer} refused our certificate {setup.cert} ({_reason(cause)}): is it signed by a CA "
                        f"the server trusts? (see the server's log)", errno.EACCES)
    what = _reason(cause) if cause is not None else (str(e) or str(e.__cause__) or "connection closed")
    return TlsError(f"TLS handshake with {peer} failed ({what}): {setup.why}, but does the server? "
                    f"(server.ssl on for a brick, secure-access for glusterd)", errno.ECONNABORTED)
