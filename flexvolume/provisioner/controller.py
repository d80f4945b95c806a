"""The FlexVolume provisioner controller: PVCs of our StorageClasses in, PVs with a flexVolume source out.

What it does
------------
**Provisioning.** A PVC is ours when its StorageClass (``spec.storageClassName``, or the old
``volume.beta.kubernetes.io/storage-class`` annotation) has ``provisioner: gfuse.example.org/gfuse``.
It is provisioned only once the PV controller (kube-controller-manager) has said so, as
sig-storage-lib-external-provisioner decides (``shouldProvision``): the claim carries the annotation
``volume.kubernetes.io/storage-provisioner`` (or, if that one is absent, the older
``volume.beta.kubernetes.io/storage-provisioner``) naming this provisioner. The PV controller first tries
to bind the claim to an existing matching PV and sets that annotation only when none matches: provisioning
on the class alone would race it and make a second PV for a claim it is binding to an existing one. When
such a claim is Pending with no ``spec.volumeName`` (and, for ``WaitForFirstConsumer`` classes, while
``volume.kubernetes.io/selected-node`` is set), and its class still names this provisioner, the controller

1. names the volume ``pvc-<claim uid>`` (uids are unique, so two claims never collide and a retry
   finds what an earlier attempt made);
2. adds the finalizer ``gfuse.example.org/provisioner`` to the claim, together with the class
   parameters as the annotation ``gfuse.example.org/parameters`` (one write, guarded by the claim's
   resourceVersion) — so a claim deleted while its volume is half made cannot vanish before the
   controller cleans up, even if the StorageClass is gone by then;
3. calls ``backend.create(name, size, parameters)`` (idempotent per name);
4. creates the PV: ``capacity`` (what the backend made), the claim's ``accessModes``,
   ``persistentVolumeReclaimPolicy`` from the class (default Delete), ``storageClassName``,
   ``volumeMode: Filesystem``, a ``claimRef`` with the claim's uid
   and resourceVersion (the PV controller then binds exactly this claim), the annotation
   ``pv.kubernetes.io/provisioned-by: gfuse.example.org/gfuse`` and the label
   ``app.kubernetes.io/managed-by: gfuse-provisioner``, and the source::

       flexVolume:
         driver: gfuse.example.org/gfuse
         options: {volume: "server:/vol[/subdir]", backupServers: "h2:h3", readOnly: "false",
                   mountOptions: "..."}   # mountOptions: the class parameter plus the class's mountOptions

   The class's ``mountOptions`` go into the flexVolume options, never into the PV's ``spec.mountOptions``:
   kubelet refuses to mount a FlexVolume PV that has any ("Mount options are not supported for this
   volume type", ``checkMountOptionSupport``), and the gfuse driver reads them from its options.
   With ``pv_finalizer`` (``--pv-finalizer``, the default) PVs with reclaim policy Delete also get the
   finalizer ``gfuse.example.org/provisioner``, so a PV deleted by hand still has its storage removed
   first. Without it (``--no-pv-finalizer``) new PVs get none and the controller removes it from the
   PVs of ours that have it (the way to uninstall: daemonset/README.md) — a PV then deleted by hand
   while Bound leaves its storage behind;
5. removes the claim's finalizer and records ``ProvisioningSucceeded`` on the claim.

Every failure is an Event on the claim (``ProvisioningFailed`` with the :class:`StorageError`'s
message, or what else went wrong) and a retry with exponential backoff: a claim of ours is never
silently Pending. Claims we cannot serve (``volumeMode: Block``, a data source, a selector) get a
``ProvisioningFailed`` event saying why.

**Crash safety.** Each step is idempotent and finds the earlier steps' results: killed after
``backend.create`` → on restart the claim is still Pending, ``create`` returns the same volume and
the PV is created once; killed after creating the PV → the claim is bound and the leftover
finalizer is removed; claim deleted meanwhile → the finalizer keeps it until the controller has
called ``backend.delete`` (no PV) or seen the PV (which the PV controller then releases).

**Deletion.** A PV of ours that is ``Released`` with reclaim policy ``Delete``: ``backend.delete``
(idempotent), remove the PV's finalizer, delete the PV (with its uid as precondition). Killed in
between → the PV is still Released on restart and the steps are repeated. ``Retain``: nothing is
done; the data stays. A PV of ours deleted by hand (``deletionTimestamp`` and our finalizer): the
storage is deleted if the policy is Delete, then the finalizer is removed. Backend and parameters
for deletion come from the PV's ``gfuse.example.org/parameters`` annotation, not the class, which
may have changed or be gone.

**Expansion.** When a bound claim's ``spec.resources.requests.storage`` rises above its PV's
capacity and the class has ``allowVolumeExpansion: true``: ``backend.expand`` (which raises the
quota online), then the PV's ``spec.capacity``, then the claim's ``status.capacity``. **The
controller owns the claim's status.capacity after expansion** — as ``csi-resizer`` does for
drivers that need no node-side step: a quota'd directory or gluster volume needs no filesystem
resize on the node, and there is no in-tree resizer for FlexVolume PVs of an external provisioner.
A claim whose status capacity is below its PV's (crash between the two writes) is brought up to
it. Without ``allowVolumeExpansion`` a ``VolumeResizeFailed`` event says so.

API machinery
-------------
Informers list and watch PVCs (all namespaces), PVs and StorageClasses into caches; a watch that
ends (its ``timeoutSeconds``) is resumed from the last resourceVersion seen; a ``410 Gone`` (the
version was compacted) or any other error re-lists and resumes from the list's resourceVersion.
Events feed a work queue (one key is never worked on by two workers at once; failures are retried
with exponential backoff); every ``resync_period`` all cached objects are queued again. Decisions
are made on a fresh GET; every write carries the resourceVersion it was based on, and a 409
Conflict re-reads and retries. Before each write and each backend call the controller checks
``is_leader()`` (see :mod:`.leader`): a replica that lost its Lease stops acting.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import heapq
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from gfuse.options import parse_bool, split_options

from ..kubeevents import EventRecorder, api_body
from ..storage.api import Backend, ProvisionedVolume, StorageError

log = logging.getLogger(__name__)

PROVISIONER = "gfuse.example.org/gfuse"
DRIVER = "gfuse.example.org/gfuse"
FINALIZER = "gfuse.example.org/provisioner"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
ANN_PARAMETERS = "gfuse.example.org/parameters"
ANN_BACKEND = "gfuse.example.org/backend"
ANN_IDENTITY = "gfuse.example.org/provisioner-identity"
ANN_CLAIM = "gfuse.example.org/claim"
ANN_BETA_CLASS = "volume.beta.kubernetes.io/storage-class"
#: set on a claim by the PV controller once it decided that an external provisioner must make its volume
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "gfuse-provisioner"
MERGE_PATCH = "application/merge-patch+json"

#: a backend for a StorageClass's parameters (``flexvolume.storage.backends.backend_for``)
BackendFactory = Callable[[Mapping[str, str]], Backend]
#: StorageClass parameters for the PV's flexVolume options, not for the backend
CONTROLLER_PARAMETERS = frozenset({"mountOptions", "readOnly"})


def backend_parameters(params: Mapping[str, str]) -> dict[str, str]:
    """The StorageClass parameters the backend gets (all but :data:`CONTROLLER_PARAMETERS`)."""
    return {k: v for k, v in params.items() if k not in CONTROLLER_PARAMETERS}


# ------------------------------------------------------------------------------------------------
# small helpers


class NotLeader(Exception):
    """This replica does not (or no longer) hold the Lease: do nothing, try again later."""


class Retry(Exception):
    """A transient failure (conflicts that did not settle, an API error): retry with backoff, no event."""


class ClaimError(Exception):
    """A claim cannot be provisioned as it is: event on the claim, no fast retry (the spec must change)."""


def parse_size(value: Any) -> int:
    """A Kubernetes quantity in bytes, rounded up."""
    from kubernetes.utils import parse_quantity

    q = parse_quantity(value)
    return int(math.ceil(Decimal(q)))


def format_size(n: int) -> str:
    """Bytes as a quantity: the largest binary unit that divides it exactly (1Gi, 1536Mi, 1000)."""
    for suffix, power in (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if n and n % (1 << power) == 0:
            return f"{n >> power}{suffix}"
    return str(n)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


# ------------------------------------------------------------------------------------------------
# work queue


class WorkQueue:
    """client-go's rate-limited work queue, small: a key is queued once however often it is added,
    and never handed to two workers at once (added while in work → queued again when done)."""

    def __init__(self, base_delay: float = 1.0, max_delay: float = 300.0) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[Any] = collections.deque()
        self._dirty: set[Any] = set()
        self._processing: set[Any] = set()
        self._delayed: list[tuple[float, int, Any]] = []
        self._seq = 0
        self._failures: dict[Any, int] = {}
        self._shutdown = False
        self.base_delay = base_delay
        self.max_delay = max_delay

    def add(self, item: Any) -> None:
        with self._cond:
            if self._shutdown or item in self._dirty:
                return
            self._dirty.add(item)
            if item not in self._processing:
                self._queue.append(item)
                self._cond.notify()

    def add_after(self, item: Any, delay: float) -> None:
        if delay <= 0:
            self.add(item)
            return
        with self._cond:
            self._seq += 1
            heapq.heappush(self._delayed, (time.monotonic() + delay, self._seq, item))
            self._cond.notify()

    def add_rate_limited(self, item: Any) -> float:
        with self._cond:
            n = self._failures.get(item, 0)
            self._failures[item] = n + 1
        delay = min(self.max_delay, self.base_delay * (2 ** n))
        self.add_after(item, delay)
        return delay

    def forget(self, item: Any) -> None:
        with self._cond:
            self._failures.pop(item, None)

    def get(self, timeout: float) -> Any:
        """The next item (mark it done with :meth:`done`), or None after ``timeout`` or on shutdown."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    _, _, item = heapq.heappop(self._delayed)
                    if item not in self._dirty:
                        self._dirty.add(item)
                        if item not in self._processing:
                            self._queue.append(item)
                if self._shutdown:
                    return None
                if self._queue:
                    item = self._queue.popleft()
                    self._dirty.discard(item)
                    self._processing.add(item)
                    return item
                left = deadline - now
                if left <= 0:
                    return None
                if self._delayed:
                    left = min(left, self._delayed[0][0] - now)
                self._cond.wait(max(left, 0.001))

    def done(self, item: Any) -> None:
        with self._cond:
            self._processing.discard(item)
            if item in self._dirty:
                self._queue.append(item)
                self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._delayed)


