"""Gluster's TLS, on real glusterd/glusterfsd 10.3: the I/O path (client.ssl/server.ssl) and the management
path (/var/lib/glusterd/secure-access), with certificates made here by the openssl CLI.

The bricks, glusterd and the native client read their certificate, key and CA from OpenSSL's directory
(``/usr/lib/ssl/glusterfs.{pem,key,ca}`` for Debian's glusterfs): the ``ssl_files`` fixture writes them
there for the test, under a lock, and puts back what was there before (or removes them) even when the test
fails. Only volumes with ssl options read them, so the other tests on this glusterd are not affected.
Management TLS switches every volume of its glusterd to TLS, so it runs on a private glusterd in network
and mount namespaces of its own (testkit/multicluster.py), whose /var/lib/glusterd is its own directory.

The wire is checked with a capture on loopback (an AF_PACKET socket on ``lo``, no tcpdump needed): file
content written through gfuse and read by the native client never appears in the brick connections of a
TLS volume, while the same capture finds it on a plain volume.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gfuse import tls
from testkit import cluster as tc
from testkit import multicluster as mcl

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

SSL_DIR = Path(tls.OPENSSL_DIR)
SERVER_CN, CLIENT_CN = "gfuse-tls-server", "gfuse-tls-client"
LOCK = Path("/run/lock/gfuse-test-tls.lock")
TLS_OPTIONS = {"client.ssl": "on", "server.ssl": "on"}


# ------------------------------------------------------------------------------------------------
# certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120,
                   stdin=subprocess.DEVNULL)


@dataclass(frozen=True)
class Ident:
    pem: Path   # certificate (chain: leaf first)
    key: Path

    def options(self, ca: Path | None = None) -> list[str]:
        return [f"ssl-cert={self.pem}", f"ssl-key={self.key}", *([f"ssl-ca={ca}"] if ca else [])]


@dataclass(frozen=True)
class Pki:
    dir: Path
    root: Ident       # the CA every node trusts (glusterfs.ca)
    server: Ident     # signed by root: what the bricks, glusterd and the native client present
    client: Ident     # signed by root, another CN: what gfuse presents (ssl-cert=/ssl-key=)
    stranger: Ident   # self-signed: trusted by nobody
    chained: Ident    # leaf signed by an intermediate CA signed by root (pem holds leaf + intermediate)


def _make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ext.cnf").write_text("[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign,cRLSign\n"
                               "[leaf]\nbasicConstraints=CA:FALSE\n")

    def self_signed(name: str, cn: str) -> Ident:
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-days", "2",
                 "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)
        return Ident(d / f"{name}.pem", d / f"{name}.key")

    def signed(name: str, cn: str, ca: Ident, ext: str = "leaf") -> Ident:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.pem), "-CAkey", str(ca.key),
                 "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-extensions", ext,
                 "-out", f"{name}.pem", cwd=d)
        return Ident(d / f"{name}.pem", d / f"{name}.key")

    root = self_signed("root", "gfuse-test-root")
    inter = signed("inter", "gfuse-test-intermediate", root, ext="ca")
    leaf = signed("chained-leaf", SERVER_CN, inter)
    chain = d / "chained.pem"
    chain.write_bytes(leaf.pem.read_bytes() + inter.pem.read_bytes())
    return Pki(d, root, signed("server", SERVER_CN, root), signed("client", CLIENT_CN, root),
               self_signed("stranger", "stranger"), Ident(chain, leaf.key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not installed")
    return _make_pki(tmp_path_factory.mktemp("pki"))


class SslFiles:
    """glusterfs.pem/.key/.ca in OpenSSL's directory, put back as they were by :meth:`restore`."""

    NAMES = (tls.CERT_FILE, tls.KEY_FILE, tls.CA_FILE)

    def __init__(self) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK, "w")  # held until restore()
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # one TLS test run at a time on this machine
        self._saved: dict[str, tuple[bytes, int] | None] = {}
        for name in self.NAMES:
            p = SSL_DIR / name
            self._saved[name] = (p.read_bytes(), p.stat().st_mode) if p.is_file() else None

    def install(self, ident: Ident, ca: Ident) -> None:
        for name, src in zip(self.NAMES, (ident.pem, ident.key, ca.pem)):
            tmp = SSL_DIR / f".{name}.gfuse-test"
            tmp.write_bytes(src.read_bytes())
            tmp.chmod(0o600 if name == tls.KEY_FILE else 0o644)
            tmp.rename(SSL_DIR / name)

    def remove(self) -> None:
        for name in self.NAMES:
            with contextlib.suppress(FileNotFoundError):
                (SSL_DIR / name).unlink()

    def restore(self) -> None:
        try:
            for name, saved in self._saved.items():
                p = SSL_DIR / name
                if saved is None:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                else:
                    p.write_bytes(saved[0])
                    p.chmod(saved[1] & 0o7777)
        finally:
            self._lock.close()


