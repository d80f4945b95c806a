"""Inputs that must not reach the host (issue 11): every entry point refuses them, in one clear line.

- a volume spec whose subdirectory (or server) holds a comma, a backslash, whitespace or a control character
  (``fsname=`` goes into libfuse's ``-o`` list, split at commas: ``host:/vol/x,suid,dev`` would turn off
  nosuid/nodev), or ``..``/``.`` parts;
- options naming files of the node (``log-file=``, the TLS ``ssl-*`` files) or the node's settings, from a
  Kubernetes object: FlexVolume options, CSI volume context, CSI mount flags (PV/StorageClass mountOptions),
  the agent's mount requests; the CLI keeps them;
- mount targets outside the kubelet directory the agent was given, or a symlink there;
- sockets with their final permissions from the moment they exist;
- volfiles whose translators gfuse would serve wrongly.

No servers: the CLI, the driver's parser, the CSI services and the agent's request handling are called
in-process with stand-ins for what they would talk to.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
import trio

from flexvolume.agent import Agent
from flexvolume.csi.node import NodeService
from flexvolume.csi.stubs import csi_pb2 as pb
from flexvolume.driver import DriverFailure, parse_mount_options
from flexvolume.driver import run as driver_run
from flexvolume.state import MountRecord, load_state, save_state
from gfuse import cli, status
from gfuse.graph import ClientGraph
from gfuse.mgmt import Server
from gfuse.mount import MountedVolume
from gfuse.options import MountError, parse_options
from gfuse.untrusted import check_options, libfuse_escape
from gfuse.volfile import VolfileError, parse
from gfuse.volfile_policy import check_graph
from gfuse.volspec import parse_servers, parse_volume_spec

DATA = Path(__file__).resolve().parents[1] / "data"
AccessMode = pb.VolumeCapability.AccessMode

#: volume specs every entry point refuses, and a word of the reason
BAD_SPECS = [
    ("h:/v/x,suid,dev", "comma"),
    ("h:/v/x,allow_other", "comma"),
    ("h:/v/../etc", "'..'"),
    ("h:/v/a/../../b", "'..'"),
    ("h:/v/./a", "'.'"),
    ("h:/v/a\\,b", "backslash"),
    ("h:/v/a\tb", "SERVER"),
    ("h:/v/a\x01", "control"),
    ("h,suid:/v", "not a host name"),
    ("h,dev,suid:/v/x", "not a host name"),
]
#: options a Kubernetes object may not set, and a word of the reason
NODE_OPTIONS = [
    ("log-file=/etc/cron.d/x", "names a file on the node"),
    ("ssl-key=/root/key", "names a file on the node"),
    ("ssl-dir=/etc", "names a file on the node"),
    ("ssl-cert=/x", "names a file on the node"),
    ("ssl-ca=/x", "names a file on the node"),
]


# ------------------------------------------------------------------------------------------ volume specs


@pytest.mark.parametrize("spec,why", BAD_SPECS)
def test_volume_spec_refused(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_volume_spec(spec)


def test_good_specs_and_servers() -> None:
    assert parse_volume_spec("server-1.example.org:24008:/vol_1/a/b").subdir == "a/b"
    assert parse_volume_spec("[fe80::1]:/v").server.host == "fe80::1"
    assert [str(s) for s in parse_servers("h2:h3")] == ["h2:24007", "h3:24007"]
    for bad in ("h2;id:h3", "h 2", "h2,h3:x", "h2,h3:0"):
        with pytest.raises(ValueError):
            parse_servers(bad)


def test_libfuse_escape() -> None:
    assert libfuse_escape("h:/v/a") == "h:/v/a"
    assert libfuse_escape("a,suid\\") == "a\\,suid\\\\"


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], entry: Any = cli.main) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ei:
        entry(argv)
    return int(ei.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("spec,why", BAD_SPECS[:4] + BAD_SPECS[8:9])
def test_cli_mount_refuses_bad_specs(spec: str, why: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(["mount", spec, str(tmp_path)], capsys)
    assert code == 1 and err.startswith("gfuse: ") and why in err and err.count("\n") == 1, err
    # mount(8)'s helper, as /etc/fstab reaches it
    code, err = _cli([spec, str(tmp_path), "-o", "rw,_netdev"], capsys, cli.mount_helper)
    assert code == 1 and why in err, err


def test_cli_mount_refuses_traversal_in_subdir_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for opt in ("subdir=..", "subdir=a/../../b", "subdir=x,suid"):
        code, err = _cli(["mount", "h:/v", str(tmp_path), "-o", opt], capsys)
        assert code == 1 and ("'..'" in err or "unknown mount option 'suid'" not in err), err
    code, err = _cli(["h:/v", str(tmp_path), "-o", "subdir=../x"], capsys, cli.mount_helper)
    assert code == 1 and "'..'" in err, err


def test_cli_keeps_node_options() -> None:
    """The node's admin may name files: the CLI's parser takes log-file= (it is refused only from Kubernetes)."""
    assert parse_options("log-file=/var/log/x.log,log-level=DEBUG").log_file == "/var/log/x.log"


def test_two_subdirectories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="two subdirectories"):
        MountedVolume("h:/v/a", str(tmp_path), parse_options("subdir=b"))
    assert MountedVolume("h:/v/a", str(tmp_path), parse_options("subdir=a")).opts.subdir == "a"


# ------------------------------------------------------------------------------------------ FlexVolume


def _flex(**options: str) -> str:
    return json.dumps({"kubernetes.io/fsType": "", "kubernetes.io/readwrite": "rw", **options})


@pytest.mark.parametrize("spec,why", BAD_SPECS[:5] + BAD_SPECS[8:])
def test_flexvolume_refuses_bad_volume(spec: str, why: str) -> None:
    with pytest.raises(DriverFailure, match="option 'volume'"):
        parse_mount_options(_flex(volume=spec))


@pytest.mark.parametrize("opt,why", NODE_OPTIONS)
def test_flexvolume_refuses_node_options(opt: str, why: str, tmp_path: Path) -> None:
    with pytest.raises(DriverFailure, match=why) as ei:
        parse_mount_options(_flex(volume="h:/v", mountOptions=f"ping-timeout=5,{opt}"))
    assert "PV spec.flexVolume.options.mountOptions" in str(ei.value)
    # as kubelet calls it: one Failure line, and nothing made for the refused call
    target = tmp_path / "pods" / "u" / "volumes" / "gfuse.example.org~gfuse" / "data"
    out, code = driver_run(["mount", str(target), _flex(volume="h:/v", mountOptions=opt)])
    assert code == 1 and out["status"] == "Failure" and why in out["message"], out
    assert not target.parent.exists()


def test_flexvolume_keeps_what_a_pv_may_ask() -> None:
    req = parse_mount_options(_flex(volume="h:/v/a", mountOptions='ping-timeout=5,log-level=DEBUG,ro,'
                                                                   'context="system_u:object_r:t:s0:c1,c2"'))
    assert req["options"] == ["allow_other", "ping-timeout=5", "log-level=DEBUG", "ro",
                              'context="system_u:object_r:t:s0:c1,c2"']


def test_check_options_leaves_unknown_ones_to_the_parser() -> None:
    check_options(["bogus=1", "nosuid", "x-systemd.automount"], "here")
    with pytest.raises(MountError, match="the node's to decide"):
        check_options(["secure-mgmt=no"], "here")


# ------------------------------------------------------------------------------------------ CSI


class Aborted(Exception):
    pass


class _Context:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class _FakeAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mount(self, *args: Any, **kw: Any) -> dict[str, Any]:
        self.calls.append(args)
        return {"ok": True}


def _cap(*flags: str) -> Any:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(mount_flags=list(flags)),
                               access_mode=AccessMode(mode=AccessMode.MULTI_NODE_MULTI_WRITER))


def _stage(tmp_path: Path, cap: Any, volume_id: str = "127.0.0.2:/vol",
           context: dict[str, str] | None = None) -> tuple[str, str, _FakeAgent, Path]:
    kubelet = tmp_path / "kubelet"
    agent = _FakeAgent()
    node = NodeService("n1", str(kubelet), agent)  # type: ignore[arg-type]
    staging = kubelet / "plugins/kubernetes.io/csi/d/h/globalmount"
    req = pb.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap,
                                    volume_context=context or {})
    try:
        node.NodeStageVolume(req, _Context())
    except Aborted as e:
        return e.args[0].name, e.args[1], agent, staging
    return "OK", "", agent, staging


@pytest.mark.parametrize("flag,why", [
    ("subdir=..", "must be given as 'source'"),
    ("subdir=other-tenant", "must be given as 'source'"),
    ("backup-volfile-servers=evil", "must be given as 'source'"),
    *NODE_OPTIONS,
    ("ping-timeout=5,log-file=/x", "names a file on the node"),
    ("bogus", "unknown mount option"),
])
def test_csi_stage_refuses_mount_flags(tmp_path: Path, flag: str, why: str) -> None:
    """PV/StorageClass mountOptions arrive as mount flags: they bypassed the volume context's check."""
    code, msg, agent, staging = _stage(tmp_path, _cap("rw", flag))
    assert code == "INVALID_ARGUMENT" and why in msg and "mount_flags" in msg, msg
    assert agent.calls == [] and not staging.exists()


