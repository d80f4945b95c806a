"""gfuse/tls.py without gluster: which files and settings a connection uses, and what a handshake against a
TLS server on 127.0.0.1 (Python's ssl, certificates made by the openssl CLI) accepts and refuses.

The same behaviour against real bricks and glusterd is in tests/cluster/test_tls.py.
"""

from __future__ import annotations

import errno
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gfuse import rpc, tls
from gfuse.handshake import DUMP_PROGRAM, DUMP_VERSION, PING
from gfuse.options import MountError, parse_options
from gfuse.tls import TlsConfig, TlsError
from gfuse.transport import RpcConnection

# ------------------------------------------------------------------------------------------------
# options and settings


def test_mount_options() -> None:
    o = parse_options("ssl-dir=/etc/ssl,ssl-cert=/k/c.pem,ssl-key=/k/c.key,ssl-ca=/k/ca.pem,secure-mgmt")
    assert (o.ssl_dir, o.ssl_cert, o.ssl_key, o.ssl_ca, o.secure_mgmt) == (
        "/etc/ssl", "/k/c.pem", "/k/c.key", "/k/ca.pem", True)
    assert parse_options("secure-mgmt=no").secure_mgmt is False
    assert parse_options("").secure_mgmt is None
    with pytest.raises(MountError, match=r"'ssl-dir'.*not an absolute path"):
        parse_options("ssl-dir=certs")
    with pytest.raises(MountError, match="'secure-mgmt'"):
        parse_options("secure-mgmt=maybe")


def test_file_precedence(tmp_path: Path) -> None:
    """Mount options, then ssl-dir, then the volfile's paths, then OpenSSL's directory."""
    never = str(tmp_path / "no-secure-access")
    vol = {tls.OPT_ENABLED: "on", tls.OPT_CERT: "/v/c.pem", tls.OPT_KEY: "/v/c.key", tls.OPT_CA: "/v/ca"}
    s = TlsConfig(secure_access_file=never).brick(vol, "V")
    assert s is not None and (s.cert, s.key, s.ca) == ("/v/c.pem", "/v/c.key", "/v/ca")
    s = TlsConfig(ssl_dir="/d", cert="/x.pem", secure_access_file=never).brick(vol, "V")
    assert s is not None and (s.cert, s.key, s.ca) == ("/x.pem", "/d/glusterfs.key", "/d/glusterfs.ca")
    s = TlsConfig(secure_access_file=never).brick({tls.OPT_ENABLED: "true"}, "V")
    assert s is not None and s.cert == f"{tls.OPENSSL_DIR}/glusterfs.pem" and s.ca == f"{tls.OPENSSL_DIR}/glusterfs.ca"
    assert s.why == "volume V requires TLS (client.ssl on)"
    assert (s.depth, s.ciphers, s.crl_path) == (1, tls.DEFAULT_CIPHER_LIST, None)
    assert TlsConfig(secure_access_file=never).brick({tls.OPT_ENABLED: "off"}, "V") is None
    assert TlsConfig(secure_access_file=never).brick({}, "V") is None


def test_depth_and_ciphers_as_gluster(tmp_path: Path) -> None:
    sa = tmp_path / "secure-access"
    vol = {tls.OPT_ENABLED: "on", tls.OPT_DEPTH: "3", tls.OPT_CIPHERS: "HIGH", tls.OPT_CRL: "/crl"}
    s = TlsConfig(secure_access_file=str(sa)).brick(vol, "V")
    assert s is not None and (s.depth, s.ciphers, s.crl_path) == (3, "HIGH", "/crl")
    assert TlsConfig(secure_access_file=str(sa)).mgmt() is None  # no secure-access file: plain glusterd
    # with management TLS on, gluster uses the secure-access file's depth for every connection
    sa.write_text("# comment\noption transport.socket.ssl-cert-depth 5\n")
    s = TlsConfig(secure_access_file=str(sa)).brick(vol, "V")
    assert s is not None and s.depth == 5
    m = TlsConfig(secure_access_file=str(sa)).mgmt("h:24007")
    assert m is not None and m.depth == 5 and m.why == f"glusterd at h:24007 is used with TLS ({sa} exists)"
    assert TlsConfig(secure_access_file=str(sa), secure_mgmt=False).mgmt() is None
    for text, depth in (("", 1), ("option transport.socket.ssl-cert-depth 0\n", 1),
                        ("option transport.socket.ssl-cert-depth junk\n", 1),
                        ("  option transport.socket.ssl-cert-depth 4\n", 1),  # must start the line
                        ("option transport.socket.ssl-cert-depth   2 \n", 2)):
        sa.write_text(text)
        assert tls.read_secure_access_depth(str(sa)) == depth, text
    assert tls.read_secure_access_depth(str(tmp_path / "missing")) == 1
    assert TlsConfig(secure_mgmt=True, secure_access_file=str(tmp_path / "missing")).mgmt() is not None
    s = TlsConfig().brick({tls.OPT_ENABLED: "on", tls.OPT_CRL: "NULL"})
    assert s is not None and s.crl_path is None


