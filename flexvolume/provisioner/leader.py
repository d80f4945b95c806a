"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's ``leaderelection`` does it.

Replicas share one Lease (``--leader-election-namespace``/``--leader-election-lease-name``).
A candidate takes the Lease when it does not exist, has no holder, or has not been renewed for
``leaseDurationSeconds`` *as observed on the candidate's own monotonic clock* (the time the
candidate last saw the Lease's record change, not the ``renewTime`` written by another machine,
so clock skew between nodes does not matter). Every write carries the Lease's resourceVersion: of
two candidates racing for an expired Lease one gets 409 Conflict and stays a follower.

The leader renews every ``retry_period``. :meth:`LeaderElector.is_leader` is true only while the
last successful renewal is younger than ``renew_deadline`` (< ``lease_duration``): a leader cut
off from the API server stops acting before any other replica can take the Lease, so two replicas
never both act. On a clean stop the leader releases the Lease (empty holder, 1 s duration), so a
successor does not wait for it to expire.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from .controller import api_body

log = logging.getLogger(__name__)


def _microtime() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api_client: Any, namespace: str, name: str, identity: str, *,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("leader election needs lease_duration > renew_deadline > retry_period > 0 "
                             f"(got {lease_duration}, {renew_deadline}, {retry_period})")
        self.api = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self._lock = threading.Lock()
        self._leading = False
        self._last_renew = -math.inf
        self._observed: tuple[str, str, int] | None = None  # (holder, renewTime, duration) last seen
        self._observed_at = -math.inf
        self.transitions_seen = 0

    # ------------------------------------------------------------------ state

    def is_leader(self) -> bool:
        with self._lock:
            return self._leading and self.clock() - self._last_renew < self.renew_deadline

    @property
    def holder(self) -> str | None:
        """The holder last observed (may be us)."""
        return self._observed[0] if self._observed else None

    # ------------------------------------------------------------------ one attempt

    def _write(self, what: str, fn: Callable[..., Any], *args: Any) -> bool:
        """Create or replace the Lease; False if that failed (409: another candidate wrote it first)."""
        try:
            fn(*args, _request_timeout=self.retry_period * 2)
        except ApiException as e:
            if e.status != 409:
                log.warning("leader election: %s Lease %s/%s failed: %s %s", what, self.namespace, self.name,
                            e.status, e.reason)
            return False
        except Exception as e:  # noqa: BLE001
            log.warning("leader election: %s Lease %s/%s failed: %s", what, self.namespace, self.name, e)
            return False
        return True

    def try_acquire_or_renew(self) -> bool:
        """One attempt to take or renew the Lease. True if we hold it now."""
        now_mt = _microtime()
        duration = max(1, int(math.ceil(self.lease_duration)))
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.retry_period * 2)
        except ApiException as e:
            if e.status != 404:
                log.warning("leader election: reading Lease %s/%s failed: %s %s", self.namespace, self.name,
                            e.status, e.reason)
                return False
            body: dict[str, Any] = {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": duration,
                         "acquireTime": now_mt, "renewTime": now_mt, "leaseTransitions": 0}}
            if not self._write("creating", self.api.create_namespaced_lease, self.namespace, body):
                return False
            self._renewed((self.identity, now_mt, duration))
            return True
        except Exception as e:  # noqa: BLE001 - connection errors: not renewed this time
            log.warning("leader election: reading Lease %s/%s failed: %s", self.namespace, self.name, e)
            return False

        spec = lease.spec
        holder = (spec.holder_identity or "") if spec else ""
        renew = str(spec.renew_time) if spec and spec.renew_time else ""
        their_duration = (spec.lease_duration_seconds or duration) if spec else duration
        record = (holder, renew, their_duration)
        now = self.clock()
        if record != self._observed:
            self._observed = record
            self._observed_at = now
        if holder and holder != self.identity and self._observed_at + their_duration > now:
            with self._lock:
                self._leading = False
            return False  # held by another replica and not expired
        transitions = (spec.lease_transitions or 0) if spec else 0
        acquire = now_mt
        if holder == self.identity and spec and spec.acquire_time:
            acquire = _fmt(spec.acquire_time)
        elif holder != self.identity:
            transitions += 1 if holder else 0
        meta = lease.metadata
        assert meta is not None, "a Lease read from the API server has its metadata"
        body = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace, "resourceVersion": meta.resource_version},
            "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": duration,
                     "acquireTime": acquire, "renewTime": now_mt, "leaseTransitions": transitions}}
        if meta.labels:
            body["metadata"]["labels"] = dict(meta.labels)
        if not self._write("updating", self.api.replace_namespaced_lease, self.name, self.namespace, body):
            return False
        if holder != self.identity:
            self.transitions_seen += 1
            log.info("leader election: %s took Lease %s/%s (was %s)", self.identity, self.namespace, self.name,
                     holder or "free")
        self._renewed((self.identity, now_mt, duration))
        return True

    def _renewed(self, record: tuple[str, str, int]) -> None:
        now = self.clock()
        with self._lock:
            self._leading = True
            self._last_renew = now
        self._observed = record
        self._observed_at = now

    # ------------------------------------------------------------------ loops

    def acquire(self, stop: threading.Event) -> bool:
        """Block until we hold the Lease (True) or ``stop`` is set (False)."""
        log.info("leader election: %s waiting for Lease %s/%s", self.identity, self.namespace, self.name)
        while not stop.is_set():
            if self.try_acquire_or_renew():
                log.info("leader election: %s is the leader", self.identity)
                return True
            stop.wait(self.retry_period)
        return False

    def keep(self, stop: threading.Event, lost: threading.Event) -> None:
        """Renew every retry_period until ``stop``; set ``lost`` if a renewal fails past renew_deadline."""
        while not stop.wait(self.retry_period):
            if self.try_acquire_or_renew():
                continue
            if not self.is_leader():
                with self._lock:
                    self._leading = False
                log.error("leader election: %s lost Lease %s/%s (not renewed within %gs)", self.identity,
                          self.namespace, self.name, self.renew_deadline)
                lost.set()
                return

    def run(self, stop: threading.Event, lead: Callable[[threading.Event], None]) -> bool:
        """Acquire, then ``lead(done)`` while renewing; ``done`` is set on ``stop`` or when the Lease is
        lost. Returns True when stopped (the Lease is released), False when the Lease was lost."""
        if not self.acquire(stop):
            return True
        lost = threading.Event()
        done = threading.Event()

        def watch_stop() -> None:
            while not done.is_set():
                if stop.wait(0.2) or lost.is_set():
                    done.set()

        renewer = threading.Thread(target=self.keep, args=(done, lost), name="lease-renewer", daemon=True)
        watcher = threading.Thread(target=watch_stop, name="lease-stop", daemon=True)
        renewer.start()
        watcher.start()
        try:
            lead(done)
        finally:
            done.set()
            renewer.join(self.retry_period * 3)
            watcher.join(2)
            if not lost.is_set():
                self.release()
        return not lost.is_set()

    def release(self) -> None:
        """Give the Lease up (only if we still hold it)."""
        with self._lock:
            was = self._leading
            self._leading = False
        if not was:
            return
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=5)
            if not lease.spec or lease.spec.holder_identity != self.identity:
                return
            now_mt = _microtime()
            meta = lease.metadata
            assert meta is not None, "a Lease read from the API server has its metadata"
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace,
                                 "resourceVersion": meta.resource_version},
                    "spec": {"leaseDurationSeconds": 1, "acquireTime": now_mt, "renewTime": now_mt,
                             "leaseTransitions": lease.spec.lease_transitions or 0}}
            self.api.replace_namespaced_lease(self.name, self.namespace, api_body(body), _request_timeout=5)
            log.info("leader election: %s released Lease %s/%s", self.identity, self.namespace, self.name)
        except Exception as e:  # noqa: BLE001 - the Lease then expires on its own
            log.warning("leader election: releasing Lease %s/%s failed: %s", self.namespace, self.name, e)


def _fmt(t: Any) -> str:
    if isinstance(t, _dt.datetime):
        if t.tzinfo is not None:
            t = t.astimezone(_dt.UTC).replace(tzinfo=None)
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return str(t)