# ------------------------------------------------------------------------------------------------
# informer


class Informer:
    """List + watch one kind into a cache of raw dicts; calls ``on_change(key, old, new)``."""

    def __init__(self, name: str, api_client: Any, list_fn: Callable[..., Any], key_fn: Callable[[dict], str],
                 on_change: Callable[[str, dict | None, dict | None], None], stop: threading.Event,
                 watch_timeout: float = 300.0, error_backoff: float = 1.0) -> None:
        self.name = name
        self._api = api_client
        self._list_fn = list_fn
        self._key = key_fn
        self._on_change = on_change
        self._stop = stop
        self.watch_timeout = max(1, int(watch_timeout))
        self.error_backoff = error_backoff
        self.cache: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self.resource_version = ""
        self.relists = 0
        self._watch: watch.Watch | None = None

    def get(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            return self.cache.get(key)

    def items(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.cache.values())

    def stop_watch(self) -> None:
        w = self._watch
        if w is not None:
            with contextlib.suppress(Exception):
                w.stop()

    def run(self) -> None:
        backoff = self.error_backoff
        while not self._stop.is_set():
            try:
                self._list()
                backoff = self.error_backoff
                while not self._stop.is_set():
                    self._watch_once()
            except ApiException as e:
                if e.status == 410:
                    log.info("%s: watch from resourceVersion %s expired (410 Gone): listing again", self.name,
                             self.resource_version)
                    continue
                log.warning("%s: list/watch failed: %s %s; listing again in %.1fs", self.name, e.status,
                            e.reason, backoff)
            except Exception as e:  # noqa: BLE001 - connection errors, read timeouts: list again
                if self._stop.is_set():
                    break
                log.warning("%s: list/watch failed: %s: %s; listing again in %.1fs", self.name,
                            type(e).__name__, e, backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def _list(self) -> None:
        result = self._list_fn(_request_timeout=(10, 60))
        items = [self._api.sanitize_for_serialization(i) for i in (result.items or [])]
        fresh = {self._key(o): o for o in items}
        with self.lock:
            old = self.cache
            self.cache = fresh
            self.resource_version = result.metadata.resource_version or ""
            self.relists += 1
        for key, obj in fresh.items():
            self._on_change(key, old.get(key), obj)
        for key in set(old) - set(fresh):
            self._on_change(key, old[key], None)
        self.synced.set()
        log.debug("%s: listed %d at resourceVersion %s", self.name, len(fresh), self.resource_version)

    def _watch_once(self) -> None:
        w = watch.Watch()
        self._watch = w
        try:
            for event in w.stream(self._list_fn, resource_version=self.resource_version,
                                  timeout_seconds=self.watch_timeout, allow_watch_bookmarks=True,
                                  _request_timeout=(10, self.watch_timeout + 30)):
                if self._stop.is_set():
                    break
                kind = event.get("type")
                obj = event.get("raw_object")
                if not isinstance(obj, dict):
                    continue
                rv = _meta(obj).get("resourceVersion")
                if kind == "BOOKMARK":
                    if rv:
                        self.resource_version = rv
                    continue
                key = self._key(obj)
                with self.lock:
                    old = self.cache.get(key)
                    if kind == "DELETED":
                        self.cache.pop(key, None)
                    else:
                        self.cache[key] = obj
                    if rv:
                        self.resource_version = rv
                self._on_change(key, old, None if kind == "DELETED" else obj)
        finally:
            self._watch = None


# ------------------------------------------------------------------------------------------------
# the controller


class Controller:
    """The provisioner. ``run(stop)`` blocks until ``stop`` is set.

    ``backend_for(parameters)`` gives the storage backend for a StorageClass's parameters (one
    instance is kept per distinct parameter set). ``is_leader()`` is asked before every write and
    backend call; the default (always) suits a single replica without leader election.
    """

    def __init__(self, api_client: Any, backend_for: BackendFactory, *, provisioner: str = PROVISIONER,
                 identity: str = "gfuse-provisioner", is_leader: Callable[[], bool] = lambda: True,
                 resync_period: float = 300.0, watch_timeout: float = 300.0, workers: int = 4,
                 retry_base: float = 1.0, retry_max: float = 300.0, pv_finalizer: bool = True) -> None:
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.storage = client.StorageV1Api(api_client)
        self.backend_for = backend_for
        self.provisioner = provisioner
        self.identity = identity
        self.is_leader = is_leader
        self.pv_finalizer = pv_finalizer
        self.resync_period = resync_period
        self.watch_timeout = watch_timeout
        self.workers = max(1, workers)
        self.queue = WorkQueue(retry_base, retry_max)
        self._stop = threading.Event()
        self._backends: dict[str, Backend] = {}
        self._backends_lock = threading.Lock()
        self._volume_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._volume_locks_lock = threading.Lock()
        self.recorder = EventRecorder(api_client, provisioner, identity)
        self.claims = Informer("claims", api_client, self.core.list_persistent_volume_claim_for_all_namespaces,
                               lambda o: f"{_meta(o).get('namespace', '')}/{_meta(o)['name']}", self._claim_changed,
                               self._stop, watch_timeout)
        self.volumes = Informer("volumes", api_client, self.core.list_persistent_volume,
                                lambda o: _meta(o)["name"], self._volume_changed, self._stop, watch_timeout)
        self.classes = Informer("classes", api_client, self.storage.list_storage_class,
                                lambda o: _meta(o)["name"], self._class_changed, self._stop, watch_timeout)
        self._threads: list[threading.Thread] = []

    # -------------------------------------------------------------------------------- running

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; then stop the informers and workers (bounded) and return."""
        log.info("provisioner %s (%s): starting", self.provisioner, self.identity)
        self._stop.clear()
        self.queue = WorkQueue(self.queue.base_delay, self.queue.max_delay)
        for inf in (self.classes, self.claims, self.volumes):
            t = threading.Thread(target=inf.run, name=f"informer-{inf.name}", daemon=True)
            t.start()
            self._threads.append(t)
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        next_resync = time.monotonic() + self.resync_period
        try:
            while not stop.wait(min(1.0, max(0.05, next_resync - time.monotonic()))):
                if time.monotonic() >= next_resync:
                    self.resync()
                    next_resync = time.monotonic() + self.resync_period
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self._stop.set()
        self.queue.shutdown()
        for inf in (self.classes, self.claims, self.volumes):
            inf.stop_watch()
        deadline = time.monotonic() + 10
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        with self._backends_lock:
            backends, self._backends = list(self._backends.values()), {}
        for b in backends:
            close = getattr(b, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        log.info("provisioner %s (%s): stopped", self.provisioner, self.identity)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(inf.synced.wait(max(0.0, deadline - time.monotonic()))
                   for inf in (self.classes, self.claims, self.volumes))

    def resync(self) -> None:
        """Queue every cached claim and volume again (periodic resync)."""
        for key in [f"{_meta(o).get('namespace', '')}/{_meta(o)['name']}" for o in self.claims.items()]:
            self.queue.add(("claim", key))
        for key in [_meta(o)["name"] for o in self.volumes.items()]:
            self.queue.add(("volume", key))

    # -------------------------------------------------------------------------------- informer callbacks

    def _claim_changed(self, key: str, old: dict | None, new: dict | None) -> None:
        if new is not None:
            self.queue.add(("claim", key))

    def _volume_changed(self, key: str, old: dict | None, new: dict | None) -> None:
        obj = new or old or {}
        if new is not None:
            self.queue.add(("volume", key))
        ref = (obj.get("spec") or {}).get("claimRef") or {}
        if ref.get("name"):
            self.queue.add(("claim", f"{ref.get('namespace', '')}/{ref['name']}"))

    def _class_changed(self, key: str, old: dict | None, new: dict | None) -> None:
        if new is None or new.get("provisioner") != self.provisioner:
            return
        for claim in self.claims.items():
            if self._class_name(claim) == key:
                self.queue.add(("claim", f"{_meta(claim).get('namespace', '')}/{_meta(claim)['name']}"))

    # -------------------------------------------------------------------------------- workers

    def _worker(self) -> None:
        while not self._stop.is_set():
            item = self.queue.get(timeout=1.0)
            if item is None:
                continue
            try:
                kind, key = item
                if kind == "claim":
                    self.sync_claim(key)
                else:
                    self.sync_volume(key)
                self.queue.forget(item)
            except NotLeader:
                self.queue.add_after(item, 1.0)
            except Exception as e:  # every failure is retried with backoff
                delay = self.queue.add_rate_limited(item)
                if isinstance(e, (Retry, StorageError, ClaimError)):
                    log.warning("%s %s: %s (retry in %.1fs)", kind, key, e, delay)
                elif isinstance(e, ApiException):
                    log.warning("%s %s: the API server answered %s %s: %s (retry in %.1fs)", kind, key, e.status,
                                e.reason, _api_message(e), delay)
                elif isinstance(e, urllib3.exceptions.HTTPError):
                    log.warning("%s %s: API server connection: %s (retry in %.1fs)", kind, key, e, delay)
                else:
                    log.exception("%s %s failed (retry in %.1fs)", kind, key, delay)
            finally:
                self.queue.done(item)

    def _check_leader(self) -> None:
        if self._stop.is_set() or not self.is_leader():
            raise NotLeader()

    # -------------------------------------------------------------------------------- reads

    def _class_name(self, claim: Mapping[str, Any]) -> str:
        ann = _meta(claim).get("annotations") or {}
        return (claim.get("spec") or {}).get("storageClassName") or ann.get(ANN_BETA_CLASS) or ""

    def _get_class(self, name: str) -> dict[str, Any] | None:
        if not name:
            return None
        sc = self.classes.get(name)
        if sc is not None:
            return sc
        try:
            return self.api.sanitize_for_serialization(self.storage.read_storage_class(name, _request_timeout=30))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _read_claim(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api.sanitize_for_serialization(
                self.core.read_namespaced_persistent_volume_claim(name, ns, _request_timeout=30))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _read_volume(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.sanitize_for_serialization(self.core.read_persistent_volume(name, _request_timeout=30))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _ours(self, pv: Mapping[str, Any]) -> bool:
        return (_meta(pv).get("annotations") or {}).get(ANN_PROVISIONED_BY) == self.provisioner

    # -------------------------------------------------------------------------------- backends

    def backend(self, params: Mapping[str, str]) -> Backend:
        params = backend_parameters(params)
        key = json.dumps(params, sort_keys=True)
        with self._backends_lock:
            b = self._backends.get(key)
            if b is None:
                b = self.backend_for(params)
                self._backends[key] = b
            return b

    @contextlib.contextmanager
    def _volume_lock(self, name: str) -> Any:
        with self._volume_locks_lock:
            lock = self._volume_locks[name]
        with lock:
            yield

    # -------------------------------------------------------------------------------- writes

    def _patch(self, kind: str, ns: str, name: str, mutate: Callable[[dict[str, Any]], dict[str, Any] | None],
               status: bool = False) -> dict[str, Any] | None:
        """Read fresh, ``mutate(obj)`` → a merge patch (or None: nothing to do), write it with the
        object's resourceVersion; on 409 read again and retry. Returns the object after, or None if it
        is gone."""
        read = self._read_claim if kind == "claim" else (lambda _ns, n: self._read_volume(n))
        for _ in range(8):
            obj = read(ns, name)
            if obj is None:
                return None
            patch = mutate(obj)
            if not patch:
                return obj
            patch.setdefault("metadata", {})["resourceVersion"] = _meta(obj)["resourceVersion"]
            self._check_leader()
            try:
                if kind == "claim":
                    patch_claim = (self.core.patch_namespaced_persistent_volume_claim_status if status
                                   else self.core.patch_namespaced_persistent_volume_claim)
                    out: object = patch_claim(name, ns, patch, _content_type=MERGE_PATCH, _request_timeout=30)
                else:
                    patch_pv = self.core.patch_persistent_volume_status if status else self.core.patch_persistent_volume
                    out = patch_pv(name, patch, _content_type=MERGE_PATCH, _request_timeout=30)
                return self.api.sanitize_for_serialization(out)
            except ApiException as e:
                if e.status == 409:
                    log.debug("%s %s/%s: conflict, reading again", kind, ns, name)
                    continue
                if e.status == 404:
                    return None
                raise
        raise Retry(f"{kind} {ns}/{name}: the object kept changing under our writes (409 Conflict)")

    def _set_finalizer(self, kind: str, ns: str, name: str, present: bool,
                       annotations: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        def mutate(obj: dict[str, Any]) -> dict[str, Any] | None:
            meta = _meta(obj)
            fins = list(meta.get("finalizers") or [])
            patch: dict[str, Any] = {"metadata": {}}
            if present and FINALIZER not in fins:
                if meta.get("deletionTimestamp"):
                    return None  # being deleted: no new finalizers
                patch["metadata"]["finalizers"] = fins + [FINALIZER]
            elif not present and FINALIZER in fins:
                patch["metadata"]["finalizers"] = [f for f in fins if f != FINALIZER]
            have = meta.get("annotations") or {}
            extra = {k: v for k, v in (annotations or {}).items() if have.get(k) != v}
            if extra and not meta.get("deletionTimestamp"):
                patch["metadata"]["annotations"] = extra
            return patch if patch["metadata"] else None

        return self._patch(kind, ns, name, mutate)

    def event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Record a core/v1 Event about ``obj`` (repeats of the same one bump its count), as the leader."""
        meta = _meta(obj)
        kind = obj.get("kind") or ("PersistentVolumeClaim" if meta.get("namespace") else "PersistentVolume")
        try:
            self._check_leader()
        except NotLeader:
            pass
        else:
            self.recorder.record({"kind": kind, "name": meta.get("name"), "namespace": meta.get("namespace"),
                                  "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
                                 type_, reason, message)
        if type_ == "Warning":
            log.warning("%s %s/%s: %s", reason, meta.get("namespace", ""), meta.get("name"), message)
        else:
            log.info("%s %s/%s: %s", reason, meta.get("namespace", ""), meta.get("name"), message)

    # -------------------------------------------------------------------------------- claims

    def sync_claim(self, key: str) -> None:
        ns, _, name = key.partition("/")
        cached = self.claims.get(key)
        if cached is None:
            return
        sc_name = self._class_name(cached)
        fins = _meta(cached).get("finalizers") or []
        sc = self._get_class(sc_name)
        if FINALIZER not in fins and (sc is None or sc.get("provisioner") != self.provisioner):
            return  # not ours
        if self._settled(cached):
            return  # bound, nothing to expand: no API calls (resyncs of many claims stay cheap)
        claim = self._read_claim(ns, name)
        if claim is None:
            return
        meta = _meta(claim)
        spec = claim.get("spec") or {}
        if meta.get("deletionTimestamp"):
            if FINALIZER in (meta.get("finalizers") or []):
                self._finish_deleted_claim(claim)
            return
        if spec.get("volumeName"):
            self._sync_bound_claim(claim, sc)
            return
        if (claim.get("status") or {}).get("phase", "Pending") != "Pending":
            return
        if sc is None or sc.get("provisioner") != self.provisioner:
            return  # our finalizer on a claim whose class is gone: cleaned up when it is deleted
        if not self._asked_to_provision(claim):
            return  # the PV controller may still bind an existing PV: it annotates the claim when none fits
        if sc.get("volumeBindingMode") == "WaitForFirstConsumer" and not (meta.get("annotations") or {}).get(
                ANN_SELECTED_NODE):
            return  # the scheduler has not picked a node yet (or took its pick back)
        try:
            self._provision(claim, sc)
        except NotLeader:
            raise
        except Retry:
            raise
        except StorageError as e:
            self.event(claim, "Warning", "ProvisioningFailed",
                       f"failed to provision volume with StorageClass \"{_meta(sc)['name']}\": {e.message}")
            raise
        except ClaimError as e:
            self.event(claim, "Warning", "ProvisioningFailed", str(e))
            return  # the claim must change first (spec is immutable): resync repeats the event
        except ApiException as e:
            if e.status in (409, 404):
                raise Retry(f"{e.status} {e.reason}") from None
            self.event(claim, "Warning", "ProvisioningFailed",
                       f"failed to provision volume with StorageClass \"{_meta(sc)['name']}\": "
                       f"the API server answered {e.status} {e.reason}: {_api_message(e)}")
            raise
        except Exception as e:
            self.event(claim, "Warning", "ProvisioningFailed",
                       f"failed to provision volume with StorageClass \"{_meta(sc)['name']}\": "
                       f"{type(e).__name__}: {e}")
            raise

    def _asked_to_provision(self, claim: Mapping[str, Any]) -> bool:
        """The PV controller asked for this provisioner: ``volume.kubernetes.io/storage-provisioner`` names it,
        or, only when that annotation is absent, ``volume.beta.kubernetes.io/storage-provisioner`` does."""
        ann = _meta(claim).get("annotations") or {}
        key = ANN_STORAGE_PROVISIONER if ANN_STORAGE_PROVISIONER in ann else ANN_BETA_STORAGE_PROVISIONER
        return ann.get(key) == self.provisioner

    def _settled(self, claim: Mapping[str, Any]) -> bool:
        """From the caches: a bound claim with nothing left to do (no finalizer of ours, its PV at
        the requested size, its status capacity at the PV's)."""
        meta = _meta(claim)
        name = (claim.get("spec") or {}).get("volumeName")
        if not name or meta.get("deletionTimestamp") or FINALIZER in (meta.get("finalizers") or []):
            return False
        pv = self.volumes.get(name)
        if pv is None:
            return False
        if not self._ours(pv) or ((pv.get("spec") or {}).get("claimRef") or {}).get("uid") != meta.get("uid"):
            return True
        try:
            requested = parse_size(claim["spec"]["resources"]["requests"]["storage"])
            current = parse_size(pv["spec"]["capacity"]["storage"])
            have = parse_size(((claim.get("status") or {}).get("capacity") or {})["storage"])
        except (KeyError, TypeError, ValueError):
            return False
        return requested <= current <= have

    def _check_claim(self, claim: Mapping[str, Any]) -> int:
        spec = claim.get("spec") or {}
        if spec.get("volumeMode") == "Block":
            raise ClaimError("volumeMode Block is not supported: gfuse volumes are filesystems "
                             "(use volumeMode: Filesystem)")
        if spec.get("dataSource") or spec.get("dataSourceRef"):
            raise ClaimError("a data source (clone or snapshot) is not supported by gfuse.example.org/gfuse")
        if spec.get("selector"):
            raise ClaimError("claim selector is not supported for dynamic provisioning: remove spec.selector")
        modes = spec.get("accessModes") or []
        bad = [m for m in modes if m not in ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")]
        if not modes or bad:
            raise ClaimError(f"unsupported access modes {bad or modes}")
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
        if storage is None:
            raise ClaimError("spec.resources.requests.storage is required")
        try:
            size = parse_size(storage)
        except Exception:  # noqa: BLE001 - parse_quantity raises ValueError, decimal errors, TypeError, …
            raise ClaimError(f"spec.resources.requests.storage {storage!r} is not a quantity") from None
        if size <= 0:
            raise ClaimError(f"spec.resources.requests.storage {storage!r} must be positive")
        return size

    def _provision(self, claim: dict[str, Any], sc: dict[str, Any]) -> None:
        meta = _meta(claim)
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        pv_name = f"pvc-{uid}"
        existing = self._read_volume(pv_name)
        if existing is not None:
            ref = (existing.get("spec") or {}).get("claimRef") or {}
            if ref.get("uid") != uid:
                raise ClaimError(f"a PersistentVolume {pv_name} exists and is not this claim's: delete it")
            # made by an earlier attempt: the PV controller binds it; our finalizer is no longer needed
            self._set_finalizer("claim", ns, name, present=False)
            return
        size = self._check_claim(claim)
        params = dict(sc.get("parameters") or {})
        self.event(claim, "Normal", "Provisioning",
                   f"External provisioner is provisioning volume for claim \"{ns}/{name}\"")
        updated = self._set_finalizer("claim", ns, name, present=True,
                                      annotations={ANN_PARAMETERS: json.dumps(params, sort_keys=True)})
        if updated is None or _meta(updated).get("deletionTimestamp") or _meta(updated).get("uid") != uid:
            return  # gone or being deleted meanwhile: the deleted-claim path cleans up
        claim = updated
        if (claim.get("spec") or {}).get("volumeName"):
            return
        with self._volume_lock(pv_name):
            self._check_leader()
            backend = self.backend(params)
            self._check_leader()
            vol = backend.create(pv_name, size, backend_parameters(params))
            log.info("claim %s/%s: backend made %s (%s, %d bytes)", ns, name, pv_name, vol.source, vol.size_bytes)
            body = self.volume_body(claim, sc, vol, params)
            self._check_leader()
            try:
                self.core.create_persistent_volume(api_body(body), _request_timeout=30)
            except ApiException as e:
                if e.status != 409:
                    raise
                other = self._read_volume(pv_name)
                if other is None or ((other.get("spec") or {}).get("claimRef") or {}).get("uid") != uid:
                    raise ClaimError(f"a PersistentVolume {pv_name} exists and is not this claim's: "
                                     f"delete it") from None
        self._set_finalizer("claim", ns, name, present=False)
        self.event(claim, "Normal", "ProvisioningSucceeded", f"Successfully provisioned volume {pv_name}")

    def volume_body(self, claim: Mapping[str, Any], sc: Mapping[str, Any], vol: ProvisionedVolume,
                    params: Mapping[str, str]) -> dict[str, Any]:
        """The PV for a claim and what the backend made."""
        meta = _meta(claim)
        spec = claim.get("spec") or {}
        reclaim = sc.get("reclaimPolicy") or "Delete"
        mount_options = [str(o) for o in (sc.get("mountOptions") or [])]  # into the options, never spec.mountOptions
        flex_mount_options = split_options(params.get("mountOptions", ""))  # context="…,…" stays one item
        flex_mount_options += [o for o in mount_options if o not in flex_mount_options]
        read_only = parse_bool(params.get("readOnly") or "", default=False)
        options = {"volume": vol.source, "readOnly": "true" if read_only else "false"}
        if vol.backup_servers:
            options["backupServers"] = ":".join(vol.backup_servers)
        if flex_mount_options:
            options["mountOptions"] = ",".join(flex_mount_options)
        pv: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": f"pvc-{meta['uid']}",
                "labels": {LABEL_MANAGED_BY: MANAGED_BY},
                "annotations": {
                    ANN_PROVISIONED_BY: self.provisioner,
                    ANN_IDENTITY: self.identity,
                    ANN_BACKEND: vol.backend,
                    ANN_PARAMETERS: json.dumps(dict(params), sort_keys=True),
                    ANN_CLAIM: f"{meta['namespace']}/{meta['name']}",
                },
            },
            "spec": {
                "capacity": {"storage": format_size(vol.size_bytes)},
                "accessModes": list(spec.get("accessModes") or []),
                "persistentVolumeReclaimPolicy": reclaim,
                "storageClassName": _meta(sc)["name"],
                "volumeMode": "Filesystem",
                "claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"], "name": meta["name"],
                    "uid": meta["uid"], "resourceVersion": meta["resourceVersion"],
                },
                "flexVolume": {"driver": DRIVER, "options": options},
            },
        }
        if reclaim == "Delete" and self.pv_finalizer:
            pv["metadata"]["finalizers"] = [FINALIZER]
        return pv

    def _finish_deleted_claim(self, claim: dict[str, Any]) -> None:
        """A claim with our finalizer is being deleted: its volume may be half made."""
        meta = _meta(claim)
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        pv_name = f"pvc-{uid}"
        if self._read_volume(pv_name) is None:
            params = _params_of(claim)
            if params is None:
                sc = self._get_class(self._class_name(claim))
                params = dict((sc or {}).get("parameters") or {})
            with self._volume_lock(pv_name):
                self._check_leader()
                try:
                    self.backend(params).delete(pv_name)
                except StorageError as e:
                    self.event(claim, "Warning", "ProvisioningCleanupFailed",
                               f"the claim is being deleted, but removing its half-made volume {pv_name} "
                               f"failed: {e.message}")
                    raise
            log.info("claim %s/%s deleted before its PV was made: removed %s from the backend", ns, name, pv_name)
        # else the PV exists: the PV controller releases it and its reclaim policy applies
        self._set_finalizer("claim", ns, name, present=False)

    def _sync_bound_claim(self, claim: dict[str, Any], sc: dict[str, Any] | None) -> None:
        meta = _meta(claim)
        ns, name = meta["namespace"], meta["name"]
        pv_name = claim["spec"]["volumeName"]
        pv = self._read_volume(pv_name)
        if pv is None or not self._ours(pv):
            if FINALIZER in (meta.get("finalizers") or []) and pv is not None:
                self._set_finalizer("claim", ns, name, present=False)
            return
        if ((pv.get("spec") or {}).get("claimRef") or {}).get("uid") != meta["uid"]:
            return
        if FINALIZER in (meta.get("finalizers") or []):
            updated = self._set_finalizer("claim", ns, name, present=False)  # left by a crash after the PV
            if updated is None:
                return
            claim = updated
        if (claim.get("status") or {}).get("phase") != "Bound":
            return
        self._expand(claim, pv, sc)

    def _expand(self, claim: dict[str, Any], pv: dict[str, Any], sc: dict[str, Any] | None) -> None:
        meta = _meta(claim)
        ns, name = meta["namespace"], meta["name"]
        pv_name = _meta(pv)["name"]
        try:
            requested = parse_size(claim["spec"]["resources"]["requests"]["storage"])
            current = parse_size(pv["spec"]["capacity"]["storage"])
        except (KeyError, TypeError, ValueError):
            return
        if requested > current:
            if not (sc or {}).get("allowVolumeExpansion"):
                self.event(claim, "Warning", "VolumeResizeFailed",
                           f"cannot expand {pv_name} to {format_size(requested)}: StorageClass "
                           f"\"{self._class_name(claim)}\" does not set allowVolumeExpansion: true")
                return
            params = _params_of(pv)
            if params is None:
                params = dict((sc or {}).get("parameters") or {})
            self.event(claim, "Normal", "Resizing", f"External resizer is resizing volume {pv_name}")
            with self._volume_lock(pv_name):
                self._check_leader()
                try:
                    vol = self.backend(params).expand(pv_name, requested)
                except StorageError as e:
                    self.event(claim, "Warning", "VolumeResizeFailed",
                               f"resize volume {pv_name} to {format_size(requested)} failed: {e.message}")
                    raise
            new_size = max(vol.size_bytes, requested)

            def grow_pv(obj: dict[str, Any]) -> dict[str, Any] | None:
                have = parse_size(((obj.get("spec") or {}).get("capacity") or {}).get("storage", "0"))
                return None if have >= new_size else {"spec": {"capacity": {"storage": format_size(new_size)}}}

            pv = self._patch("volume", "", pv_name, grow_pv) or pv
            current = new_size
            log.info("claim %s/%s: %s expanded to %s", ns, name, pv_name, format_size(new_size))
        status_cap = ((claim.get("status") or {}).get("capacity") or {}).get("storage")
        try:
            have = parse_size(status_cap) if status_cap is not None else 0
        except (TypeError, ValueError):
            have = 0
        if have < current:
            def grow_claim(obj: dict[str, Any]) -> dict[str, Any] | None:
                st = obj.get("status") or {}
                now_have = parse_size((st.get("capacity") or {}).get("storage", "0"))
                if now_have >= current:
                    return None
                return {"status": {"capacity": {"storage": format_size(current)}}}

            if self._patch("claim", ns, name, grow_claim, status=True) is not None and requested <= current:
                self.event(claim, "Normal", "VolumeResizeSuccessful",
                           f"volume {pv_name} is now {format_size(current)}")

    # -------------------------------------------------------------------------------- volumes

    def sync_volume(self, name: str) -> None:
        cached = self.volumes.get(name)
        if cached is None or not self._ours(cached):
            return
        unwanted_finalizer = not self.pv_finalizer and FINALIZER in (_meta(cached).get("finalizers") or [])
        if not _meta(cached).get("deletionTimestamp") and not unwanted_finalizer and not (
                (cached.get("status") or {}).get("phase") == "Released"
                and (cached.get("spec") or {}).get("persistentVolumeReclaimPolicy") == "Delete"):
            return  # nothing to do (the cache says so; no API calls)
        pv = self._read_volume(name)
        if pv is None or not self._ours(pv):
            return
        meta = _meta(pv)
        spec = pv.get("spec") or {}
        reclaim = spec.get("persistentVolumeReclaimPolicy")
        fins = meta.get("finalizers") or []
        if meta.get("deletionTimestamp"):
            if FINALIZER in fins:  # deleted by hand while the finalizer was on: keep its promise
                if reclaim == "Delete":
                    self._delete_storage(pv)
                self._set_finalizer("volume", "", name, present=False)
            return
        if not self.pv_finalizer and FINALIZER in fins:
            # --no-pv-finalizer: PVs made with the finalizer lose it (uninstall: nothing may stay blocked on
            # a controller that is gone); storage is still deleted below when the PV is Released
            if self._set_finalizer("volume", "", name, present=False) is None:
                return
            log.info("volume %s: finalizer %s removed (--no-pv-finalizer)", name, FINALIZER)
            fins = [f for f in fins if f != FINALIZER]
        phase = (pv.get("status") or {}).get("phase")
        if phase != "Released" or reclaim != "Delete":
            return  # Retain (or Recycle): the data stays
        ref = spec.get("claimRef") or {}
        if ref.get("name"):
            claim = self._read_claim(ref.get("namespace", ""), ref["name"])
            if claim is not None and _meta(claim).get("uid") == ref.get("uid") and ref.get("uid"):
                return  # the claim is back (or still there): the PV controller was mistaken; wait
        self._delete_storage(pv)
        if FINALIZER in fins:
            if self._set_finalizer("volume", "", name, present=False) is None:
                return
        self._check_leader()
        try:
            self.core.delete_persistent_volume(name, body=api_body({"preconditions": {"uid": meta["uid"]}}),
                                               _request_timeout=30)
        except ApiException as e:
            if e.status not in (404, 409):
                raise
        log.info("volume %s released (reclaim Delete): storage and PV deleted", name)

    def _delete_storage(self, pv: dict[str, Any]) -> None:
        name = _meta(pv)["name"]
        params = _params_of(pv)
        if params is None:
            sc = self._get_class((pv.get("spec") or {}).get("storageClassName") or "")
            params = dict((sc or {}).get("parameters") or {})
        with self._volume_lock(name):
            self._check_leader()
            try:
                self.backend(params).delete(name)
            except StorageError as e:
                self.event(pv, "Warning", "VolumeFailedDelete", f"deleting the storage of {name} failed: {e.message}")
                raise


def _params_of(obj: Mapping[str, Any]) -> dict[str, str] | None:
    text = (_meta(obj).get("annotations") or {}).get(ANN_PARAMETERS)
    if not text:
        return None
    try:
        params = json.loads(text)
    except ValueError:
        return None
    return {str(k): str(v) for k, v in params.items()} if isinstance(params, dict) else None


def _api_message(e: ApiException) -> str:
    try:
        return json.loads(e.body or "").get("message") or str(e.body)
    except (TypeError, ValueError, AttributeError):
        return str(e.body or e.reason)
