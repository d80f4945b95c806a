"""Shared pytest fixtures: a real glusterd and real volumes on loopback (see testkit/cluster.py).

Tests live by what they need: ``unit/`` (nothing: codecs, translators on the in-memory brick, manifests),
``cluster/`` (glusterd and bricks on loopback, FUSE), ``k8s/`` (the node agent, FlexVolume, CSI and
provisioners, some on a three-node cluster), ``podman/`` (containers). Each test gets its directory's
marker: ``./scripts/test.sh unit`` runs the first in seconds, ``-m "not podman"`` leaves out the last.

Fixture names are stable; other test modules rely on them:

``glusterd`` (session)
    glusterd is running (started if needed) and stale volumes of dead earlier runs are gone.
    Gives a :class:`testkit.cluster.GlusterdProcess` (``pid``, ``host``, ``port``).
``vol_dist1``, ``vol_replica3``, ``vol_distrep`` (session)
    Started volumes (1 brick / replica 3 / 2 x 3), created on first use, deleted at session end
    even if tests fail. Shared by all tests of the session: after each test that used one, dead
    or SIGSTOPped bricks are brought back and options changed with ``Volume.set_option`` are
    restored. Files written stay: use unique paths (e.g. ``tmp_path.name``) in your tests.
``volume`` (function, parametrized)
    One of the three shared volumes; by default a test using it runs once per kind. Narrow it
    with ``@pytest.mark.parametrize("volume", ["replica3"], indirect=True)``.
``make_volume`` (function)
    Factory ``make_volume(kind="replica3", options=None, start=True) -> Volume`` for a private
    volume (a few seconds each), deleted when the test ends. Use it for destructive tests.
``native_mount`` (function)
    Factory ``native_mount(volume, mountpoint=None, options=()) -> NativeMount`` that mounts with
    the native client (``mount -t glusterfs``) and unmounts at the end of the test.

Tests that use any of these get the ``cluster`` marker (``native_mount`` also ``native``)
automatically, and are skipped with the reason when not root or GlusterFS is not installed.
With ``GFUSE_REQUIRE_CLUSTER=1`` (set by scripts/test.sh) they fail instead of skipping, so a
broken CI install cannot pass silently.
"""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from testkit import cluster as tc

KIND_NAMES = tc.SHARED_KINDS  # ("dist1", "replica3", "distrep"); "arbiter" only through make_volume
_SESSION_VOLUME_FIXTURES = tuple(f"vol_{k}" for k in KIND_NAMES)
_CLUSTER_FIXTURES = {
    "glusterd",
    "volume",
    "make_volume",
    "native_mount",
    *_SESSION_VOLUME_FIXTURES,
}
_NATIVE_FIXTURES = {"native_mount"}

# volumes created by the session fixtures, and the options they were created with
_session_volumes: dict[str, tuple[tc.Volume, dict[str, str]]] = {}
# private volumes of finished tests being deleted in the background (see make_volume)
_pending_deletes: list[tuple[str, concurrent.futures.Future[None]]] = []
_deleter_pool: list[concurrent.futures.ThreadPoolExecutor] = []