@pytest.mark.parametrize("ctx,why", [
    ({"mountOptions": "log-file=/etc/passwd"}, "names a file on the node"),
    ({"mountOptions": "ro ssl-key=/k"}, "names a file on the node"),
    ({"mountOptions": "subdir=.."}, "must be given as 'source'"),
    ({"source": "127.0.0.2:/vol/../x"}, "'..'"),
    ({"source": "127.0.0.2:/vol/x,suid"}, "comma"),
    ({"source": "127.0.0.2,suid:/vol"}, "not a host name"),
    ({"source": "127.0.0.2:/vol", "backupServers": "a;b"}, "not a server"),
])
def test_csi_stage_refuses_volume_context(tmp_path: Path, ctx: dict[str, str], why: str) -> None:
    code, msg, agent, staging = _stage(tmp_path, _cap(), volume_id="static-pv",
                                       context={"source": "127.0.0.2:/vol", **ctx})
    assert code == "INVALID_ARGUMENT" and why in msg, msg
    assert agent.calls == [] and not staging.exists()


@pytest.mark.parametrize("vid", ["subdir:127.0.0.2:/pool/../other", "127.0.0.2:/vol/a,dev", "volume:h,suid:/v"])
def test_csi_refuses_bad_volume_ids(tmp_path: Path, vid: str) -> None:
    code, msg, agent, _ = _stage(tmp_path, _cap(), volume_id=vid)
    assert code in ("INVALID_ARGUMENT", "NOT_FOUND") and agent.calls == [], msg


