"""core/v1 Events, for the FlexVolume provisioner (events on claims) and the node agent (repairs, on pods).

:class:`EventRecorder` records an Event about an object (repeats of the same one bump its ``count``, as
client-go's recorder does), best effort: a failure is logged, never raised. It uses the ``kubernetes``
client, synchronously (the provisioner calls it from its worker threads, the agent through
``trio.to_thread``).
"""

from __future__ import annotations

import collections
import datetime as _dt
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
#: Events remembered for bumping their count (the oldest are forgotten first)
KEEP = 2000


def api_body(manifest: Mapping[str, Any]) -> Any:
    """A manifest as the API client's ``body``: the client sends plain dicts as they are
    (``sanitize_for_serialization``), though its annotations name its model classes."""
    return manifest


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Events of one component (``component``: ``source.component`` and ``reportingComponent``; ``instance``:
    ``reportingInstance``) through a ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any, component: str, instance: str) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.component = component
        self.instance = instance
        self._events: collections.OrderedDict[tuple[str, str, str, str], tuple[str, str, int]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def record(self, ref: Mapping[str, Any], type_: str, reason: str, message: str) -> bool:
        """Record an Event about the object ``ref`` names (``kind``, ``name``, ``namespace`` (default
        "default"), ``uid``, ``resourceVersion``; ``apiVersion`` default v1). True once recorded; a failure
        is logged as a warning and gives False."""
        ns = ref.get("namespace") or "default"
        message = message if len(message) <= 1024 else message[:1021] + "..."
        key = (ref.get("uid") or "", type_, reason, message)
        now = _now()
        try:
            from kubernetes.client.rest import ApiException

            with self._lock:
                known = self._events.get(key)
            if known is not None:
                ev_ns, ev_name, count = known
                try:
                    self.core.patch_namespaced_event(ev_name, ev_ns, {"count": count + 1, "lastTimestamp": now},
                                                     _content_type=MERGE_PATCH, _request_timeout=30)
                    with self._lock:
                        self._events[key] = (ev_ns, ev_name, count + 1)
                    return True
                except ApiException as e:
                    if e.status != 404:
                        raise
            name = f"{ref.get('name') or 'object'}.{time.time_ns():x}"
            involved = {"apiVersion": ref.get("apiVersion") or "v1", "kind": ref.get("kind"), "name": ref.get("name"),
                        "namespace": ref.get("namespace") or None, "uid": ref.get("uid"),
                        "resourceVersion": ref.get("resourceVersion")}
            body: dict[str, Any] = {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": name, "namespace": ns},
                "involvedObject": {k: v for k, v in involved.items() if v},
                "reason": reason, "message": message, "type": type_,
                "source": {"component": self.component.replace("/", "_")},
                "reportingComponent": self.component, "reportingInstance": self.instance[:128],
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            }
            self.core.create_namespaced_event(ns, api_body(body), _request_timeout=30)
            with self._lock:
                self._events[key] = (ns, name, 1)
                while len(self._events) > KEEP:
                    self._events.popitem(last=False)
            return True
        except Exception as e:  # noqa: BLE001 - events are best effort
            log.warning("event %s %s on %s/%s not recorded: %s", type_, reason, ns, ref.get("name"), e)
            return False


# -- the node agent: repairs, as Events on the pods -----------------------------------------------------------

#: where a pod's service account token is mounted: the agent runs in a cluster
SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def pod_ref(context: Mapping[str, str]) -> dict[str, str] | None:
    """The pod a mount belongs to, from the mount request's context (the FlexVolume driver passes kubelet's
    ``kubernetes.io/pod.name``/``.namespace``/``.uid`` as ``pod``, ``namespace``, ``pod_uid``); None when it is
    not known (a CSI staging mount serves every pod of its volume on the node: see :func:`pod_refs`)."""
    name, ns, uid = context.get("pod"), context.get("namespace"), context.get("pod_uid")
    if not name or not ns or not uid:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "namespace": ns, "uid": uid}


#: the context key of a CSI staging mount naming the pods it is published to: a JSON object, the pod's target
#: path -> {"name", "namespace", "uid"} (kept up to date by the CSI node service at NodePublish/NodeUnpublish)
CSI_PODS = "csi.pods"
#: NodePublishVolume's volume context with the CSIDriver's podInfoOnMount: true
CSI_POD_NAME = "csi.storage.k8s.io/pod.name"
CSI_POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
CSI_POD_UID = "csi.storage.k8s.io/pod.uid"


