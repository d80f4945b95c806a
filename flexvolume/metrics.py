"""Prometheus metrics of the node agent: ``gfuse-agent --metrics-address HOST:PORT`` serves ``/metrics``.

Nothing is counted in the agent itself: on every scrape it asks each mount of its table for its status
(the serving process's status socket, :mod:`gfuse.status`: bricks, calls in flight, FUSE requests by
operation with errors, latency histograms and bytes — :class:`gfuse.status.FuseStats`), all mounts at once,
each within :data:`STATUS_TIMEOUT` seconds. A mount whose server is gone, stuck or stopped shows
``gfuse_mount_up 0`` (and what the agent knows: its health, repairs); it never holds the endpoint up. The
exposition is ``prometheus_client``'s (a custom :class:`MountCollector` in a registry made per scrape, text
or OpenMetrics as the scraper asks); the HTTP server is a small trio one, a task of the agent's nursery like
its unix socket server — no thread.

Series (every mount series has the labels ``volume``, ``source``, ``target`` (the mount path), ``pod_uid``
(from a kubelet pod path ``<kubelet-dir>/pods/<uid>/volumes/…``, or the FlexVolume call; empty for a CSI
staging mount, which serves every pod of that volume on the node), ``bridge`` (``flexvolume``, ``csi``, or
empty) and ``backend`` (the provisioner's storage backend ``subdir``/``volume`` when the CSI volume id says it)):

=======================================================  =====================================================
``gfuse_mount_up``                                       1 if the serving process answered its status socket
``gfuse_mount_healthy``                                  1 if the agent's last health check found it healthy
``gfuse_mount_repairs_total``                            times the agent mounted it again after its server died
``gfuse_mount_repair_failing``                           1 while its repair keeps failing (the agent's log and
                                                         ``gfuse-agent`` list say why)
``gfuse_mount_start_time_seconds``                       when its serving process started (Unix time)
``gfuse_mount_bricks`` / ``gfuse_mount_bricks_up``       bricks of its graph, and those connected
``gfuse_brick_up{brick, brick_name}``                    each brick
``gfuse_mount_brick_calls_in_flight``                    calls sent to bricks and not answered yet
``gfuse_mount_fuse_requests_in_flight``                  FUSE requests being answered
``gfuse_mount_inodes``                                   inodes the kernel holds
``gfuse_fuse_requests_total{op}``                        FUSE requests answered, by operation
``gfuse_fuse_errors_total{op, errno}``                   of those, answered with an error (``lookup`` ENOENT is
                                                         most of them on a healthy mount)
``gfuse_fuse_request_duration_seconds{op}``              histogram (buckets :data:`gfuse.status.LATENCY_BUCKETS`)
``gfuse_read_bytes_total`` / ``gfuse_written_bytes_total``  data read and written through FUSE
``gfuse_agent_mounts``, ``gfuse_agent_health_passes_total``, ``gfuse_agent_info{version}``, ``process_*``
=======================================================  =====================================================

Pooled subdir PVs (``gfuse-agent --pool-subdirs yes``, :mod:`flexvolume.pools`): every PV of the agent's table
has its own series of what is per PV -- ``gfuse_mount_up``, ``_healthy``, ``_repairs_total``, ``_repair_failing``,
``_start_time_seconds``, ``_bricks``, ``_bricks_up``, ``gfuse_brick_up`` -- with its own labels (its ``target``,
``pod_uid``, ``bridge``, ``backend``, its ``source`` with the subdirectory), answered from the status of the pool
mount's server, which serves it, and ``gfuse_mount_pool{pool}`` 1 naming that pool mount's directory. What the
server counts for all of them together (FUSE requests, errors, latency, bytes, inodes, calls in flight) is the
pool mount's own series (``target`` its directory, ``bridge`` ``pool``), once: never repeated per PV, where a
``sum()`` would count it once per PV. ``gfuse_agent_mounts`` counts the PVs, ``gfuse_agent_pools`` the pool mounts.

Counters of a mount start again from 0 when a new serving process takes over (a repair, ``-o restartable``):
``rate()`` treats that as a counter reset.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from gfuse.status import query_status_async

if TYPE_CHECKING:
    from .agent import Agent
    from .state import MountRecord

log = logging.getLogger("gfuse.agent.metrics")

#: seconds one mount's status socket may take to answer a scrape
STATUS_TIMEOUT = 2.0
#: seconds a whole scrape may take gathering (mounts not answered by then are up 0)
SCRAPE_BUDGET = 8.0
#: status sockets asked at once
PARALLEL = 32
#: an HTTP request head larger than this, or slower than HEAD_TIMEOUT, is dropped
HEAD_LIMIT = 16384
HEAD_TIMEOUT = 10.0
MOUNT_LABELS = ("volume", "source", "target", "pod_uid", "bridge", "backend")
_POD_UID = re.compile(r"/pods/([0-9A-Za-z-]{1,64})/volumes/")


class AddressError(ValueError):
    """A ``--metrics-address`` that is not ``HOST:PORT``."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every interface) → (host, port); AddressError saying why."""
    host, sep, port_s = text.strip().rpartition(":")
    if not sep:
        raise AddressError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9840, or :9840 for every interface)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise AddressError(f"{text!r}: the port must be a number from 0 to 65535, not {port_s!r}")
    if any(c.isspace() or c in "/[]" for c in host):
        raise AddressError(f"{text!r}: {host!r} is not a host name or address")
    return host, int(port_s)