def test_csi_stage_passes_what_a_pv_may_ask(tmp_path: Path) -> None:
    code, msg, agent, staging = _stage(tmp_path, _cap("rw", "ping-timeout=5", 'context="u:r:t:s0:c1,c2"'))
    assert code == "OK", msg
    ((source, target),) = [c[:2] for c in agent.calls]
    assert source == "127.0.0.2:/vol" and target == str(staging)


def test_csi_create_volume_refuses_storage_class_mount_options() -> None:
    from flexvolume.csi.controller import ControllerService

    class Backends:
        def for_params(self, params: Any) -> Any:
            raise AssertionError("nothing may be made for a refused request")

    svc = ControllerService("d", Backends())  # type: ignore[arg-type]
    req = pb.CreateVolumeRequest(name="pvc-1", volume_capabilities=[_cap("log-file=/x")])
    with pytest.raises(Aborted) as ei:
        svc.CreateVolume(req, _Context())
    assert ei.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT and "names a file on the node" in ei.value.args[1]
    req = pb.CreateVolumeRequest(name="pvc-1", volume_capabilities=[_cap()],
                                 parameters={"mountOptions": "ssl-dir=/etc"})
    with pytest.raises(Aborted) as ei:
        svc.CreateVolume(req, _Context())
    assert ei.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT and "names a file on the node" in ei.value.args[1]


