"""StorageClass parameters of the provisioning backends that need no cluster: the PV root's ``uid``,
``gid`` and ``mode`` (flexvolume.storage.backends.Ownership), checked before anything is made."""

from __future__ import annotations

import pytest

from flexvolume.storage import StorageError
from flexvolume.storage.backends import MAX_ID, Ownership, backend_for, parse_mode


class NoGlusterd:
    """Any call is a failure: bad parameters must be refused before glusterd is asked anything."""

    def __getattr__(self, name: str):
        raise AssertionError(f"glusterd.{name} called for bad parameters")


def refused(params: dict[str, str], **kw) -> str:
    with pytest.raises(StorageError) as ei:
        Ownership.from_params(params, **kw)
    assert ei.value.reason == "invalid-parameters"
    assert "\n" not in str(ei.value)
    return ei.value.message


@pytest.mark.parametrize(("params", "want"), [
    ({}, Ownership()),
    ({"uid": "1000", "gid": "2000", "mode": "0770"}, Ownership(1000, 2000, 0o770)),
    ({"uid": "0", "gid": str(MAX_ID)}, Ownership(0, MAX_ID, None)),
    ({"mode": "770"}, Ownership(None, None, 0o770)),
    ({"mode": "2775"}, Ownership(None, None, 0o2775)),
    ({"mode": "02775"}, Ownership(None, None, 0o2775)),
    ({"mode": "1777"}, Ownership(None, None, 0o1777)),
    ({"mode": "3770"}, Ownership(None, None, 0o3770)),
    ({"uid": "", "gid": "", "mode": ""}, Ownership()),  # empty = not given, as every other parameter
])
def test_ownership_parsed(params, want):
    got = Ownership.from_params(params)
    assert got == want
    assert bool(got) == (want != Ownership())
    assert Ownership.from_json(got.to_json()) == got


@pytest.mark.parametrize("value", ["-1", "4294967295", "99999999999", "1e3", "0x10", " 1000", "1000 ", "+5",
                                   "١٠٠٠", "10_00", "abc", "1000\n"])
def test_bad_ids_refused(value):
    for key in ("uid", "gid"):
        msg = refused({key: value})
        assert msg.startswith(f"StorageClass parameter {key} ") and "0..4294967294" in msg


@pytest.mark.parametrize("value", ["4770", "6770", "04755", "7777"])
def test_setuid_refused(value):
    msg = refused({"mode": value})
    assert "setuid" in msg and repr(value) in msg


@pytest.mark.parametrize("value", ["rwxrwx---", "0999", "77", "0o770", "u+rwx", "000770", "+770", " 770", "７７０"])
def test_bad_modes_refused(value):
    msg = refused({"mode": value})
    assert "is not an octal mode" in msg and "0770" in msg


def test_long_or_odd_values_stay_one_short_line():
    msg = refused({"uid": "1\r\n" + "9" * 5000})
    assert len(msg) < 200 and "\n" not in msg and "\r" not in msg


def test_dir_mode_is_modes_older_name():
    assert Ownership.from_params({"dirMode": "0750"}, aliases=("dirMode",)) == Ownership(None, None, 0o750)
    assert Ownership.from_params({"dirMode": "0750", "mode": "750"}, aliases=("dirMode",)).mode == 0o750
    assert "disagree" in refused({"dirMode": "0750", "mode": "0770"}, aliases=("dirMode",))
    assert "setuid" in refused({"dirMode": "4777"}, aliases=("dirMode",))
    assert parse_mode("dirMode", "0777") == 0o777


def test_recorded_ownership_checked():
    for bad in (None, "x", {"uid": "-1"}, {"owner": 1}, {"mode": "4777"}):
        with pytest.raises(StorageError) as ei:
            Ownership.from_json(bad)
        assert ei.value.reason == "gluster-error"


@pytest.mark.parametrize("backend", ["subdir", "volume"])
@pytest.mark.parametrize("bad", [{"uid": "-1"}, {"gid": "root"}, {"mode": "4770"}, {"mode": "0888"}])
def test_backend_for_refuses_before_anything(backend, bad):
    """What both provisioners call first: bad values fail there, glusterd untouched, nothing made."""
    with pytest.raises(StorageError) as ei:
        backend_for({"backend": backend, **bad}, glusterd=NoGlusterd(), pool="gfuse-pool")  # type: ignore[arg-type]
    assert ei.value.reason == "invalid-parameters" and next(iter(bad)) in ei.value.message


def test_backend_for_accepts_ownership(tmp_path):
    for backend in ("subdir", "volume"):
        b = backend_for({"backend": backend, "uid": "1000", "gid": "2000", "mode": "0770"}, glusterd=NoGlusterd(),
                        pool="gfuse-pool", state_dir=tmp_path)  # type: ignore[arg-type]
        assert b.kind == backend  # type: ignore[attr-defined]


def test_kubelet_applies_no_fs_group():
    """The decision documented in the README (Provisioning): ownership comes from the class's uid/gid/mode,
    never from kubelet walking a network volume (fsGroupPolicy File) or a mount group gfuse cannot show."""
    from pathlib import Path

    import yaml

    from flexvolume.csi.node import NODE_CAPABILITIES
    from flexvolume.csi.stubs import csi_pb2

    driver = yaml.safe_load((Path(__file__).parents[2] / "daemonset/base/csidriver.yaml").read_text())
    assert driver["kind"] == "CSIDriver" and driver["spec"]["fsGroupPolicy"] == "None"
    assert csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP not in NODE_CAPABILITIES