@pytest.fixture
def ssl_files(pki: Pki) -> Iterator[SslFiles]:
    """The server identity and the root CA installed where gluster reads them; restored afterwards."""
    files = SslFiles()
    try:
        files.install(pki.server, pki.root)
        yield files
    finally:
        files.restore()


@pytest.fixture
def tls_volume(ssl_files: SslFiles, make_volume: Callable[..., tc.Volume]) -> tc.Volume:
    """A started replica-3 volume with TLS on the I/O path; ssl_files outlives it (set up first)."""
    return make_volume("replica3", options={**TLS_OPTIONS, "auth.ssl-allow": f"{SERVER_CN},{CLIENT_CN}"})


# ------------------------------------------------------------------------------------------------
# helpers


def gfuse(*args: str, timeout: float = 90, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "gfuse.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def refused_mount(source: str, mountpoint: Path, options: list[str],
                  prefix: tuple[str, ...] = ()) -> str:
    """``gfuse mount`` that must fail: its one stderr line (it must not be mounted, nor print a traceback)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        r = gfuse("mount", source, str(mountpoint), "-o", ",".join(options), "--timeout", "20", prefix=prefix)
    finally:
        if tc.is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], timeout=30, check=False)
            pytest.fail(f"{source} was mounted on {mountpoint} with {options}")
    assert r.returncode != 0, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def brick_log(vol: tc.Volume) -> str:
    return "".join(p.read_text(errors="replace") for p in Path("/var/log/glusterfs/bricks").glob(f"*{vol.name}*"))


class LoopbackCapture:
    """Every TCP payload on ``lo`` to or from ``ports``, recorded by an AF_PACKET socket in a thread."""

    def __init__(self, ports: set[int]) -> None:
        self.ports = ports
        self.payload = bytearray()
        self.first_bytes: list[bytes] = []   # the first payload of each connection (seen from the client side)
        self._seen_flows: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
        self._sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 64 << 20)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING:
                continue  # lo shows each packet twice: keep the incoming copy
            ip = frame[14:]
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
                continue
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:total]
            sport, dport = struct.unpack("!HH", tcp[:4])
            data = tcp[(tcp[12] >> 4) * 4:]
            if not data or not ({sport, dport} & self.ports):
                continue
            self.payload += data
            if dport in self.ports and (sport, dport) not in self._seen_flows:
                self._seen_flows.add((sport, dport))
                self.first_bytes.append(bytes(data[:8]))

    def __enter__(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # the last segments
        self._stop.set()
        self._thread.join(timeout=10)
        self._sock.close()


def brick_ports(vol: tc.Volume) -> set[int]:
    ports = {vol.brick_port(i) for i in range(len(vol.bricks))}
    assert None not in ports, f"a brick of {vol.name} is offline"
    return {p for p in ports if p is not None}


# ------------------------------------------------------------------------------------------------
# the I/O path


def test_gfuse_and_native_client_share_a_tls_volume_and_nothing_is_plain_on_the_wire(
        tls_volume: tc.Volume, pki: Pki, gfuse_mount: Callable[..., tc.NativeMount],
        native_mount: Callable[..., tc.NativeMount], vol_dist1: tc.Volume) -> None:
    vol = tls_volume
    r = gfuse("probe", vol.source, "-o", ",".join(pki.client.options()))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"bricks: TLS (client.ssl on; certificate {pki.client.pem}" in r.stdout, r.stdout
    assert "glusterd: plain TCP" in r.stdout
    assert r.stdout.count("ok (TLSv1.") == 3, r.stdout
    plain = gfuse("probe", vol_dist1.source)
    assert plain.returncode == 0 and "bricks: plain TCP (client.ssl off)" in plain.stdout, plain.stdout

    marker = f"gfuse-plaintext-{secrets.token_hex(8)}\n".encode()
    data = marker * (512 * 1024 // len(marker))
    back = b"native-" + marker * 1000
    with LoopbackCapture(brick_ports(vol)) as cap:
        g = gfuse_mount(vol, options=pki.client.options())   # CN gfuse-tls-client, signed by the root CA
        n = native_mount(vol)                               # /usr/lib/ssl/glusterfs.pem: CN gfuse-tls-server
        with open(g / "from-gfuse.bin", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        assert (n / "from-gfuse.bin").read_bytes() == data
        with open(n / "from-native.bin", "wb") as f:
            f.write(back)
            os.fsync(f.fileno())
        assert tc.wait_until(lambda: (g / "from-native.bin").read_bytes() == back, 10, "gfuse reads the native file")
        assert sorted(os.listdir(g)) == sorted(os.listdir(n)) == ["from-gfuse.bin", "from-native.bin"]
    # the writes and reads did cross the capture (3 replicas get the data), encrypted
    assert len(cap.payload) > 3 * len(data), len(cap.payload)
    assert marker not in cap.payload and marker[:16] not in cap.payload
    # every flow to a brick port starts with a TLS record header (a handshake, or application data for a
    # connection made before the capture began: the self-heal daemon, a reconnect); plain gluster RPC would
    # start with a record mark (0x80…)
    assert cap.first_bytes and all(b[0] in (0x14, 0x15, 0x16, 0x17) and b[1] == 0x03 for b in cap.first_bytes), \
        cap.first_bytes

    # the same capture sees the content of a plain volume: it would have seen it above
    with LoopbackCapture(brick_ports(vol_dist1)) as plain_cap:
        p = gfuse_mount(vol_dist1)
        with open(p / f"tls-control-{secrets.token_hex(4)}.bin", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    assert marker in plain_cap.payload


def test_refused_with_one_clear_line(ssl_files: SslFiles, pki: Pki, make_volume: Callable[..., tc.Volume],
                                    gfuse_mount: Callable[..., tc.NativeMount], tmp_path: Path) -> None:
    """No certificates, a CA that did not sign the brick's, a certificate the brick's CA did not sign, a CN not in
    auth.ssl-allow: each is one line, the mount is not made, and nothing falls back to plain text."""
    vol = make_volume("dist1", options={**TLS_OPTIONS, "auth.ssl-allow": SERVER_CN})
    mp = tmp_path / "mnt"

    empty = tmp_path / "no-certs"
    empty.mkdir()
    line = refused_mount(vol.source, mp, [f"ssl-dir={empty}"])
    assert line == (f"gfuse: volume {vol.name} requires TLS (client.ssl on) but {empty}/glusterfs.pem (the client's "
                    f"certificate) does not exist; put the client's certificate, key and CA there or choose them "
                    f"with the mount options ssl-dir=, or ssl-cert=, ssl-key=, ssl-ca="), line
    r = gfuse("probe", vol.source, "-o", f"ssl-dir={empty}")
    assert r.returncode == 1 and "does not exist" in r.stdout and "bricks: TLS (client.ssl on" in r.stdout

    # our CA list does not hold the CA that signed the brick's certificate
    line = refused_mount(vol.source, mp, pki.server.options(ca=pki.stranger.pem))
    assert "is not trusted: self-signed certificate in certificate chain" in line or "is not trusted" in line, line
    assert f"CA list {pki.stranger.pem}" in line

    # the brick does not trust our certificate (self-signed): it hangs up after the handshake
    before = len(brick_log(vol))
    line = refused_mount(vol.source, mp, pki.stranger.options())
    assert "did not accept our certificate" in line and str(pki.stranger.pem) in line, line
    assert "certificate verify failed" in brick_log(vol)[before:]

    # a good certificate whose CN is not in auth.ssl-allow
    before = len(brick_log(vol))
    line = refused_mount(vol.source, mp, pki.client.options())
    assert "authentication refused by brick" in line and f"CN={CLIENT_CN}" in line and "auth.ssl-allow" in line, line
    log = brick_log(vol)[before:]
    assert f"connecting user name: {CLIENT_CN}" in log and f"allowed user names: {SERVER_CN}" in log, log

    # the CN in the list mounts (the default files: /usr/lib/ssl/glusterfs.{pem,key,ca})
    m = gfuse_mount(vol)
    (m / "ok").write_text("ok")
    vol.set_option("auth.ssl-allow", f"{SERVER_CN},{CLIENT_CN}")
    m2 = gfuse_mount(vol, options=pki.client.options())
    assert (m2 / "ok").read_text() == "ok"


def test_certificate_depth_and_cipher_list_from_the_volume(ssl_files: SslFiles, pki: Pki,
                                                          make_volume: Callable[..., tc.Volume],
                                                          gfuse_mount: Callable[..., tc.NativeMount],
                                                          tmp_path: Path) -> None:
    """ssl.certificate-depth counts the intermediates between a certificate and its CA, as OpenSSL does;
    ssl.cipher-list is OpenSSL's cipher string."""
    ssl_files.install(pki.chained, pki.root)  # the brick presents leaf + intermediate
    vol = make_volume("dist1", options={**TLS_OPTIONS, "auth.ssl-allow": "*", "ssl.certificate-depth": "0"})
    line = refused_mount(vol.source, tmp_path / "mnt", pki.client.options())
    assert "not trusted: certificate chain too long: 1 intermediate certificate(s), ssl-cert-depth is 0" in line, line

    vol.set_option("ssl.certificate-depth", "1")
    vol.set_option("ssl.cipher-list", "ECDHE:AES256:!aNULL")
    m = gfuse_mount(vol, options=pki.client.options())
    (m / "depth1").write_text("x")
    r = gfuse("probe", vol.source, "-o", ",".join(pki.client.options()))
    assert "depth 1, ciphers ECDHE:AES256:!aNULL" in r.stdout, r.stdout

    vol.set_option("ssl.cipher-list", "NO-SUCH-CIPHER")
    line = refused_mount(vol.source, tmp_path / "mnt2", pki.client.options())
    assert line.endswith("but its cipher list 'NO-SUCH-CIPHER' (ssl.cipher-list) selects no cipher OpenSSL knows"), line