@dataclass
class MountSample:
    """What one scrape learnt about one mount: the agent's record and the serving process's status (None if
    it did not answer; ``error`` says why)."""

    labels: dict[str, str]
    healthy: bool
    repairs: int
    repair_failing: bool
    status: dict[str, Any] | None = None
    error: str = ""
    #: a pooled PV: the directory of the pool mount whose server serves it (its per-server series are the pool's)
    pool: str = ""
    #: the agent's pool mount itself (not an entry of its table)
    pool_mount: bool = False


@dataclass
class AgentSample:
    version: str
    health_passes: int
    mounts: list[MountSample] = field(default_factory=list)


def mount_labels(rec: MountRecord, volume: str = "") -> dict[str, str]:
    """The labels of a mount's series (see the module docstring) from its agent record."""
    ctx = rec.context or {}
    m = _POD_UID.search(rec.target)
    pod_uid = ctx.get("pod_uid") or (m.group(1) if m else "")
    vol_id = ctx.get("csi.volume_id", "")
    bridge = "csi" if vol_id or "csi.role" in ctx else ("flexvolume" if pod_uid else "")
    backend = vol_id.split(":", 1)[0] if vol_id.startswith(("subdir:", "volume:")) else ""
    if not volume:
        rest = rec.source.split(":/", 1)[-1] if ":/" in rec.source else ""
        volume = rest.strip("/").split("/", 1)[0]
    return {"volume": volume, "source": rec.source, "target": rec.target, "pod_uid": pod_uid, "bridge": bridge,
            "backend": backend}


async def gather(agent: Agent, version: str = "", timeout: float = STATUS_TIMEOUT,
                 budget: float = SCRAPE_BUDGET) -> AgentSample:
    """Ask every mount of the agent's table for its status, all at once, each bounded; a pool mount's server
    once for the pool and all its PVs."""
    records = list(agent.table.values())
    pools_obj = getattr(agent, "pools", None)
    pool_table: dict[str, MountRecord] = dict(getattr(pools_obj, "table", None) or {})
    health = dict(agent._health)
    repair_errors = dict(agent._repair_errors)

    def sample_of(rec: MountRecord, **kw: Any) -> MountSample:
        return MountSample(labels=mount_labels(rec), healthy=health.get(rec.target, ("", ""))[0] == "healthy",
                           repairs=rec.repairs, repair_failing=bool(repair_errors.get(rec.target)),
                           error="not asked: the scrape's time was up", **kw)

    samples = [sample_of(rec, pool=rec.pool if rec.pool in pool_table else "") for rec in records]
    pool_samples = {d: sample_of(rec, pool_mount=True) for d, rec in sorted(pool_table.items())}
    for ps in pool_samples.values():
        ps.labels["bridge"] = "pool"
    limiter = trio.CapacityLimiter(PARALLEL)

    async def ask(target: str, sample: MountSample) -> None:
        async with limiter:
            try:
                sample.status = await query_status_async(target, timeout)
                sample.error = ""
            except trio.TooSlowError:
                sample.error = f"its status socket did not answer within {timeout:g}s"
            except (OSError, ValueError) as e:
                sample.error = f"its status socket does not answer ({getattr(e, 'strerror', None) or e})"
        if sample.status is not None and isinstance(sample.status.get("volume"), str):
            sample.labels["volume"] = sample.status["volume"]

    with trio.move_on_after(budget):
        async with trio.open_nursery() as nursery:
            for rec, sample in zip(records, samples):
                if not sample.pool:
                    nursery.start_soon(ask, rec.target, sample)
            for pool_dir, ps in pool_samples.items():
                nursery.start_soon(ask, pool_dir, ps)
    for sample in samples:
        if sample.pool:  # served by its pool's server: what it answered (or why not)
            ps = pool_samples[sample.pool]
            sample.status, sample.error = ps.status, ps.error
            if ps.status is not None and isinstance(ps.status.get("volume"), str):
                sample.labels["volume"] = ps.status["volume"]
    return AgentSample(version=version, health_passes=agent.health_passes,
                       mounts=samples + list(pool_samples.values()))


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else 0.0


