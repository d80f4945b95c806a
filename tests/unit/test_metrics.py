"""The agent's Prometheus metrics (flexvolume/metrics.py) over fake status sockets, and the FUSE bridge's
counters (gfuse.status.FuseStats) over a fake graph: no mount, no glusterd."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import gfuse.status as status_mod
from flexvolume import metrics
from flexvolume.state import MountRecord
from gfuse.status import LATENCY_BUCKETS, FuseStats, serve_status

UID = "0f6a1a49-31b9-4c5e-9d1c-7a1d2f3b4c5d"


# ------------------------------------------------------------------------------------------------ FuseStats


def test_fuse_stats_counts_buckets_and_errors() -> None:
    s = FuseStats()
    for dt in (0.00005, 0.0003, 0.0003, 0.2, 100.0):
        s.done("read", dt)
    s.done("lookup", 0.001)  # exactly on a bound: counted in that bucket (le is "<=")
    s.failed("lookup", errno.ENOENT)
    s.failed("lookup", errno.ENOENT)
    s.failed("write", 9999)
    s.bytes_read, s.bytes_written = 10, 20
    snap = s.snapshot()
    assert snap["latency_buckets"] == list(LATENCY_BUCKETS)
    read = snap["ops"]["read"]
    assert read["requests"] == 5 and read["seconds"] == pytest.approx(100.2006)
    assert len(read["buckets"]) == len(LATENCY_BUCKETS) + 1 and sum(read["buckets"]) == 5
    assert read["buckets"][0] == 1 and read["buckets"][LATENCY_BUCKETS.index(0.0005)] == 2
    assert read["buckets"][LATENCY_BUCKETS.index(0.25)] == 1 and read["buckets"][-1] == 1
    assert snap["ops"]["lookup"]["buckets"][LATENCY_BUCKETS.index(0.001)] == 1
    assert sorted(snap["errors"], key=lambda e: e["op"]) == [{"op": "lookup", "errno": "ENOENT", "count": 2},
                                                             {"op": "write", "errno": "9999", "count": 1}]
    assert snap["bytes_read"] == 10 and snap["bytes_written"] == 20


class _Reply:
    def __init__(self, data: bytes = b"", ret: int = 0) -> None:
        self.data, self.ret = data, ret


class _Top:
    """The top of a graph for the FUSE bridge: reads return 3 bytes, writes take all, lookups fail."""

    async def read(self, fh: int, off: int, size: int) -> _Reply:
        return _Reply(b"abc")

    async def write(self, fh: int, off: int, buf: bytes, cred: Any = None) -> _Reply:
        return _Reply(ret=len(buf))

    async def lookup(self, gfid: bytes, name: str, cred: Any = None) -> _Reply:
        raise OSError(errno.ENOENT, "no such file")

    async def fsync(self, fh: int, datasync: bool) -> None:
        raise RuntimeError("a bug")


async def test_fuse_bridge_counts_every_request() -> None:
    import pyfuse3

    from gfuse.fuse import GlusterOperations

    ops = GlusterOperations(_Top())

    class Ctx:
        uid = gid = pid = 0
        umask = 0o22

    assert await ops.read(1, 0, 3) == b"abc"
    assert await ops.write(1, 0, b"hello") == 5
    assert await ops.write(1, 5, b"!") == 1
    with pytest.raises(pyfuse3.FUSEError):
        await ops.lookup(pyfuse3.ROOT_INODE, b"missing", Ctx())  # type: ignore[arg-type]
    with pytest.raises(pyfuse3.FUSEError):
        await ops.lookup(pyfuse3.ROOT_INODE, b"x" * 300, Ctx())  # type: ignore[arg-type]  # ENAMETOOLONG
    with pytest.raises(pyfuse3.FUSEError):
        await ops.fsync(1, False)  # an unexpected exception is EIO
    snap = ops.stats.snapshot()
    assert {op: c["requests"] for op, c in snap["ops"].items()} == {"read": 1, "write": 2, "lookup": 2, "fsync": 1}
    assert all(sum(c["buckets"]) == c["requests"] for c in snap["ops"].values())
    assert sorted((e["op"], e["errno"], e["count"]) for e in snap["errors"]) == [
        ("fsync", "EIO", 1), ("lookup", "ENAMETOOLONG", 1), ("lookup", "ENOENT", 1)]
    assert snap["bytes_read"] == 3 and snap["bytes_written"] == 6
    assert ops.inflight == 0


def test_fuse_counting_cost() -> None:
    """What the counters add to one request (two vDSO clock reads, a bisect, a few increments): printed,
    and bounded loosely (a FUSE request costs tens of microseconds or more in this bridge)."""
    s = FuseStats()
    n = 200_000
    t = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        s.done("getattr", time.perf_counter() - t0)
    per = (time.perf_counter() - t) / n
    print(f"\ncounting one FUSE request: {per * 1e9:.0f} ns")
    assert per < 20e-6


# ------------------------------------------------------------------------------------------------ addresses


@pytest.mark.parametrize("text, want", [("127.0.0.1:9840", ("127.0.0.1", 9840)), (":9840", ("", 9840)),
                                        ("[::1]:0", ("::1", 0)), ("node-1.example:80", ("node-1.example", 80)),
                                        ("fd00::5:9840", ("fd00::5", 9840))])
def test_parse_address(text: str, want: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == want


@pytest.mark.parametrize("text, why", [("9840", "is not HOST:PORT"), ("127.0.0.1:", "must be a number"),
                                       ("127.0.0.1:99999", "from 0 to 65535"), ("a b:1", "is not a host"),
                                       ("127.0.0.1:-1", "must be a number")])
def test_parse_address_refuses(text: str, why: str) -> None:
    with pytest.raises(metrics.AddressError, match=why):
        metrics.parse_address(text)


# ------------------------------------------------------------------------------------------------ labels


def test_mount_labels() -> None:
    flex = MountRecord(source="srv:/vol/sub", target=f"/var/lib/kubelet/pods/{UID}/volumes/gfuse.example.org~gfuse/d")
    assert metrics.mount_labels(flex) == {"volume": "vol", "source": "srv:/vol/sub", "target": flex.target,
                                          "pod_uid": UID, "bridge": "flexvolume", "backend": ""}
    csi = MountRecord(source="srv:/pool/pvc-1",
                      target="/var/lib/kubelet/plugins/kubernetes.io/csi/gfuse.csi.example.org/ab12/globalmount",
                      context={"csi.volume_id": "subdir:srv:/pool/pvc-1", "csi.role": "staging"})
    assert metrics.mount_labels(csi) == {"volume": "pool", "source": "srv:/pool/pvc-1", "target": csi.target,
                                         "pod_uid": "", "bridge": "csi", "backend": "subdir"}
    plain = MountRecord(source="srv:/v", target="/mnt/x", context={"pod_uid": "u-1"})
    assert metrics.mount_labels(plain)["pod_uid"] == "u-1" and metrics.mount_labels(plain)["bridge"] == "flexvolume"


# ------------------------------------------------------------------------------------------------ collector


def _status(target: str, **over: Any) -> dict[str, Any]:
    fuse = FuseStats()
    for dt in (0.0002, 0.003, 0.003):
        fuse.done("write", dt)
    fuse.done("lookup", 0.0004)
    fuse.failed("lookup", errno.ENOENT)
    fuse.bytes_written, fuse.bytes_read = 3 << 20, 1 << 20
    st = {"source": "srv:/vol", "mountpoint": target, "volume": "vol", "shape": "replica 3", "pid": 4242,
          "since": 1700000000.5, "pending_brick_calls": 2, "fuse_requests_in_flight": 1, "inodes": 7,
          "read_only": False, "restart": "off",
          "bricks": [{"name": "vol-client-0", "brick": "h1:/b0", "up": True},
                     {"name": "vol-client-1", "brick": "h2:/b1", "up": False},
                     {"name": "vol-client-2", "brick": "h3:/b2", "up": True}],
          "fuse": fuse.snapshot()}
    st.update(over)
    return st


def _parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _one(series: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    got = [v for lab, v in series.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(got) == 1, f"{name}{labels}: {got} in {series.get(name)}"
    return got[0]


def test_collector_renders_a_mount_and_a_dead_one() -> None:
    live_t = f"/var/lib/kubelet/pods/{UID}/volumes/gfuse.example.org~gfuse/data"
    dead_t = "/var/lib/kubelet/pods/other/volumes/gfuse.example.org~gfuse/data"
    live = metrics.MountSample(labels=metrics.mount_labels(MountRecord(source="srv:/vol", target=live_t)),
                               healthy=True, repairs=2, repair_failing=False, status=_status(live_t))
    dead = metrics.MountSample(labels=metrics.mount_labels(MountRecord(source="srv:/vol", target=dead_t)),
                               healthy=False, repairs=0, repair_failing=True, error="gone")
    body, ctype = metrics.render(metrics.AgentSample("1.2.3", 5, [live, dead]))
    assert ctype.startswith("text/plain; version=0.0.4")
    s = _parse(body.decode())
    base = {"target": live_t, "volume": "vol", "source": "srv:/vol", "pod_uid": UID, "bridge": "flexvolume",
            "backend": ""}
    assert _one(s, "gfuse_agent_info", version="1.2.3") == 1
    assert _one(s, "gfuse_agent_mounts") == 2 and _one(s, "gfuse_agent_health_passes_total") == 5
    assert _one(s, "gfuse_mount_up", **base) == 1 and _one(s, "gfuse_mount_up", target=dead_t) == 0
    assert _one(s, "gfuse_mount_healthy", **base) == 1 and _one(s, "gfuse_mount_healthy", target=dead_t) == 0
    assert _one(s, "gfuse_mount_repairs_total", **base) == 2
    assert _one(s, "gfuse_mount_repair_failing", target=dead_t) == 1
    assert _one(s, "gfuse_mount_start_time_seconds", **base) == 1700000000.5
    assert _one(s, "gfuse_mount_bricks", **base) == 3 and _one(s, "gfuse_mount_bricks_up", **base) == 2
    assert _one(s, "gfuse_brick_up", brick="h2:/b1", brick_name="vol-client-1", **base) == 0
    assert _one(s, "gfuse_mount_brick_calls_in_flight", **base) == 2
    assert _one(s, "gfuse_mount_fuse_requests_in_flight", **base) == 1
    assert _one(s, "gfuse_mount_inodes", **base) == 7
    assert _one(s, "gfuse_fuse_requests_total", op="write", **base) == 3
    assert _one(s, "gfuse_fuse_errors_total", op="lookup", errno="ENOENT", **base) == 1
    assert _one(s, "gfuse_written_bytes_total", **base) == 3 << 20
    assert _one(s, "gfuse_read_bytes_total", **base) == 1 << 20
    # the histogram: cumulative buckets, +Inf = count, sum
    assert _one(s, "gfuse_fuse_request_duration_seconds_bucket", op="write", le="0.00025", **base) == 1
    assert _one(s, "gfuse_fuse_request_duration_seconds_bucket", op="write", le="0.0025", **base) == 1
    assert _one(s, "gfuse_fuse_request_duration_seconds_bucket", op="write", le="0.005", **base) == 3
    assert _one(s, "gfuse_fuse_request_duration_seconds_bucket", op="write", le="+Inf", **base) == 3
    assert _one(s, "gfuse_fuse_request_duration_seconds_count", op="write", **base) == 3
    assert _one(s, "gfuse_fuse_request_duration_seconds_sum", op="write", **base) == pytest.approx(0.0062)
    # a mount that did not answer has no series of its serving process
    for name in ("gfuse_mount_bricks", "gfuse_fuse_requests_total", "gfuse_written_bytes_total"):
        assert not [lab for lab, _ in s[name] if lab["target"] == dead_t], name
    assert "process_cpu_seconds_total" in s  # the agent process's own (prometheus_client's collector)


def test_collector_takes_a_status_without_fuse_counters_or_odd_values() -> None:
    """A serving process of an older version (no "fuse" key) or odd values never break the rendering."""
    st = _status("/t", since="yesterday", inodes=None, bricks=[{"up": True}, "junk"])
    del st["fuse"]
    live = metrics.MountSample(labels=metrics.mount_labels(MountRecord(source="s:/v", target="/t")),
                               healthy=True, repairs=0, repair_failing=False, status=st)
    s = _parse(metrics.render(metrics.AgentSample("x", 0, [live]), process=False)[0].decode())
    assert _one(s, "gfuse_mount_up", target="/t") == 1 and _one(s, "gfuse_mount_bricks", target="/t") == 1
    assert _one(s, "gfuse_mount_start_time_seconds", target="/t") == 0
    assert "gfuse_fuse_requests_total" not in s


def test_openmetrics_when_asked() -> None:
    body, ctype = metrics.render(metrics.AgentSample("x", 0, []), "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


# ------------------------------------------------------------------------------------------------ gather, HTTP


class FakeAgent:
    def __init__(self, records: list[MountRecord]) -> None:
        self.table = {r.target: r for r in records}
        self._health = {r.target: ("healthy", "") for r in records}
        self._repair_errors: dict[str, str] = {}
        self.health_passes = 3


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = Path(f"/tmp/gfm-{os.getpid()}-{tmp_path.name[-6:]}")  # unix socket paths are short
    d.mkdir()
    monkeypatch.setattr(status_mod, "RUN_DIR", str(d))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


async def test_gather_bounded_by_dead_and_stuck_mounts(run_dir: Path) -> None:
    live, stuck, dead = (MountRecord(source="srv:/vol", target=f"/k/pods/{n}/volumes/x~y/d")
                         for n in ("live", "stuck", "dead"))
    agent = FakeAgent([live, stuck, dead])
    agent._repair_errors[dead.target] = "the volume srv:/vol cannot be reached"
    # a process that listens but never answers (SIGSTOPped, or busy): connect works, no reply
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(status_mod.status_socket_path(stuck.target))
    hung.listen(4)
    with hung:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_status, status_mod.status_socket_path(live.target),
                               lambda: _status(live.target))
            await trio.sleep(0.1)
            t0 = trio.current_time()
            sample = await metrics.gather(agent, "v", timeout=0.5, budget=5)  # type: ignore[arg-type]
            took = trio.current_time() - t0
            nursery.cancel_scope.cancel()
    assert took < 2.0, f"a stuck mount held the scrape {took:.1f}s"
    by = {m.labels["target"]: m for m in sample.mounts}
    assert by[live.target].status is not None and by[live.target].status["pid"] == 4242
    assert by[stuck.target].status is None and "did not answer within 0.5s" in by[stuck.target].error
    assert by[dead.target].status is None and "does not answer" in by[dead.target].error
    assert by[dead.target].repair_failing and not by[live.target].repair_failing
    assert sample.version == "v" and sample.health_passes == 3


async def test_gather_budget_ends_the_scrape(run_dir: Path) -> None:
    recs = [MountRecord(source="srv:/vol", target=f"/k/m{i}") for i in range(3)]
    socks = []
    for r in recs:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(status_mod.status_socket_path(r.target))
        s.listen(4)
        socks.append(s)
    try:
        t0 = trio.current_time()
        sample = await metrics.gather(FakeAgent(recs), timeout=30, budget=0.5)  # type: ignore[arg-type]
        assert trio.current_time() - t0 < 2.0
    finally:
        for s in socks:
            s.close()
    assert [m.status for m in sample.mounts] == [None] * 3
    assert all("time was up" in m.error for m in sample.mounts)


async def _http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def test_http_server(run_dir: Path) -> None:
    rec = MountRecord(source="srv:/vol", target=f"/k/pods/{UID}/volumes/x~y/d")
    server = metrics.MetricsServer(FakeAgent([rec]), "127.0.0.1", 0, version="9.9")  # type: ignore[arg-type]
    listeners = await server.listen()
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_status, status_mod.status_socket_path(rec.target), lambda: _status(rec.target))
        nursery.start_soon(server.serve, listeners)
        await trio.sleep(0.1)
        resp = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n")
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Type: text/plain; version=0.0.4" in head
        assert f"Content-Length: {len(body)}".encode() in head
        s = _parse(body.decode())
        assert _one(s, "gfuse_mount_up", target=rec.target, pod_uid=UID) == 1
        assert _one(s, "gfuse_agent_info", version="9.9") == 1
        head_only = await _http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200") and head_only.endswith(b"\r\n\r\n")
        assert (await _http(port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await _http(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert b"/metrics" in await _http(port, b"GET / HTTP/1.1\r\n\r\n")
        # a client that connects and says nothing does not hold the others up
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        async with idle:
            assert (await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()
