"""Conformance of the Kubernetes API emulator (tests/kube_emulator.py) with the real ``kubernetes`` client.

No real control plane can run on these machines, so the provisioner is tested against the
emulator; these tests pin down the API semantics it relies on, each through the unmodified client
over HTTP: uids and creation timestamps, one resourceVersion counter rising with every write, 409
on stale updates and on creating an existing name, 404, 422 from schema validation
(kubernetes-validate, strict, 1.37) and from the apiserver's own Go checks, status subresources,
finalizers, watches (from a resourceVersion, timeoutSeconds, expiry, 410 Gone), and the stand-in
for the PV controller's binding.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

from testkit.kube_emulator import KubeEmulator, parse_quantity, schema_version  # noqa: E402

NS = "team-a"


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator() as e:
        yield e


@pytest.fixture
def core(emu: KubeEmulator) -> client.CoreV1Api:
    return client.CoreV1Api(emu.api_client())


def pvc(name: str, size: str = "1Gi", sc: str | None = "gfuse", **meta: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": name, **meta},
                            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}}
    if sc:
        body["spec"]["storageClassName"] = sc
    return body


def pv(name: str, claim: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
                            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                                     "flexVolume": {"driver": "gfuse.example.org/gfuse",
                                                    "options": {"volume": "h:/v/d"}}, **spec}}
    if claim is not None:
        body["spec"]["claimRef"] = {"namespace": claim["metadata"]["namespace"], "name": claim["metadata"]["name"],
                                    "uid": claim["metadata"]["uid"]}
    return body


def status_of(e: ApiException) -> dict[str, Any]:
    return json.loads(e.body)


def test_schema_version_is_the_newest_kubernetes_validate_has() -> None:
    import kubernetes_validate

    assert schema_version("1.37") == "1.37"
    assert kubernetes_validate.latest_version().startswith("1.37")


def test_create_get_list_uids_timestamps_and_rising_resource_versions(emu: KubeEmulator,
                                                                       core: client.CoreV1Api) -> None:
    made = [core.create_namespaced_persistent_volume_claim(NS, pvc(f"c{i}")) for i in range(3)]
    uids = {m.metadata.uid for m in made}
    assert len(uids) == 3 and all(len(u) == 36 for u in uids)
    assert all(m.metadata.creation_timestamp is not None for m in made)
    assert all(m.metadata.namespace == NS for m in made)
    assert made[0].status.phase == "Pending" and made[0].spec.volume_mode == "Filesystem"  # defaults
    rvs = [int(m.metadata.resource_version) for m in made]
    patched = core.patch_namespaced_persistent_volume_claim("c0", NS, {"metadata": {"labels": {"x": "1"}}})
    rvs.append(int(patched.metadata.resource_version))
    other = core.create_persistent_volume(pv("v1"))
    rvs.append(int(other.metadata.resource_version))
    assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs), rvs  # one counter across kinds
    got = core.read_namespaced_persistent_volume_claim("c0", NS)
    assert got.metadata.uid == made[0].metadata.uid and got.metadata.labels == {"x": "1"}
    lst = core.list_persistent_volume_claim_for_all_namespaces()
    assert [i.metadata.name for i in lst.items] == ["c0", "c1", "c2"]
    # the list's version is the store's (the PV controller stand-in wrote once more: PV Available)
    assert int(lst.metadata.resource_version) == emu.resource_version > max(rvs)
    assert [i.metadata.name for i in core.list_namespaced_persistent_volume_claim(
        NS, label_selector="x=1").items] == ["c0"]
    assert [i.metadata.name for i in core.list_namespaced_persistent_volume_claim(
        NS, label_selector="!x").items] == ["c1", "c2"]
    assert core.list_namespaced_persistent_volume_claim("elsewhere").items == []
    assert [i.metadata.name for i in core.list_namespaced_persistent_volume_claim(
        NS, field_selector="metadata.name=c2").items] == ["c2"]
    # a no-op write makes no new version
    again = core.patch_namespaced_persistent_volume_claim("c0", NS, {"metadata": {"labels": {"x": "1"}}})
    assert again.metadata.resource_version == patched.metadata.resource_version
    gen = core.create_namespaced_persistent_volume_claim(NS, {**pvc(""), "metadata": {"generateName": "gen-"}})
    assert gen.metadata.name.startswith("gen-") and len(gen.metadata.name) == 9


def test_409_on_existing_name_and_stale_resource_version_404_on_missing(emu: KubeEmulator,
                                                                        core: client.CoreV1Api) -> None:
    c = core.create_namespaced_persistent_volume_claim(NS, pvc("c"))
    with pytest.raises(ApiException) as e:
        core.create_namespaced_persistent_volume_claim(NS, pvc("c"))
    assert e.value.status == 409 and status_of(e.value)["reason"] == "AlreadyExists"
    stale = c.metadata.resource_version
    core.patch_namespaced_persistent_volume_claim("c", NS, {"metadata": {"labels": {"a": "b"}}})
    body = pvc("c")
    body["metadata"]["resourceVersion"] = stale
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_persistent_volume_claim("c", NS, body)
    assert e.value.status == 409 and status_of(e.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(e.value)["message"]
    with pytest.raises(ApiException) as e:  # merge patch with a stale resourceVersion
        core.patch_namespaced_persistent_volume_claim("c", NS, {"metadata": {"resourceVersion": stale,
                                                                             "labels": {"a": "c"}}},
                                                      _content_type="application/merge-patch+json")
    assert e.value.status == 409
    with pytest.raises(ApiException) as e:  # json patch whose test op fails
        core.patch_namespaced_persistent_volume_claim("c", NS, [
            {"op": "test", "path": "/metadata/labels/a", "value": "nope"},
            {"op": "replace", "path": "/metadata/labels/a", "value": "c"}])
    assert e.value.status == 422
    with pytest.raises(ApiException) as e:  # delete with a stale uid precondition
        core.delete_namespaced_persistent_volume_claim("c", NS, body={"preconditions": {"uid": "0" * 36}})
    assert e.value.status == 409
    for call in (lambda: core.read_namespaced_persistent_volume_claim("nope", NS),
                 lambda: core.delete_persistent_volume("nope"),
                 lambda: core.patch_persistent_volume("nope", {"metadata": {"labels": {"a": "b"}}})):
        with pytest.raises(ApiException) as e:
            call()
        assert e.value.status == 404 and status_of(e.value)["reason"] == "NotFound"
    # an unconditional replace (no resourceVersion) and a current one go through
    cur = core.read_namespaced_persistent_volume_claim("c", NS)
    body["metadata"]["resourceVersion"] = cur.metadata.resource_version
    body["metadata"]["labels"] = {"a": "d"}
    assert core.replace_namespaced_persistent_volume_claim("c", NS, body).metadata.labels == {"a": "d"}
    deleted = core.delete_namespaced_persistent_volume_claim("c", NS)
    assert deleted.metadata.name == "c"  # PVC deletes answer with the object


def test_422_from_the_schema_and_from_the_apiservers_own_checks(emu: KubeEmulator, core: client.CoreV1Api) -> None:
    api = emu.api_client()

    def raw(method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        # the client's own REST layer: its typed methods check bodies with pydantic before sending
        r = api.rest_client.request(method, emu.url + path, headers={"Content-Type": "application/json"}, body=body)
        r.read()
        return r.status, json.loads(r.data)

    bad = pvc("c")
    bad["spec"]["bogus"] = 1  # unknown field: strict schema
    code, st = raw("POST", f"/api/v1/namespaces/{NS}/persistentvolumeclaims", bad)
    assert code == 422 and st["reason"] == "Invalid" and "'bogus' was unexpected" in st["message"]
    bad = pv("v")
    bad["spec"]["capacity"] = "1Gi"  # wrong type
    code, st = raw("POST", "/api/v1/persistentvolumes", bad)
    assert code == 422 and "spec.capacity" in st["message"]
    code, st = raw("POST", "/apis/storage.k8s.io/v1/storageclasses",
                   {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "x"}})
    assert code == 422 and "'provisioner' is a required property" in st["message"]
    # what the schemas miss and the apiserver checks in Go
    cases = [
        (pvc("c", modes=None) if False else {**pvc("c"), "spec": {**pvc("c")["spec"], "accessModes": ["ReadWriteMny"]}},
         "Unsupported value: 'ReadWriteMny'"),
        (pvc("c", size="1 Gi"), "is not a quantity"),
        (pvc("c", labels={"bad": "a/b"}), "a valid label must be"),
        (pvc("Upper"), "RFC 1123"),
        (pvc("c", finalizers=["no-domain"]), "neither a standard finalizer name nor is it fully qualified"),
    ]
    for body, msg in cases:
        with pytest.raises(ApiException) as e:
            core.create_namespaced_persistent_volume_claim(NS, body)
        assert e.value.status == 422 and msg in status_of(e.value)["message"], (msg, e.value.body)
    with pytest.raises(ApiException) as e:
        core.create_persistent_volume({**pv("v"), "spec": {**pv("v")["spec"], "nfs": {"server": "s", "path": "/"}}})
    assert e.value.status == 422 and "exactly one volume type" in status_of(e.value)["message"]
    with pytest.raises(ApiException) as e:
        core.create_persistent_volume(pv("v", persistentVolumeReclaimPolicy="Keep"))
    assert e.value.status == 422
    # immutable fields on update
    core.create_persistent_volume(pv("v"))
    v = core.read_persistent_volume("v")
    with pytest.raises(ApiException) as e:
        core.patch_persistent_volume("v", {"spec": {"flexVolume": {"options": {"volume": "h:/other"}}}},
                                     _content_type="application/merge-patch+json")
    assert e.value.status == 422 and "immutable" in status_of(e.value)["message"]
    assert core.read_persistent_volume("v").metadata.resource_version == v.metadata.resource_version
    core.create_namespaced_persistent_volume_claim(NS, pvc("c"))
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_persistent_volume_claim("c", NS, {"spec": {"accessModes": ["ReadWriteOnce"]}},
                                                      _content_type="application/merge-patch+json")
    assert e.value.status == 422
    # server-side apply is not served
    r = api.rest_client.request("PATCH", emu.url + f"/api/v1/namespaces/{NS}/persistentvolumeclaims/c",
                                headers={"Content-Type": "application/apply-patch+yaml"}, body={"x": 1})
    r.read()
    assert r.status == 415


def test_status_subresource_and_finalizers(emu: KubeEmulator, core: client.CoreV1Api) -> None:
    c = core.create_namespaced_persistent_volume_claim(NS, pvc("c", sc=None, finalizers=["example.com/hold"]))
    body = emu.get("persistentvolumeclaims", "c", NS)
    body["status"] = {"phase": "Bound"}
    body["metadata"]["labels"] = {"via": "main"}
    out = core.replace_namespaced_persistent_volume_claim("c", NS, body)
    assert out.status.phase == "Pending" and out.metadata.labels == {"via": "main"}  # status kept
    out = core.patch_namespaced_persistent_volume_claim_status(
        "c", NS, {"status": {"phase": "Lost"}, "metadata": {"labels": {"via": "status"}}},
        _content_type="application/merge-patch+json")
    assert out.status.phase == "Lost" and out.metadata.labels == {"via": "main"}  # only status
    # delete with a finalizer: deletionTimestamp, then gone when the finalizer is removed
    gone = core.delete_namespaced_persistent_volume_claim("c", NS)
    assert gone.metadata.deletion_timestamp is not None
    assert emu.get("persistentvolumeclaims", "c", NS) is not None
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_persistent_volume_claim(
            "c", NS, {"metadata": {"finalizers": ["example.com/hold", "example.com/more"]}},
            _content_type="application/merge-patch+json")
    assert e.value.status == 422 and "no new finalizers" in status_of(e.value)["message"]
    core.patch_namespaced_persistent_volume_claim("c", NS, {"metadata": {"finalizers": []}},
                                                  _content_type="application/merge-patch+json")
    assert emu.get("persistentvolumeclaims", "c", NS) is None
    assert c.metadata.uid  # (used)


def test_watch_streams_from_a_resource_version_and_honours_timeout_seconds(emu: KubeEmulator,
                                                                           core: client.CoreV1Api) -> None:
    core.create_namespaced_persistent_volume_claim(NS, pvc("a"))
    rv = core.list_persistent_volume_claim_for_all_namespaces().metadata.resource_version
    core.create_persistent_volume(pv("unrelated"))  # other kinds do not show up

    def later() -> None:
        time.sleep(0.3)
        core.create_namespaced_persistent_volume_claim(NS, pvc("b"))
        core.patch_namespaced_persistent_volume_claim("a", NS, {"metadata": {"labels": {"k": "v"}}})
        core.delete_namespaced_persistent_volume_claim("b", NS)

    threading.Thread(target=later, daemon=True).start()
    t0 = time.monotonic()
    seen = [(ev["type"], ev["object"].metadata.name, int(ev["object"].metadata.resource_version))
            for ev in watch.Watch().stream(core.list_persistent_volume_claim_for_all_namespaces,
                                           resource_version=rv, timeout_seconds=2)]
    took = time.monotonic() - t0
    assert [(t, n) for t, n, _ in seen] == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    rvs = [r for _, _, r in seen]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)
    assert 1.9 <= took < 4, f"timeoutSeconds=2 ended the watch after {took:.2f}s"
    # no resourceVersion: the current state first, as synthetic ADDED events
    seen = [(ev["type"], ev["object"].metadata.name) for ev in watch.Watch().stream(
        core.list_namespaced_persistent_volume_claim, NS, timeout_seconds=1)]
    assert seen == [("ADDED", "a")]
    # label selectors apply to watches too
    seen = [ev["object"].metadata.name for ev in watch.Watch().stream(
        core.list_persistent_volume_claim_for_all_namespaces, label_selector="k=v", resource_version="0",
        timeout_seconds=1)]
    assert seen == ["a"]


def test_watch_expiry_and_410_gone(emu: KubeEmulator, core: client.CoreV1Api) -> None:
    core.create_namespaced_persistent_volume_claim(NS, pvc("a"))
    rv = core.list_persistent_volume_claim_for_all_namespaces().metadata.resource_version

    # expire_watches(): the stream ends early and cleanly (as on the apiserver's own timeout)
    def expire() -> None:
        emu.wait_for(lambda: emu.open_watches() == 1, 5, "the watch")
        emu.expire_watches()

    threading.Thread(target=expire, daemon=True).start()
    t0 = time.monotonic()
    assert list(watch.Watch().stream(core.list_persistent_volume_claim_for_all_namespaces, resource_version=rv,
                                     timeout_seconds=30)) == []
    assert time.monotonic() - t0 < 5

    # expire_watches(gone=True): an ERROR event with a 410 Status; the client raises ApiException(410)
    def gone() -> None:
        emu.wait_for(lambda: emu.open_watches() == 1, 5, "the watch")
        emu.expire_watches(gone=True)

    threading.Thread(target=gone, daemon=True).start()
    with pytest.raises(ApiException) as e:
        list(watch.Watch().stream(core.list_persistent_volume_claim_for_all_namespaces, resource_version=rv,
                                  timeout_seconds=30))
    assert e.value.status == 410

    # a compacted resourceVersion: 410 Expired at once; a watch from the list's version works
    core.patch_namespaced_persistent_volume_claim("a", NS, {"metadata": {"labels": {"k": "v"}}})
    emu.compact()
    with pytest.raises(ApiException) as e:
        list(watch.Watch().stream(core.list_persistent_volume_claim_for_all_namespaces, resource_version=rv,
                                  timeout_seconds=5))
    assert e.value.status == 410 and "too old resource version" in e.value.reason
    fresh = core.list_persistent_volume_claim_for_all_namespaces().metadata.resource_version
    threading.Timer(0.2, lambda: core.delete_namespaced_persistent_volume_claim("a", NS)).start()
    seen = [ev["type"] for ev in watch.Watch().stream(core.list_persistent_volume_claim_for_all_namespaces,
                                                      resource_version=fresh, timeout_seconds=1)]
    assert seen == ["DELETED"]
    # the raw stream: an ERROR line with a Status object, as the apiserver sends it
    api = emu.api_client()
    r = api.rest_client.request("GET", emu.url + f"/api/v1/persistentvolumeclaims?watch=true&resourceVersion={rv}"
                                                 f"&timeoutSeconds=5")
    line = json.loads(r.read().decode().splitlines()[0])
    assert line["type"] == "ERROR" and line["object"]["kind"] == "Status" and line["object"]["code"] == 410


def test_leases_and_events(emu: KubeEmulator) -> None:
    co = client.CoordinationV1Api(emu.api_client())
    core = client.CoreV1Api(emu.api_client())
    lease = co.create_namespaced_lease("gfuse-system", {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15,
                 "renewTime": "2026-01-01T00:00:00.000000Z", "acquireTime": "2026-01-01T00:00:00.000000Z"}})
    body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l", "resourceVersion": lease.metadata.resource_version},
            "spec": {"holderIdentity": "b", "leaseDurationSeconds": 15}}
    assert co.replace_namespaced_lease("l", "gfuse-system", body).spec.holder_identity == "b"
    with pytest.raises(ApiException) as e:  # the same stale version again: the race's loser
        co.replace_namespaced_lease("l", "gfuse-system", body)
    assert e.value.status == 409
    with pytest.raises(ApiException) as e:
        co.replace_namespaced_lease("l", "gfuse-system", {**body, "metadata": {"name": "l"},
                                                          "spec": {"leaseDurationSeconds": 0}})
    assert e.value.status == 422
    ev = core.create_namespaced_event(NS, {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "c.17a2b3c4d5e6f708"},
        "involvedObject": {"kind": "PersistentVolumeClaim", "namespace": NS, "name": "c", "uid": "u"},
        "reason": "ProvisioningFailed", "message": "pool full", "type": "Warning", "count": 1})
    assert ev.metadata.uid
    assert core.list_namespaced_event(NS, field_selector="involvedObject.name=c").items[0].reason == \
        "ProvisioningFailed"
    with pytest.raises(ApiException) as e:
        core.create_namespaced_event(NS, {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "x"},
                                          "involvedObject": {"kind": "Pod", "name": "p"}, "type": "Bad"})
    assert e.value.status == 422


def test_pv_controller_stand_in_binds_and_releases(emu: KubeEmulator, core: client.CoreV1Api) -> None:
    c = core.create_namespaced_persistent_volume_claim(NS, pvc("c"))
    claim = {"metadata": {"namespace": NS, "name": "c", "uid": c.metadata.uid}}
    core.create_persistent_volume(pv("v", claim))
    got = core.read_namespaced_persistent_volume_claim("c", NS)
    assert got.spec.volume_name == "v" and got.status.phase == "Bound"
    assert got.status.capacity == {"storage": "1Gi"}
    assert core.read_persistent_volume("v").status.phase == "Bound"
    core.delete_namespaced_persistent_volume_claim("c", NS)
    released = core.read_persistent_volume("v")
    assert released.status.phase == "Released" and released.status.last_phase_transition_time is not None
    # a claimRef to a claim that is gone (another uid) is released at once; an unclaimed PV is Available
    core.create_persistent_volume(pv("w", {"metadata": {"namespace": NS, "name": "c", "uid": "x" * 36}}))
    assert core.read_persistent_volume("w").status.phase == "Released"
    core.create_persistent_volume(pv("free"))
    assert core.read_persistent_volume("free").status.phase == "Available"


def test_hold_and_fail_hooks(emu: KubeEmulator, core: client.CoreV1Api) -> None:
    emu.fail("POST", r"/persistentvolumes$", 500, "InternalError")
    with pytest.raises(ApiException) as e:
        core.create_persistent_volume(pv("v"))
    assert e.value.status == 500
    assert emu.get("persistentvolumes", "v") is None
    core.create_persistent_volume(pv("v"))  # only once
    out: dict[str, Any] = {}

    def call(fn: Any) -> threading.Thread:
        def run() -> None:
            try:
                out["result"] = fn()
            except Exception as exc:  # noqa: BLE001
                out["error"] = exc
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    hold = emu.hold("POST", r"/persistentvolumes$")
    t = call(lambda: core.create_persistent_volume(pv("w"), _request_timeout=10))
    assert hold.wait(5) == ("POST", "/api/v1/persistentvolumes")
    assert hold.body["metadata"]["name"] == "w"
    assert emu.get("persistentvolumes", "w") is None  # held before it is applied
    hold.release(apply=False)  # dropped: the client sees the connection close, nothing changed
    t.join(10)
    assert "error" in out and emu.get("persistentvolumes", "w") is None
    # applied after the client gave up waiting: the write lands, the client never hears of it
    out.clear()
    hold = emu.hold("POST", r"/persistentvolumes$")
    t = call(lambda: core.create_persistent_volume(pv("w"), _request_timeout=0.5))
    hold.wait(5)
    t.join(10)
    assert "error" in out and emu.get("persistentvolumes", "w") is None
    hold.release(apply=True)
    emu.wait_for(lambda: emu.get("persistentvolumes", "w"), 5, "the held create applied")
    # urllib3 retries idempotent methods on a dropped connection: a dropped DELETE comes again
    out.clear()
    hold = emu.hold("DELETE", r"/persistentvolumes/v$")
    t = call(lambda: core.delete_persistent_volume("v", _request_timeout=10))
    hold.wait(5)
    hold.release(apply=False)
    t.join(10)
    assert "result" in out and emu.get("persistentvolumes", "v") is None


def test_parse_quantity() -> None:
    assert parse_quantity("1Gi") == 1 << 30
    assert parse_quantity("1.5Gi") == 3 << 29
    assert parse_quantity("500M") == 500_000_000
    assert parse_quantity("1e3") == 1000
    assert parse_quantity(1024) == 1024
    for bad in ("1 Gi", "Gi", "1GB", "", "1.2.3"):
        with pytest.raises(ValueError):
            parse_quantity(bad)