# ------------------------------------------------------------------------------------------------
# the management path


@pytest.fixture
def secure_cluster(ssl_files: SslFiles) -> Iterator[mcl.MultiCluster]:
    """One private glusterd with /var/lib/glusterd/secure-access (in its own mount namespace)."""
    reason = mcl.unavailable_reason()
    if reason:
        pytest.skip(f"a private glusterd: {reason}")
    with mcl.MultiCluster(1) as mc:
        (mc.node(1).workdir / "secure-access").write_text("option transport.socket.ssl-cert-depth 2\n")
        mc.kill_glusterd(1)
        mc.start_glusterd(1)
        yield mc


def test_management_path_over_tls(secure_cluster: mcl.MultiCluster, pki: Pki, tmp_path: Path) -> None:
    """GETSPEC, PORTBYBRICK and the volfile watcher speak TLS to a glusterd with secure-access; without
    secure-mgmt=yes (this host has no secure-access file) gfuse is refused in one line, never served in plain."""
    mc = secure_cluster
    node = mc.node(1)
    name = f"tlsmgmt{secrets.token_hex(3)}"
    mc.gluster(1, "volume", "create", name, f"{node.host}:{node.bricks}/{name}", "force")
    for k, v in {**TLS_OPTIONS, "auth.ssl-allow": "*"}.items():
        mc.gluster(1, "volume", "set", name, k, v)
    mc.gluster(1, "volume", "start", name)
    source = f"{node.host}:/{name}"
    net = tuple(mc.net_prefix())

    r = gfuse("probe", source, "-o", "secure-mgmt=yes", prefix=net)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "glusterd: TLS (secure-mgmt=yes; depth 1)" in r.stdout and "bricks: TLS (client.ssl on" in r.stdout

    line = refused_mount(source, mc.mountpoint("plain"), [], prefix=net)
    assert f"glusterd at {node.host}:24007 is unreachable" in line and "secure-mgmt=yes" in line, line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = refused_mount(source, mc.mountpoint("nocerts"), ["secure-mgmt=yes", f"ssl-dir={empty}"], prefix=net)
    assert line == (f"gfuse: glusterd at {node.host}:24007 is used with TLS (secure-mgmt=yes) but "
                    f"{empty}/glusterfs.pem (the client's certificate) does not exist; put the client's certificate, "
                    f"key and CA there or choose them with the mount options ssl-dir=, or ssl-cert=, ssl-key=, "
                    f"ssl-ca="), line

    log = tmp_path / "gfuse.log"
    with mc.gfuse_mount(source, options=["secure-mgmt=yes", f"log-file={log}"]) as mp:
        (mp / "a").write_text("over tls")
        # a volfile change reaches the watcher over its TLS connection to glusterd
        mc.gluster(1, "volume", "set", name, "performance.quick-read", "off")
        tc.wait_until(lambda: "volfile of" in log.read_text() and "changed" in log.read_text(), 30,
                      "the volfile watcher sees the change")
        assert (mp / "a").read_text() == "over tls"
        (mp / "b").write_text("after the switch")

        # the native client on the same paths (mount.glusterfs has no secure-mgmt option: glusterfs itself)
        native = mc.mountpoint("native")
        subprocess.run([*net, "glusterfs", "--secure-mgmt=yes", f"--volfile-server={node.host}",
                        f"--volfile-id={name}", f"--log-file={tmp_path / 'native.log'}", str(native)],
                       check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        try:
            tc.wait_until(lambda: tc.is_mounted(native) and (native / "b").exists(), 30, "the native mount")
            assert (native / "b").read_text() == "after the switch"
            (native / "c").write_text("from native")
            assert tc.wait_until(lambda: (mp / "c").exists(), 10, "gfuse sees the native file")
            assert (mp / "c").read_text() == "from native"
        finally:
            if tc.is_mounted(native):
                subprocess.run(["umount", "-l", str(native)], timeout=30, check=False)
    glusterd_log = (node.logdir / "glusterd.log").read_text(errors="replace")
    assert "SSL support for MGMT is ENABLED" in glusterd_log