def test_csi_socket_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's socket allows no one but root from its creation (no chmod after the bind)."""
    from flexvolume.csi.server import Plugin, parse_args

    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    path = tmp_path / "csi.sock"
    args = parse_args(["--endpoint", f"unix://{path}", "--mode", "node", "--nodeid", "n1",
                       "--agent-socket", str(tmp_path / "none.sock"), "--kubelet-dir", str(tmp_path)])
    plugin = Plugin(args)
    before = os.umask(0o022)
    try:
        plugin.start()
        assert os.umask(0o022) == 0o022, "the umask was not restored"
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode & 0o077 == 0, oct(mode)
    finally:
        plugin.stop(0.1)
        os.umask(before)


# ------------------------------------------------------------------------------------------ the agent


def _agent(tmp_path: Path) -> Agent:
    (tmp_path / "kubelet").mkdir(exist_ok=True)
    return Agent(str(tmp_path / "agent.sock"), str(tmp_path / "state" / "agent-state.msgpack"),
                 kubelet_dir=str(tmp_path / "kubelet"), gfuse_command=["/bin/false"])


def _mount_req(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return {"op": "mount", "source": "127.0.0.2:/v",
            "target": str(tmp_path / "kubelet" / "pods" / "u" / "volumes" / "d" / "data"), **kw}


@pytest.mark.parametrize("change,why", [
    ({"options": ["log-file=/etc/cron.d/x"]}, "names a file on the node"),
    ({"options": ["ping-timeout=3,ssl-key=/k"]}, "names a file on the node"),
    ({"options": ["subdir=.."]}, "'..'"),
    ({"options": ["subdir=a/../../b"]}, "'..'"),
    ({"options": ["subdir=b"], "source": "127.0.0.2:/v/a"}, "two subdirectories"),
    ({"source": "127.0.0.2:/v/x,suid,dev"}, "comma"),
    ({"source": "127.0.0.2:/v/../x"}, "'..'"),
    ({"source": "h,suid:/v"}, "not a host name"),
    ({"target": "/etc/cron.d"}, "outside the kubelet directory"),
    ({"target": "/tmp/../etc"}, "outside the kubelet directory"),
    ({"context": {"pod": ["not", "a", "string"]}}, "'context' must be a map of strings"),
])
async def test_agent_refuses_mount_requests(tmp_path: Path, change: dict[str, Any], why: str) -> None:
    a = _agent(tmp_path)
    req = _mount_req(tmp_path, **change)
    resp = await a.dispatch(req)
    assert resp["ok"] is False and resp["code"] == "invalid" and why in resp["error"], resp
    assert a.table == {} and not (tmp_path / "state").exists(), "a refused request changed the state"
    assert not (tmp_path / "kubelet" / "pods").exists(), "a refused request made a directory"


async def test_agent_refuses_a_symlinked_target(tmp_path: Path) -> None:
    a = _agent(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = tmp_path / "kubelet" / "pods" / "link"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    resp = await a.dispatch(_mount_req(tmp_path, target=str(link)))
    assert resp["ok"] is False and "symbolic link" in resp["error"], resp
    # a symlinked parent resolves outside the kubelet directory
    resp = await a.dispatch(_mount_req(tmp_path, target=str(link / "data")))
    assert resp["ok"] is False and "outside the kubelet directory" in resp["error"], resp
    assert a.table == {} and list(outside.iterdir()) == []


async def test_agent_unmount_and_stats_stay_in_the_kubelet_directory(tmp_path: Path) -> None:
    a = _agent(tmp_path)
    for op in ("unmount", "stats"):
        resp = await a.dispatch({"op": op, "target": "/etc"})
        assert resp["ok"] is False and "outside the kubelet directory" in resp["error"], resp
    resp = await a.dispatch({"op": "unmount", "target": str(tmp_path / "kubelet" / "x")})
    assert resp == {"ok": True, "was_mounted": False}


async def test_agent_socket_has_its_final_mode_when_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """0600 from its creation: with chmod doing nothing, the socket is still root's only."""
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    a = _agent(tmp_path)
    before = os.umask(0o022)
    try:
        listener = await a._listen()
        assert os.umask(0o022) == 0o022, "the umask was not restored"
    finally:
        os.umask(before)
    try:
        assert stat.S_IMODE(os.lstat(a.socket_path).st_mode) == 0o600
    finally:
        await listener.aclose()


async def test_agent_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    from flexvolume.agent import AgentStartError

    a = _agent(tmp_path)
    Path(a.socket_path).write_text("precious")
    with pytest.raises(AgentStartError, match="is not a socket"):
        await a._listen()
    assert Path(a.socket_path).read_text() == "precious"


async def test_status_socket_has_its_final_mode_when_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    monkeypatch.setattr(status, "RUN_DIR", str(tmp_path))
    path = str(tmp_path / "s.sock")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(status.serve_status, path, lambda: {"ok": 1})
        with trio.fail_after(5):
            while not os.path.exists(path):
                await trio.sleep(0.01)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        assert json.loads(await s.recv(1000)) == {"ok": 1}
        s.close()
        nursery.cancel_scope.cancel()


def test_agent_kubelet_dir_option(tmp_path: Path) -> None:
    from flexvolume import agent

    with pytest.raises(SystemExit):
        agent.main(["--kubelet-dir", "relative", "--socket", str(tmp_path / "s"), "--state", str(tmp_path / "st")])
    with pytest.raises(SystemExit):
        agent.main(["--allow-dir", "/", "--socket", str(tmp_path / "s"), "--state", str(tmp_path / "st")])


# ------------------------------------------------------------------------------------------ state file


def test_one_bad_state_record_keeps_the_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.msgpack"
    good = [MountRecord("h:/v", f"/k/pods/{i}", ["allow_other"], pid=100 + i).to_wire() for i in range(3)]
    bad: list[Any] = [
        "not a map", {"source": "h:/v"}, {"source": "h:/v", "target": "relative"},
        {"source": "h:/v", "target": "/k/x", "options": "allow_other"},
        {"source": "h:/v", "target": "/k/y", "since": "yesterday"},
        {"source": "h:/v", "target": "/k/z", "repairs": -1},
        {"source": "h:/v", "target": "/k/w", "context": ["x"]},
    ]
    mounts = [good[0], *bad[:4], good[1], *bad[4:], good[2]]
    path.write_bytes(msgpack.packb({"version": 1, "mounts": mounts}))
    dropped: list[str] = []
    table = load_state(str(path), dropped)
    assert sorted(table) == ["/k/pods/0", "/k/pods/1", "/k/pods/2"]
    assert [table[f"/k/pods/{i}"].pid for i in range(3)] == [100, 101, 102]
    assert len(dropped) == len(bad) and dropped[0].startswith("entry 1: ") and "/k/y" in dropped[4], dropped
    # the agent starts with the good ones, logs each one dropped and keeps the file as it was
    a = Agent(str(tmp_path / "a.sock"), str(path), kubelet_dir="/k")
    with caplog.at_level(logging.ERROR, "gfuse.agent"):
        a._load()
    assert sorted(a.table) == sorted(table)
    lines = [r.getMessage() for r in caplog.records if "dropped an invalid entry" in r.getMessage()]
    assert len(lines) == len(bad), lines
    (copy,) = tmp_path.glob("state.msgpack.dropped-*")
    assert msgpack.unpackb(copy.read_bytes())["mounts"] == mounts
    save_state(str(path), a.table)
    assert sorted(load_state(str(path))) == sorted(table)


def test_state_records_the_agent_would_refuse_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Entries an earlier agent accepted (log-file= from a PV, another kubelet dir, a comma in the source) are
    not mounted again at start: each is dropped and named, the others kept."""
    kubelet = tmp_path / "kubelet"
    good = MountRecord("h:/v", f"{kubelet}/pods/a/volumes/d/data", ["allow_other"])
    bad = [MountRecord("h:/v", "/etc/cron.d", []),
           MountRecord("h:/v", f"{kubelet}/pods/b/volumes/d/data", ["log-file=/etc/passwd"]),
           MountRecord("h:/v/x,suid", f"{kubelet}/pods/c/volumes/d/data", []),
           MountRecord("h:/v/a", f"{kubelet}/pods/d/volumes/d/data", ["subdir=../b"])]
    path = tmp_path / "state" / "agent-state.msgpack"
    path.parent.mkdir()
    save_state(str(path), {r.target: r for r in [good, *bad]})
    a = _agent(tmp_path)
    with caplog.at_level(logging.ERROR, "gfuse.agent"):
        a._load()
    assert list(a.table) == [good.target]
    lines = [r.getMessage() for r in caplog.records if "that this agent would refuse" in r.getMessage()]
    assert len(lines) == 4 and any("outside the kubelet directory" in ln for ln in lines), lines
    for why in ("'..'", "names a file on the node", "comma"):
        assert any(why in ln for ln in lines), (why, lines)


def test_unreadable_state_file_is_still_an_error(tmp_path: Path) -> None:
    from flexvolume.state import StateError

    path = tmp_path / "s"
    for body in (b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"version": 2, "mounts": []}),
                 msgpack.packb({"version": 1, "mounts": {"a": 1}})):
        path.write_bytes(body)
        with pytest.raises(StateError):
            load_state(str(path))


# ------------------------------------------------------------------------------------------ volfiles


def _volfile(name: str = "replica3") -> str:
    return (DATA / f"volfile_{name}.vol").read_text()


def _insert_above_top(text: str, xl_type: str, options: str = "") -> str:
    """A translator of ``xl_type`` between the top (io-stats) and its child, as volgen stacks them."""
    g = parse(text)
    top = g.top
    child = top.subvolumes[0].name
    block = f"volume inserted\n    type {xl_type}\n{options}    subvolumes {child}\nend-volume\n\n"
    head, _, tail = text.rpartition(f"volume {top.name}\n")
    tail = tail.replace(f"subvolumes {child}", "subvolumes inserted", 1)
    return head + block + f"volume {top.name}\n" + tail


def _build(text: str) -> ClientGraph:
    return ClientGraph(parse(text), Server("127.0.0.1"), "v")


@pytest.mark.parametrize("name", ["dist1", "distrep", "replica3"])
def test_real_volfiles_are_served(name: str) -> None:
    check_graph(parse(_volfile(name)))
    assert _build(_volfile(name)).bricks


@pytest.mark.parametrize("xl_type,options,why", [
    ("features/shard", "    option shard-block-size 64MB\n", "sharding is on"),
    ("features/cloudsync", "", "cloudsync"),
    ("features/cdc", "    option mode client\n", "network compression"),
    ("encryption/crypt", "", "encryption"),
    ("features/read-only", "    option read-only on\n", "read-only"),
    ("features/worm", "    option worm on\n", "WORM"),
    ("features/worm", "    option worm-file-level on\n", "WORM"),
    ("features/quota", "", "quota"),
    ("features/some-new-thing", "", "not known to gfuse"),
    ("storage/posix", "", "not known to gfuse"),
])
def test_translators_gfuse_cannot_serve_are_refused(xl_type: str, options: str, why: str) -> None:
    text = _insert_above_top(_volfile("distrep"), xl_type, options)
    with pytest.raises(VolfileError, match=why) as ei:
        _build(text)
    assert "cannot serve" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("xl_type,options", [
    ("performance/io-cache", ""), ("performance/some-new-cache", ""), ("debug/trace", ""),
    ("features/read-only", "    option read-only off\n"), ("features/worm", ""), ("features/quiesce", ""),
    ("meta-autoload/meta", ""),
])
def test_translators_that_do_not_change_what_is_stored_pass(xl_type: str, options: str) -> None:
    assert len(_build(_insert_above_top(_volfile("distrep"), xl_type, options)).bricks) == 6


def _disperse() -> str:
    clients = "".join(f"volume c{i}\n type protocol/client\n option remote-host h\n option remote-subvolume /b{i}\n"
                      f"end-volume\n" for i in range(3))
    return clients + ("volume v-disperse-0\n type cluster/disperse\n option redundancy 1\n subvolumes c0 c1 c2\n"
                      "end-volume\nvolume v\n type debug/io-stats\n subvolumes v-disperse-0\nend-volume\n")


def test_disperse_and_uss_are_refused_by_name() -> None:
    with pytest.raises(VolfileError, match=r"disperse \(erasure-coded\) volumes are not supported"):
        _build(_disperse())
    uss = _disperse().replace("cluster/disperse\n option redundancy 1", "features/snapview-client")
    with pytest.raises(VolfileError, match=r"features\.uss"):
        _build(uss)


@pytest.mark.parametrize("edit,why", [
    (("option remote-host vm\n", ""), "no option remote-host"),
    (("option remote-subvolume /var/tmp/gfuserec20278/r0\n", ""), "no option remote-subvolume"),
    (("option ping-timeout 42\n", "option ping-timeout forever\n"), "not a number"),
    (("option ping-timeout 42\n", "option ping-timeout 42\n    option remote-port 99999\n"), "out of range"),
    (("option transport-type tcp\n", "option transport-type rdma\n"), "rdma is not supported"),
    (("option granular-entry-heal on\n", "option granular-entry-heal on\n    option thin-arbiter h:/ta\n"),
     "thin-arbiter"),
    (("option granular-entry-heal on\n", "option granular-entry-heal on\n    option quorum-count 7\n"), "range"),
    (("option granular-entry-heal on\n", "option granular-entry-heal on\n    option quorum-type most\n"),
     "quorum-type"),
    (("client-1,gfuserec20278replica3-client-2\n", "client-1\n"), "afr-pending-xattr names 2 replicas"),
    (("option lock-migration off\n", "option lock-migration off\n    option xattr-name trusted.x\n"),
     "xattr-name"),
])
def test_values_the_graph_builder_cannot_use_are_volfile_errors(edit: tuple[str, str], why: str) -> None:
    text = _volfile("replica3")
    assert edit[0] in text
    with pytest.raises(VolfileError, match=why):
        _build(text.replace(edit[0], edit[1], 1))


def test_hash_regex_refused_only_where_names_are_hashed() -> None:
    dist = _volfile("distrep").replace("    type cluster/distribute\n",
                                       "    type cluster/distribute\n    option extra-hash-regex ^(.+)\\.tmp$\n")
    with pytest.raises(VolfileError, match="extra-hash-regex"):
        _build(dist)
    one = _volfile("replica3").replace("    type cluster/distribute\n",
                                       "    type cluster/distribute\n    option extra-hash-regex ^(.+)\\.tmp$\n")
    assert _build(one).bricks  # a single subvolume: nothing is hashed