def _deleter() -> concurrent.futures.ThreadPoolExecutor:
    if not _deleter_pool:
        _deleter_pool.append(concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vol-delete"))
    return _deleter_pool[0]


#: kinds of private volume that are made one ahead, in the background, while tests run (most destructive
#: tests want a fresh started replica-3 volume with default options; making one costs 2-4 s)
SPARE_KINDS = ("replica3",)
_spares: dict[str, concurrent.futures.Future[tc.Volume]] = {}


def _make_spare(kind: str) -> None:
    if kind not in _spares:
        _spares[kind] = _deleter().submit(tc.create_volume, kind)


def _take_spare(kind: str) -> tc.Volume | None:
    """A fresh started volume of ``kind`` with default options made in advance, or None."""
    fut = _spares.pop(kind, None)
    if fut is None:
        return None
    try:
        return fut.result(timeout=120)
    except Exception as exc:  # noqa: BLE001 - the caller then makes one itself, as without spares
        warnings.warn(f"spare {kind} volume could not be made: {exc}", stacklevel=2)
        return None


def _drop_spares() -> None:
    """Unused spares are deleted like any private volume."""
    for kind in list(_spares):
        vol = _take_spare(kind)
        if vol is not None:
            _pending_deletes.append((vol.name, _deleter().submit(vol.delete)))


def _finish_deletes() -> list[str]:
    """Wait for the background deletions; the volumes that could not be deleted, with why."""
    errors = []
    for name, fut in _pending_deletes:
        try:
            fut.result(timeout=180)
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            errors.append(f"{name}: {exc}")
    _pending_deletes.clear()
    return errors


def _required() -> bool:
    return os.environ.get("GFUSE_REQUIRE_CLUSTER", "") not in ("", "0", "false", "no")


def pytest_report_header(config: pytest.Config) -> list[str]:
    reason = tc.unavailable_reason()
    state = f"unavailable ({reason})" if reason else "available"
    return [
        f"gluster test cluster: {state}; brick host {tc.BRICK_HOST}, state dir {tc.STATE_DIR}"
        + ("; required (GFUSE_REQUIRE_CLUSTER)" if _required() else "")
    ]


#: tests/<dir>/ → the marker every test there gets (what it needs to run)
DIR_MARKERS = ("unit", "cluster", "k8s", "podman")


def pytest_configure(config: pytest.Config) -> None:
    """Test modules are imported by their file name (tests/*/ have no __init__.py, and some import each
    other by name): two files of one name in different directories would stop the whole collection."""
    seen: dict[str, Path] = {}
    for path in sorted(Path(__file__).resolve().parent.glob("*/test_*.py")):
        if path.name in seen:
            raise pytest.UsageError(f"two test modules named {path.name}: {seen[path.name]} and {path}; "
                                    f"rename one (modules are imported by file name)")
        seen[path.name] = path


#: The slowest modules (seconds of test time on a quiet 2-core machine, from ``--junitxml`` of a full run at
#: e737562), run first: with two xdist workers taking whole modules (``--dist loadfile``) in collection order, a
#: long module taken last leaves the other worker idle at the end; started first, the many short modules fill
#: in behind it (longest first). Update when a module grows past these (any module not listed keeps its place).
SLOW_FIRST = (
    "cluster/test_replicate_integrity.py",  # 109 s
    "k8s/test_storage_backends.py",         # 79
    "cluster/test_mount_faults.py",         # 74
    "k8s/test_csi_backends.py",             # ~70
    "k8s/test_provisioner.py",              # 66
    "cluster/test_cache_coherence.py",      # 53
    "cluster/test_distribute_integrity.py",  # 55
    "cluster/test_mount_graph_switch.py",   # 54
    "k8s/test_agent.py",                    # 50
    "k8s/test_agent_takeover.py",           # 48
    "k8s/test_flexvolume_driver.py",        # 40
    "k8s/test_csi.py",                      # ~40
    "unit/test_replicate_property.py",      # 37 (one test)
    "cluster/test_mount_posix.py",          # 36
    "cluster/test_takeover.py",             # 28
    "unit/test_fuzz.py",                    # 31
    "podman/test_podman_converged.py",      # 29
    "k8s/test_multicluster.py",             # 29
)


def _slow_first(items: list[pytest.Item], here: Path) -> None:
    """Reorder ``items`` in place: the SLOW_FIRST modules in that order, then the rest as collected."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}

    def key(pair: tuple[int, pytest.Item]) -> tuple[int, int]:
        try:
            rel = Path(str(pair[1].fspath)).resolve().relative_to(here).as_posix()
        except ValueError:
            rel = ""
        return rank.get(rel, len(rank)), pair[0]
    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cluster_reason = tc.unavailable_reason()
    native_reason = tc.native_mount_unavailable_reason()
    here = Path(__file__).resolve().parent
    _slow_first(items, here)
    _collected.clear()
    _collected.update((item.nodeid, i) for i, item in enumerate(items))
    users = [i for i, item in enumerate(items) if set(getattr(item, "fixturenames", ())) & _VOLUME_USERS]
    _last_volume_user[0] = max(users, default=-1)
    for item in items:
        try:
            top = Path(str(item.fspath)).resolve().relative_to(here).parts[0]
        except (ValueError, IndexError):
            top = ""
        if top in DIR_MARKERS:
            item.add_marker(getattr(pytest.mark, top))
        names = set(getattr(item, "fixturenames", ()))
        if names & _CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if names & _NATIVE_FIXTURES:
            item.add_marker(pytest.mark.native)
        if _required():
            continue  # the fixtures raise a clear error instead
        if item.get_closest_marker("native") and native_reason:
            item.add_marker(pytest.mark.skip(reason=f"native glusterfs mount: {native_reason}"))
        elif item.get_closest_marker("cluster") and cluster_reason:
            item.add_marker(pytest.mark.skip(reason=f"real GlusterFS: {cluster_reason}"))


# ------------------------------------------------------------------------------------------
# glusterd and the shared volumes


@pytest.fixture(scope="session")
def glusterd() -> Iterator[tc.GlusterdProcess]:
    """glusterd is running; volumes of dead earlier test runs are deleted (ours only)."""
    reason = tc.unavailable_reason()
    if reason:
        if _required():
            pytest.fail(f"GFUSE_REQUIRE_CLUSTER is set but: {reason}", pytrace=False)
        pytest.skip(f"real GlusterFS: {reason}")
    gd = tc.ensure_glusterd()
    try:
        tc.cleanup_stale()
    except tc.GlusterError as exc:  # leftovers of dead runs must not stop this run
        warnings.warn(f"cleanup of stale test volumes failed: {exc}", stacklevel=1)
    try:
        yield gd
    finally:
        _drop_spares()
        delete_errors = _finish_deletes()
        # belt and braces: the volume fixtures delete their own volumes; this catches any left
        for vol, _ in list(_session_volumes.values()):
            try:
                vol.delete()
            except tc.GlusterError:
                pass
        _session_volumes.clear()
        if delete_errors:
            pytest.fail("private volumes not deleted: " + "; ".join(delete_errors), pytrace=False)


def _session_volume(kind: str) -> Iterator[tc.Volume]:
    vol = tc.create_volume(kind)
    _session_volumes[kind] = (vol, dict(vol.options))
    try:
        yield vol
    finally:
        _session_volumes.pop(kind, None)
        if vol.name not in _released_early:
            vol.delete()


#: The shared volumes and the spare are deleted (in the background) as soon as this process starts a test
#: collected after the last one that can use them: xdist hands a worker whole modules in collection order, so
#: none comes later, and the deletions (3 s of glusterd's time each, one after the other) overlap the tests
#: left instead of all waiting at the session's end (25-28 s per worker at 53ea4cd).
_collected: dict[str, int] = {}
_last_volume_user: list[int] = [-1]
_released_early: set[str] = set()
_VOLUME_USERS = {*_SESSION_VOLUME_FIXTURES, "volume", "make_volume"}


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _released_early or _collected.get(item.nodeid, -1) <= _last_volume_user[0]:
        return
    _released_early.add("")  # once
    for kind, (vol, _baseline) in list(_session_volumes.items()):
        _session_volumes.pop(kind, None)
        _released_early.add(vol.name)
        vol.release()
        _pending_deletes.append((vol.name, _deleter().submit(vol.delete)))
    _drop_spares()


@pytest.fixture(scope="session")
def vol_dist1(glusterd: tc.GlusterdProcess) -> Iterator[tc.Volume]:
    """A started 1-brick distribute volume, shared by the session."""
    yield from _session_volume("dist1")


@pytest.fixture(scope="session")
def vol_replica3(glusterd: tc.GlusterdProcess) -> Iterator[tc.Volume]:
    """A started replica-3 volume (bricks 0-2 form one replica set), shared by the session."""
    yield from _session_volume("replica3")


@pytest.fixture(scope="session")
def vol_distrep(glusterd: tc.GlusterdProcess) -> Iterator[tc.Volume]:
    """A started 2 x 3 distributed-replicate volume (sets: bricks 0-2 and 3-5), shared."""
    yield from _session_volume("distrep")


def _restore(vol: tc.Volume, baseline: dict[str, str]) -> None:
    vol.ensure_online()
    if vol.options != baseline:
        for key in set(vol.options) - set(baseline):
            vol.reset_option(key)
        for key, value in baseline.items():
            if vol.options.get(key) != value:
                vol.set_option(key, value)


@pytest.fixture(autouse=True)
def _restore_session_volumes() -> Iterator[None]:
    """After each test: shared volumes get their bricks back online and their options back."""
    yield
    for vol, baseline in list(_session_volumes.values()):
        _restore(vol, baseline)


@pytest.fixture(params=KIND_NAMES)
def volume(request: pytest.FixtureRequest) -> tc.Volume:
    """One shared volume per kind (indirect-parametrize with a kind name to choose)."""
    kind = request.param
    if kind not in tc.KINDS:
        raise ValueError(f"volume fixture: unknown kind {kind!r}; choose from {KIND_NAMES}")
    return request.getfixturevalue(f"vol_{kind}")


@pytest.fixture
def make_volume(glusterd: tc.GlusterdProcess) -> Iterator[Callable[..., tc.Volume]]:
    """Factory for private volumes, deleted at the end of the test."""
    made: list[tc.Volume] = []

    def factory(
        kind: str = "replica3",
        options: dict[str, str | int | bool] | None = None,
        start: bool = True,
    ) -> tc.Volume:
        vol = _take_spare(kind) if options is None and start else None
        if vol is None:
            vol = tc.create_volume(kind, options=options, start=start)
        made.append(vol)
        if kind in SPARE_KINDS and options is None and start:
            _make_spare(kind)  # the next test asking for one gets it made already
        return vol

    try:
        yield factory
    finally:
        # unmounted now; stopped and deleted by one background thread while the next test runs
        # (a stop + delete costs 3-5 s of glusterd's time and no test waits for it); the session's end
        # waits for every deletion and fails if one did not happen
        for vol in reversed(made):
            vol.release()
            _pending_deletes.append((vol.name, _deleter().submit(vol.delete)))


def _mounts(kind: type[tc.NativeMount]) -> Iterator[Callable[..., tc.NativeMount]]:
    """A factory of mounts of ``kind``, all unmounted (and their servers reaped) when the test ends."""
    mounts: list[tc.NativeMount] = []

    def factory(
        volume: tc.Volume | str,
        mountpoint: str | Path | None = None,
        options: Sequence[str] = (),
    ) -> tc.NativeMount:
        m = kind(volume, mountpoint, options=options)
        m.mount()
        mounts.append(m)
        return m

    try:
        yield factory
    finally:
        for m in reversed(mounts):
            m.unmount()


@pytest.fixture
def native_mount(glusterd: tc.GlusterdProcess) -> Iterator[Callable[..., tc.NativeMount]]:
    """Factory: mount a volume with the native glusterfs client; unmounted after the test."""
    reason = tc.native_mount_unavailable_reason()
    if reason:
        if _required():
            pytest.fail(f"GFUSE_REQUIRE_CLUSTER is set but: {reason}", pytrace=False)
        pytest.skip(f"native glusterfs mount: {reason}")
    yield from _mounts(tc.NativeMount)


@pytest.fixture
def gfuse_mount(glusterd: tc.GlusterdProcess) -> Iterator[Callable[..., tc.NativeMount]]:
    """Factory: mount a volume with gfuse (daemonized, as users do); unmounted and reaped after the test."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    yield from _mounts(tc.GfuseMount)