def csi_pods(context: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The pods of a CSI staging mount's context (:data:`CSI_PODS`), target -> pod; {} when none or unreadable."""
    import json

    try:
        pods = json.loads(context.get(CSI_PODS) or "{}")
    except ValueError:
        return {}
    if not isinstance(pods, dict):
        return {}
    return {t: {k: str(p[k]) for k in ("name", "namespace", "uid")} for t, p in pods.items()
            if isinstance(t, str) and isinstance(p, dict) and all(p.get(k) for k in ("name", "namespace", "uid"))}


def encode_csi_pods(pods: Mapping[str, Mapping[str, str]]) -> str:
    import json

    return json.dumps({t: dict(p) for t, p in sorted(pods.items())}, sort_keys=True, separators=(",", ":"))


def pod_refs(context: Mapping[str, str]) -> list[tuple[dict[str, str], str | None]]:
    """Every pod a mount serves, each with its CSI target (None for a FlexVolume mount, which is the pod's)."""
    ref = pod_ref(context)
    if ref is not None:
        return [(ref, None)]
    return [({"apiVersion": "v1", "kind": "Pod", "name": p["name"], "namespace": p["namespace"], "uid": p["uid"]},
             target) for target, p in csi_pods(context).items()]


class RepairEvents:
    """A task of the node agent: an Event on the pod of a mount the agent repaired (``Warning MountRepaired``)
    or failed to repair (``Warning MountRepairFailed``, with the agent's one-line reason: the line ``gfuse
    mount`` printed, as in kubelet's FailedMount). It looks at the agent's table every ``interval`` seconds
    (the repairs happen in the agent's health checks; nothing in them waits for the API server) and posts
    from a worker thread (the client is synchronous). Repairs done before it started are not reported."""

    def __init__(self, recorder: EventRecorder, interval: float = 2.0) -> None:
        self.recorder = recorder
        self.interval = interval

    async def run(self, agent: Any) -> None:
        import trio

        repairs: dict[str, int] = {t: r.repairs for t, r in agent.table.items()}
        errors: dict[str, str] = dict(agent._repair_errors)
        while True:
            await trio.sleep(self.interval)
            for target, rec in list(agent.table.items()):
                refs = pod_refs(rec.context or {})
                before = repairs.get(target, 0)  # a mount made after the start: its repairs count from 0
                repairs[target] = rec.repairs
                err = agent._repair_errors.get(target, "")
                err_before = errors.get(target, "")
                errors[target] = err
                for ref, pod_target in refs:
                    if rec.repairs > before:
                        await trio.to_thread.run_sync(self.recorder.record, ref, "Warning", "MountRepaired",
                                                      repaired_message(rec, target, pod_target))
                    if err and err != err_before:
                        await trio.to_thread.run_sync(self.recorder.record, ref, "Warning", "MountRepairFailed", err)
            for gone in set(repairs) - set(agent.table):
                repairs.pop(gone, None)
                errors.pop(gone, None)


def repaired_message(rec: Any, target: str, pod_target: str | None) -> str:
    """A MountRepaired Event's message: for a CSI staging mount, which volume and which of the pod's paths."""
    where = f"on {target}"
    then = ""
    if pod_target is not None:
        vid = (rec.context or {}).get("csi.volume_id") or rec.source
        where = f"of CSI volume {vid} staged on {target} (published for this pod at {pod_target})"
        then = "; the gfuse CSI node plugin binds the pod's target to the new mount"
    return (f"the gfuse mount of {rec.source} {where} was not serving (its server died, or the node restarted); "
            f"the gfuse node agent mounted it again (repair #{rec.repairs}){then}: files open on the old mount give "
            f"errors (ENOTCONN/EIO) until reopened, new opens work")


def agent_events(kubeconfig: str | None, instance: str) -> RepairEvents | None:
    """The agent's repair events: through ``kubeconfig`` when given, else the pod's service account when
    the agent runs in a cluster, else None (no API server: the agent's log has the repairs). Raises
    ValueError (one line) for a kubeconfig that cannot be used or a missing ``kubernetes`` package."""
    import os

    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(SA_TOKEN)
    if kubeconfig is None and not in_cluster:
        return None
    try:
        from kubernetes import client, config
    except ImportError as e:
        raise ValueError(f"repair events need the kubernetes package (pip install kubernetes): {e}") from None
    try:
        if kubeconfig is not None:
            cfg = client.Configuration()
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
    except Exception as e:  # noqa: BLE001 - the client raises many kinds (ConfigException, OSError, yaml errors)
        why = " ".join(str(e).split()) or type(e).__name__  # yaml's errors span lines
        raise ValueError(f"cannot use {kubeconfig or 'the in-cluster service account'}: {why}") from None
    return RepairEvents(EventRecorder(client.ApiClient(cfg), "gfuse-agent", instance))