class MountCollector(Collector):
    """The series of one :class:`AgentSample` (prometheus_client calls :meth:`collect` while rendering)."""

    def __init__(self, sample: AgentSample) -> None:
        self.sample = sample

    def collect(self) -> Iterator[Metric]:
        s = self.sample
        L = list(MOUNT_LABELS)
        info = GaugeMetricFamily("gfuse_agent_info", "the gfuse node agent", labels=["version"])
        info.add_metric([s.version], 1)
        yield info
        yield GaugeMetricFamily("gfuse_agent_mounts", "mounts in the agent's table",
                                value=sum(1 for m in s.mounts if not m.pool_mount))
        yield GaugeMetricFamily("gfuse_agent_pools", "pool mounts serving subdir PVs (--pool-subdirs)",
                                value=sum(1 for m in s.mounts if m.pool_mount))
        yield CounterMetricFamily("gfuse_agent_health_passes", "health checks of every mount done",
                                  value=s.health_passes)

        up = GaugeMetricFamily("gfuse_mount_up", "1 if the mount's serving process answered its status socket",
                               labels=L)
        healthy = GaugeMetricFamily("gfuse_mount_healthy", "1 if the agent's last health check found the mount "
                                    "healthy", labels=L)
        repairs = CounterMetricFamily("gfuse_mount_repairs", "times the agent mounted it again after its serving "
                                      "process died", labels=L)
        failing = GaugeMetricFamily("gfuse_mount_repair_failing", "1 while the mount's repair keeps failing",
                                    labels=L)
        start = GaugeMetricFamily("gfuse_mount_start_time_seconds", "when the serving process started (Unix time)",
                                  labels=L)
        bricks = GaugeMetricFamily("gfuse_mount_bricks", "bricks of the mount's graph", labels=L)
        bricks_up = GaugeMetricFamily("gfuse_mount_bricks_up", "bricks of the mount's graph that are connected",
                                      labels=L)
        brick_up = GaugeMetricFamily("gfuse_brick_up", "1 if the brick is connected", labels=[*L, "brick",
                                                                                              "brick_name"])
        calls = GaugeMetricFamily("gfuse_mount_brick_calls_in_flight", "calls sent to bricks, not answered yet",
                                  labels=L)
        freqs = GaugeMetricFamily("gfuse_mount_fuse_requests_in_flight", "FUSE requests being answered", labels=L)
        inodes = GaugeMetricFamily("gfuse_mount_inodes", "inodes the kernel holds", labels=L)
        requests = CounterMetricFamily("gfuse_fuse_requests", "FUSE requests answered", labels=[*L, "op"])
        errors = CounterMetricFamily("gfuse_fuse_errors", "FUSE requests answered with an error",
                                     labels=[*L, "op", "errno"])
        latency = HistogramMetricFamily("gfuse_fuse_request_duration_seconds", "time to answer a FUSE request",
                                        labels=[*L, "op"])
        rbytes = CounterMetricFamily("gfuse_read_bytes", "bytes read through FUSE", labels=L)
        wbytes = CounterMetricFamily("gfuse_written_bytes", "bytes written through FUSE", labels=L)
        pool = GaugeMetricFamily("gfuse_mount_pool", "1: the PV is a bind of a subdirectory of the pool mount "
                                 "``pool``, whose server serves it", labels=[*L, "pool"])

        for m in s.mounts:
            lv = [m.labels[k] for k in MOUNT_LABELS]
            if m.pool:
                pool.add_metric([*lv, m.pool], 1)
            up.add_metric(lv, 1 if m.status is not None else 0)
            healthy.add_metric(lv, 1 if m.healthy else 0)
            repairs.add_metric(lv, m.repairs)
            failing.add_metric(lv, 1 if m.repair_failing else 0)
            st = m.status
            if st is None:
                continue
            start.add_metric(lv, _num(st.get("since")))
            blist = [b for b in st.get("bricks") or [] if isinstance(b, dict)]
            bricks.add_metric(lv, len(blist))
            bricks_up.add_metric(lv, sum(1 for b in blist if b.get("up")))
            for b in blist:
                brick_up.add_metric([*lv, str(b.get("brick", "")), str(b.get("name", ""))], 1 if b.get("up") else 0)
            if m.pool:
                continue  # what the server counts for all the pool's PVs is the pool mount's series, once
            calls.add_metric(lv, _num(st.get("pending_brick_calls")))
            freqs.add_metric(lv, _num(st.get("fuse_requests_in_flight")))
            inodes.add_metric(lv, _num(st.get("inodes")))
            fuse = st.get("fuse")
            if not isinstance(fuse, dict):
                continue  # a serving process older than these counters
            bounds = [floatToGoString(_num(b)) for b in fuse.get("latency_buckets") or []] + ["+Inf"]
            for op, c in sorted((fuse.get("ops") or {}).items()):
                if not isinstance(c, dict):
                    continue
                requests.add_metric([*lv, op], _num(c.get("requests")))
                counts = c.get("buckets") or []
                if len(counts) == len(bounds):
                    cumulative, total = [], 0.0
                    for le, n in zip(bounds, counts):
                        total += _num(n)
                        cumulative.append((le, total))
                    latency.add_metric([*lv, op], cumulative, _num(c.get("seconds")))
            for e in fuse.get("errors") or []:
                if isinstance(e, dict):
                    errors.add_metric([*lv, str(e.get("op", "")), str(e.get("errno", ""))], _num(e.get("count")))
            rbytes.add_metric(lv, _num(fuse.get("bytes_read")))
            wbytes.add_metric(lv, _num(fuse.get("bytes_written")))
        yield from (up, healthy, repairs, failing, start, bricks, bricks_up, brick_up, calls, freqs, inodes,
                    requests, errors, latency, rbytes, wbytes, pool)