# ------------------------------------------------------------------------------------------------
# certificates (EC keys: fast to make)


@dataclass(frozen=True)
class Pair:
    pem: Path
    key: Path


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("certs")
    (d / "ext.cnf").write_text("[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign,cRLSign\n"
                               "[leaf]\nbasicConstraints=CA:FALSE\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    out: dict[str, Pair] = {}

    def root(name: str) -> None:
        _openssl(d, "req", "-x509", *ec, "-subj", f"/CN={name}", "-days", "2", "-keyout", f"{name}.key",
                 "-out", f"{name}.pem")
        out[name] = Pair(d / f"{name}.pem", d / f"{name}.key")

    def signed(name: str, ca: str, ext: str = "leaf") -> None:
        _openssl(d, "req", *ec, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", str(out[ca].pem), "-CAkey", str(out[ca].key),
                 "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-extensions", ext, "-out", f"{name}.pem")
        out[name] = Pair(d / f"{name}.pem", d / f"{name}.key")

    root("root")
    root("other")
    signed("server", "root")
    signed("client", "root")
    signed("inter", "root", ext="ca")
    signed("deep", "inter")
    (d / "deep-chain.pem").write_bytes(out["deep"].pem.read_bytes() + out["inter"].pem.read_bytes())
    out["deep-chain"] = Pair(d / "deep-chain.pem", out["deep"].key)
    return out


def test_context_errors_are_one_line(certs: dict[str, Pair], tmp_path: Path) -> None:
    c = TlsConfig(cert=str(certs["client"].pem), key=str(certs["client"].key), ca=str(certs["root"].pem))
    good = c.brick({tls.OPT_ENABLED: "on"}, "V")
    assert good is not None
    assert isinstance(good.context(), ssl.SSLContext)
    assert good.own_cn() == "client"
    assert "(CN=client)" in good.auth_hint() and "auth.ssl-allow" in good.auth_hint()

    missing = TlsConfig(ssl_dir=str(tmp_path)).brick({tls.OPT_ENABLED: "on"}, "V")
    assert missing is not None
    with pytest.raises(TlsError) as ei:
        missing.context()
    assert str(ei.value) == (f"volume V requires TLS (client.ssl on) but {tmp_path}/glusterfs.pem (the client's "
                             f"certificate) does not exist; put the client's certificate, key and CA there or choose "
                             f"them with the mount options ssl-dir=, or ssl-cert=, ssl-key=, ssl-ca=")
    assert ei.value.errno == errno.ENOENT

    bad_cipher = c.brick({tls.OPT_ENABLED: "on", tls.OPT_CIPHERS: "NOPE"}, "V")
    assert bad_cipher is not None
    with pytest.raises(TlsError, match=r"cipher list 'NOPE' \(ssl.cipher-list\) selects no cipher"):
        bad_cipher.context()
    mismatched = TlsConfig(cert=str(certs["client"].pem), key=str(certs["server"].key),
                           ca=str(certs["root"].pem)).brick({tls.OPT_ENABLED: "on"}, "V")
    assert mismatched is not None
    with pytest.raises(TlsError, match=r"the certificate .*client.pem with the key .*server.key cannot be used"):
        mismatched.context()
    not_a_ca = TlsConfig(cert=str(certs["client"].pem), key=str(certs["client"].key),
                         ca=str(certs["client"].key)).brick({tls.OPT_ENABLED: "on"}, "V")
    assert not_a_ca is not None
    with pytest.raises(TlsError, match=r"the CA list .*client.key cannot be used"):
        not_a_ca.context()


# ------------------------------------------------------------------------------------------------
# handshakes against a TLS server on 127.0.0.1


def server_context(cert: Pair, ca: Pair | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.pem, cert.key)
    if ca is not None:  # ask for and verify the client's certificate, as a brick does
        ctx.load_verify_locations(ca.pem)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def rpc_server(stream: trio.abc.Stream) -> None:
    """Answers every call with an empty success (enough for PING)."""
    reader = rpc.RecordReader()
    try:
        while data := await stream.receive_some(1 << 16):
            for record in reader.feed(data):
                msg = rpc.decode_message(record)
                assert isinstance(msg, rpc.Call)
                await stream.send_all(rpc.frame(rpc.encode_reply(msg.xid, b"")))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def hang_up(stream: trio.abc.Stream) -> None:
    """A plain server that closes on the first bytes it cannot parse."""
    await stream.receive_some(1 << 16)


async def silent(stream: trio.abc.Stream) -> None:
    await trio.sleep_forever()


async def with_server(ctx: ssl.SSLContext | None, client: Callable[[int], Awaitable[None]],
                      handler: Callable[[trio.abc.Stream], Awaitable[None]] = rpc_server) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def handle(s: trio.SocketStream) -> None:
            stream: trio.abc.Stream = s
            if ctx is not None:
                stream = trio.SSLStream(s, ctx, server_side=True)
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError:
                    await s.aclose()
                    return
            await handler(stream)
            await stream.aclose()

        nursery.start_soon(trio.serve_listeners, handle, listeners)
        with trio.fail_after(10):
            await client(port)
        nursery.cancel_scope.cancel()


def setup_for(certs: dict[str, Pair], cert: str = "client", ca: str = "root", depth: int = 1) -> tls.TlsSetup:
    s = TlsConfig(cert=str(certs[cert].pem), key=str(certs[cert].key), ca=str(certs[ca].pem)).brick(
        {tls.OPT_ENABLED: "on", tls.OPT_DEPTH: str(depth)}, "V")
    assert s is not None
    return s


async def ping(port: int, setup: tls.TlsSetup | None, timeout: float = 5) -> RpcConnection:
    async with trio.open_nursery() as nursery:
        conn = await RpcConnection.connect(nursery, "127.0.0.1", port, ping_timeout=None, connect_timeout=timeout,
                                           tls=setup)
        await conn.call(DUMP_PROGRAM, DUMP_VERSION, PING)
        await conn.aclose()
        return conn


async def test_tls_round_trip_and_depth(certs: dict[str, Pair]) -> None:
    async def client(port: int) -> None:
        conn = await ping(port, setup_for(certs))
        assert conn.tls_version in ("TLSv1.2", "TLSv1.3")

    await with_server(server_context(certs["server"], certs["root"]), client)

    async def deep(port: int) -> None:
        await ping(port, setup_for(certs, depth=1))  # one intermediate: depth 1 is enough
        with pytest.raises(TlsError, match="is not trusted: certificate chain too long: 1 intermediate "
                                           r"certificate\(s\), ssl-cert-depth is 0 \(CA list .*root.pem, depth 0\)"):
            await ping(port, setup_for(certs, depth=0))

    await with_server(server_context(certs["deep-chain"], certs["root"]), deep)


async def test_refusals(certs: dict[str, Pair]) -> None:
    async def wrong_ca(port: int) -> None:
        with pytest.raises(TlsError, match=r"TLS: the certificate of 127.0.0.1:\d+ is not trusted: "
                                           r"[a-z -]+ \(CA list .*other.pem"):
            await ping(port, setup_for(certs, ca="other"))

    await with_server(server_context(certs["server"], certs["root"]), wrong_ca)

    async def untrusted_client(port: int) -> None:
        with pytest.raises(OSError) as ei:
            await ping(port, setup_for(certs, cert="other"))
        assert "did not accept our certificate" in str(ei.value) or "refused our certificate" in str(ei.value)
        assert "other.pem" in str(ei.value)

    await with_server(server_context(certs["server"], certs["root"]), untrusted_client)

    async def plain_server(port: int) -> None:
        with pytest.raises(TlsError, match=r"TLS handshake with 127.0.0.1:\d+ failed \(.*\): volume V requires "
                                           r"TLS \(client.ssl on\), but does the server\?"):
            await ping(port, setup_for(certs))

    await with_server(None, plain_server, hang_up)

    async def silent_server(port: int) -> None:
        with pytest.raises(TlsError, match=r"TLS handshake with 127.0.0.1:\d+ timed out after 0.5s: does the server "
                                           r"use TLS\?"):
            await ping(port, setup_for(certs), timeout=0.5)

    await with_server(None, silent_server, silent)

    async def tls_server_plain_client(port: int) -> None:
        with pytest.raises(OSError, match=r"before any reply .*client.ssl on, secure-mgmt=yes"):
            await ping(port, None)

    await with_server(server_context(certs["server"], certs["root"]), tls_server_plain_client)