def render(sample: AgentSample, accept: str = "", process: bool = True) -> tuple[bytes, str]:
    """The exposition of ``sample`` (and the agent process's own ``process_*`` series): (body, content type),
    in the format the scraper's Accept header asks (text 0.0.4, or OpenMetrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MountCollector(sample))
    if process:
        ProcessCollector(registry=registry)
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


# -- HTTP ---------------------------------------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > HEAD_LIMIT:
            return None
    return bytes(buf)


def _response(code: int, body: bytes, content_type: str = "text/plain; charset=utf-8", head_only: bool = False,
              extra: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"HTTP/1.1 {code} {_REASONS.get(code, '')}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


class MetricsServer:
    """``/metrics`` over HTTP/1.x for one agent: one request per connection, GET or HEAD. The agent binds
    (:meth:`listen`: a failure stops it from starting) and runs :meth:`serve` as a task of its nursery."""

    def __init__(self, agent: Agent, host: str, port: int, version: str = "") -> None:
        self.agent = agent
        self.host = host
        self.port = port
        self.version = version
        self.where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        #: scrapes rendered at once (each asks every mount); more wait
        self._scrapes = trio.CapacityLimiter(4)

    async def listen(self) -> list[trio.SocketListener]:
        """Bind ``host:port`` (every interface for an empty host); OSError if it cannot be."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host or None)
        port = listeners[0].socket.getsockname()[1]
        log.info("metrics on http://%s/metrics", f"{self.where.rpartition(':')[0]}:{port}")
        return listeners

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                head = None
                with trio.move_on_after(HEAD_TIMEOUT):
                    head = await _read_head(stream)
                if head is None:
                    return
                await stream.send_all(await self.answer(head))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # one bad request must not stop the server (nor the agent)
            log.exception("error answering a metrics request")

    async def answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").splitlines()
        parts = lines[0].split() if lines else []
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, b"bad request\n")
        method, target = parts[0], parts[1]
        headers = {}
        for ln in lines[1:]:
            k, sep, v = ln.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _response(405, b"only GET and HEAD\n", extra=[("Allow", "GET, HEAD")])
        path = target.split("?", 1)[0]
        if path == "/":
            return _response(200, b"gfuse node agent: metrics at /metrics\n", head_only=head_only)
        if path != "/metrics":
            return _response(404, b"not found: metrics are at /metrics\n", head_only=head_only)
        t0 = time.monotonic()
        async with self._scrapes:
            sample = await gather(self.agent, self.version)
            body, ctype = render(sample, headers.get("accept", ""))
        log.debug("metrics: %d mount(s) in %.3fs", len(sample.mounts), time.monotonic() - t0)
        return _response(200, body, ctype, head_only=head_only)
