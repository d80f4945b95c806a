"""Generate the CSI protocol stubs (``csi_pb2.py``, ``csi_pb2_grpc.py``) at install or image-build time.

::

    python3 -m flexvolume.csi.stubs            # the same as python3 -m flexvolume.csi.genstubs
    python3 -m flexvolume.csi.genstubs --out DIR [--proto csi.proto] [--ember-wheel FILE] [--force]

``scripts/install-deps.sh`` runs it (into the package directory, ``flexvolume/csi/``, where the files
are ignored by git) and so does the image build (``Dockerfile``: into ``$GFUSE_CSI_STUBS_DIR``).
Importing :mod:`flexvolume.csi.stubs` never generates or downloads anything; it only loads what this
made. The output is rewritten only when its inputs change (``csi_stubs.json`` records them), so
running it again is cheap.

Where the spec comes from
-------------------------
No package on the registries these machines reach (PyPI, Debian, npm) ships the CSI spec's
``csi.proto`` of v1.2 or later: Debian has no ``golang-github-container-storage-interface-spec``
package in any suite, and PyPI's only CSI spec descriptor is the one compiled into the ``ember-csi``
0.9.1 wheel (spec v1.1.0). So, in this order:

1. ``--proto FILE`` / ``$GFUSE_CSI_PROTO``: a real ``csi.proto`` (v1.9 or later) compiled as it is;
2. else the v1.1.0 descriptor of ``ember_csi/v1_1_0/csi_pb2.py`` in the ``ember-csi`` 0.9.1 wheel
   (``--ember-wheel`` / ``$GFUSE_CSI_EMBER_WHEEL``, else the copy cached under
   ``~/.cache/gfuse/``, else ``pip download --no-deps ember-csi==0.9.1``; sha256-pinned; the file is
   parsed with :mod:`ast`, never imported), **extended** with :data:`ADDITIONS`: the messages, fields
   and enum values of spec v1.2–v1.9 that gfuse sends or reads (VolumeCondition, the
   SINGLE_NODE_SINGLE_WRITER/SINGLE_NODE_MULTI_WRITER access modes, the newer node and controller
   capabilities, ...), with the names and numbers of the spec. Wire-compatible with a v1.9 CO for
   all of these; the RPCs gfuse does not serve (ControllerGetVolume, ControllerModifyVolume, the
   GroupController service) are left out and answer UNIMPLEMENTED as any unknown method does.

Either way the result must have every feature in :data:`REQUIRED_FEATURES` (else the generation
fails), and ``grpc_tools.protoc`` (the protoc of the installed ``grpcio-tools``, so the code matches
the installed protobuf runtime) writes the two modules from the descriptor.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EMBER_VERSION = "0.9.1"
EMBER_WHEEL = f"ember_csi-{EMBER_VERSION}-py2.py3-none-any.whl"
EMBER_WHEEL_SHA256 = "5e305dfa0706dbb985411f3f76fe1c473110249d44c7859db97d2734bf5544b3"
EMBER_MEMBER = "ember_csi/v1_1_0/csi_pb2.py"
PROTO_NAME = "csi.proto"
PACKAGE = "flexvolume.csi"  # the generated modules are loaded as its submodules
MARKER = "csi_stubs.json"
OUTPUTS = ("csi_pb2.py", "csi_pb2_grpc.py")
GENERATOR_REVISION = "2"  # bump when the generation or ADDITIONS change

#: what the stubs must have, as (kind, dotted name): spec v1.9 features the plugin relies on
REQUIRED_FEATURES = (
    ("message", "VolumeCondition"),
    ("field", "NodeGetVolumeStatsResponse.volume_condition"),
    ("enum_value", "VolumeCapability.AccessMode.Mode.SINGLE_NODE_SINGLE_WRITER"),
    ("enum_value", "VolumeCapability.AccessMode.Mode.SINGLE_NODE_MULTI_WRITER"),
    ("enum_value", "NodeServiceCapability.RPC.Type.VOLUME_CONDITION"),
    ("enum_value", "NodeServiceCapability.RPC.Type.SINGLE_NODE_MULTI_WRITER"),
)


class StubsError(RuntimeError):
    """The stubs could not be made; the message says what to install or set."""


# ------------------------------------------------------------------------------------------------
# what spec v1.2–v1.9 added that gfuse uses (names and numbers as in the spec)

# FieldDescriptorProto types and labels
BOOL, STRING, MESSAGE = 8, 9, 11
OPTIONAL, REPEATED = 1, 3


@dataclass(frozen=True)
class Message:
    """A new top-level message with plain fields ``(name, number, type, type_name)``."""

    name: str
    fields: tuple[tuple[str, int, int, str], ...]


@dataclass(frozen=True)
class Field:
    """A new field of an existing message (``message`` dotted, e.g. ``VolumeCapability.MountVolume``)."""

    message: str
    name: str
    number: int
    type: int
    type_name: str = ""


@dataclass(frozen=True)
class EnumValue:
    """A new value of an existing enum (``enum`` dotted, e.g. ``VolumeCapability.AccessMode.Mode``)."""

    enum: str
    name: str
    number: int


ADDITIONS: tuple[Message | Field | EnumValue, ...] = (
    # v1.2: volume health (NodeGetVolumeStats reports it; kubelet records abnormal volumes as events)
    Message("VolumeCondition", (("abnormal", 1, BOOL, ""), ("message", 2, STRING, ""))),
    Field("NodeGetVolumeStatsResponse", "volume_condition", 2, MESSAGE, ".csi.v1.VolumeCondition"),
    Field("NodeGetVolumeStatsRequest", "staging_target_path", 3, STRING),
    EnumValue("NodeServiceCapability.RPC.Type", "VOLUME_CONDITION", 4),
    EnumValue("ControllerServiceCapability.RPC.Type", "LIST_VOLUMES_PUBLISHED_NODES", 10),
    EnumValue("ControllerServiceCapability.RPC.Type", "VOLUME_CONDITION", 11),
    EnumValue("ControllerServiceCapability.RPC.Type", "GET_VOLUME", 12),
    # v1.2: what expansion requests carry
    Field("NodeExpandVolumeRequest", "staging_target_path", 4, STRING),
    Field("NodeExpandVolumeRequest", "volume_capability", 5, MESSAGE, ".csi.v1.VolumeCapability"),
    Field("ControllerExpandVolumeRequest", "volume_capability", 4, MESSAGE, ".csi.v1.VolumeCapability"),
    # v1.5: single-node access modes, fsGroup handed to the plugin
    EnumValue("VolumeCapability.AccessMode.Mode", "SINGLE_NODE_SINGLE_WRITER", 6),
    EnumValue("VolumeCapability.AccessMode.Mode", "SINGLE_NODE_MULTI_WRITER", 7),
    EnumValue("NodeServiceCapability.RPC.Type", "SINGLE_NODE_MULTI_WRITER", 5),
    EnumValue("ControllerServiceCapability.RPC.Type", "SINGLE_NODE_MULTI_WRITER", 13),
    EnumValue("NodeServiceCapability.RPC.Type", "VOLUME_MOUNT_GROUP", 6),
    Field("VolumeCapability.MountVolume", "volume_mount_group", 3, STRING),
    # v1.8/v1.9: capabilities a newer CO may see advertised elsewhere (gfuse advertises neither)
    EnumValue("PluginCapability.Service.Type", "GROUP_CONTROLLER_SERVICE", 3),
    EnumValue("ControllerServiceCapability.RPC.Type", "MODIFY_VOLUME", 14),
)


def _find_message(fdp: Any, dotted: str) -> Any:
    parts = dotted.split(".")
    scope = fdp.message_type
    msg = None
    for p in parts:
        msg = next((m for m in scope if m.name == p), None)
        if msg is None:
            raise StubsError(f"the CSI descriptor has no message {dotted}")
        scope = msg.nested_type
    return msg


def _find_enum(fdp: Any, dotted: str) -> Any:
    *outer, name = dotted.split(".")
    scope = _find_message(fdp, ".".join(outer)).enum_type if outer else fdp.enum_type
    enum = next((e for e in scope if e.name == name), None)
    if enum is None:
        raise StubsError(f"the CSI descriptor has no enum {dotted}")
    return enum


def _add_field(msg: Any, name: str, number: int, ftype: int, type_name: str, where: str) -> bool:
    for f in msg.field:
        if f.name == name or f.number == number:
            if (f.name, f.number, f.type, f.type_name) != (name, number, ftype, type_name):
                raise StubsError(f"{where}: field {f.name} = {f.number} conflicts with {name} = {number}")
            return False
    f = msg.field.add(name=name, number=number, label=OPTIONAL, type=ftype)
    if type_name:
        f.type_name = type_name
    return True


def extend(fdp: Any) -> list[str]:
    """Apply :data:`ADDITIONS` to the ``FileDescriptorProto`` of csi.proto; what was added.

    What is there already (a newer base) is skipped; a name or number used differently is an error."""
    added = []
    for a in ADDITIONS:
        if isinstance(a, Message):
            existing = next((m for m in fdp.message_type if m.name == a.name), None)
            msg = existing if existing is not None else fdp.message_type.add(name=a.name)
            new = [_add_field(msg, *f, where=a.name) for f in a.fields]
            if existing is None or any(new):
                added.append(f"message {a.name}")
        elif isinstance(a, Field):
            if _add_field(_find_message(fdp, a.message), a.name, a.number, a.type, a.type_name, a.message):
                added.append(f"{a.message}.{a.name} = {a.number}")
        else:
            enum = _find_enum(fdp, a.enum)
            same = [v for v in enum.value if v.name == a.name or v.number == a.number]
            if same:
                if (same[0].name, same[0].number) != (a.name, a.number):
                    raise StubsError(f"{a.enum}: {same[0].name} = {same[0].number} conflicts with "
                                     f"{a.name} = {a.number}")
                continue
            enum.value.add(name=a.name, number=a.number)
            added.append(f"{a.enum}.{a.name} = {a.number}")
    return added


def missing_features(fdp: Any) -> list[str]:
    """The :data:`REQUIRED_FEATURES` the ``FileDescriptorProto`` lacks."""
    missing = []
    for kind, dotted in REQUIRED_FEATURES:
        try:
            if kind == "message":
                _find_message(fdp, dotted)
            elif kind == "field":
                owner, name = dotted.rsplit(".", 1)
                if not any(f.name == name for f in _find_message(fdp, owner).field):
                    missing.append(dotted)
            else:
                owner, name = dotted.rsplit(".", 1)
                if not any(v.name == name for v in _find_enum(fdp, owner).value):
                    missing.append(dotted)
        except StubsError:
            missing.append(dotted)
    return missing


# ------------------------------------------------------------------------------------------------
# the base descriptor


def descriptor_from_source(text: str, where: str) -> bytes:
    """The ``serialized_pb=b'…'`` literal of the ``FileDescriptor(...)`` call in a protoc-made file."""
    try:
        tree = ast.parse(text, filename=where)
    except SyntaxError as e:
        raise StubsError(f"{where}: not Python ({e})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "serialized_pb" and isinstance(kw.value, ast.Constant) \
                        and isinstance(kw.value.value, bytes):
                    return kw.value.value
    raise StubsError(f"{where}: no serialized_pb descriptor found")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def from_wheel(path: Path) -> bytes:
    """The v1.1.0 descriptor in the ember-csi wheel at ``path`` (its sha256 checked first)."""
    got = sha256(path)
    if got != EMBER_WHEEL_SHA256:
        raise StubsError(f"{path}: sha256 {got} is not the pinned {EMBER_WHEEL_SHA256} of {EMBER_WHEEL}")
    try:
        with zipfile.ZipFile(path) as z:
            text = z.read(EMBER_MEMBER).decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise StubsError(f"{path}: cannot read {EMBER_MEMBER}: {e}") from None
    return descriptor_from_source(text, f"{path}!{EMBER_MEMBER}")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gfuse"


def download_wheel(dest: Path) -> Path:
    """``pip download`` the pinned ember-csi wheel into ``dest`` (install time only)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "-d", tmp, f"ember-csi=={EMBER_VERSION}"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StubsError(f"cannot download {EMBER_WHEEL} ({' '.join(cmd)}): {e}") from None
        got = Path(tmp) / EMBER_WHEEL
        if p.returncode != 0 or not got.is_file():
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            raise StubsError(f"cannot download {EMBER_WHEEL} with pip (exit {p.returncode}): "
                             + " | ".join(tail) + "; pass --ember-wheel FILE (or GFUSE_CSI_EMBER_WHEEL)")
        if sha256(got) != EMBER_WHEEL_SHA256:
            raise StubsError(f"downloaded {EMBER_WHEEL} does not match the pinned sha256")
        final = dest / EMBER_WHEEL
        os.replace(got, final)
        return final


def ember_wheel(explicit: str | None) -> Path:
    """The ember-csi wheel: ``explicit``, else the cached copy, else downloaded into the cache."""
    if explicit:
        return Path(explicit)
    cached = cache_dir() / EMBER_WHEEL
    if cached.is_file():
        if sha256(cached) == EMBER_WHEEL_SHA256:
            return cached
        cached.unlink()
    return download_wheel(cache_dir())


def _protoc() -> Any:
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise StubsError(f"generating the CSI stubs needs grpcio-tools (pip install 'gfuse[csi]'): {e}") from None
    return protoc


def descriptor_from_proto(proto: Path) -> bytes:
    """The serialized ``FileDescriptorProto`` of a ``csi.proto`` file, compiled by grpc_tools.protoc."""
    protoc = _protoc()
    import grpc_tools

    if not proto.is_file():
        raise StubsError(f"{proto}: no such file")
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory(prefix="gfuse-csi-proto-") as tmp:
        shutil.copy(proto, Path(tmp) / PROTO_NAME)
        out = Path(tmp) / "csi.fds"
        args = ["grpc_tools.protoc", f"-I{tmp}", f"-I{wkt}", f"--descriptor_set_out={out}", PROTO_NAME]
        rc = protoc.main(args)
        if rc != 0:
            raise StubsError(f"grpc_tools.protoc could not compile {proto} (status {rc})")
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
    return fds.file[0].SerializeToString()


# ------------------------------------------------------------------------------------------------
# generation


def tool_versions() -> str:
    out = []
    for dist in ("protobuf", "grpcio-tools"):
        try:
            out.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist}=none")
    return ",".join(out)


def origin(proto: str | None) -> dict[str, str]:
    """What the descriptor is made from (without fetching it): goes into the marker's key."""
    if proto:
        p = Path(proto)
        return {"base": f"{p.resolve()}", "base_sha256": sha256(p) if p.is_file() else "missing"}
    return {"base": f"{EMBER_WHEEL}:{EMBER_MEMBER} (CSI spec v1.1.0)", "base_sha256": EMBER_WHEEL_SHA256}


def key_of(orig: dict[str, str]) -> str:
    text = f"{orig['base_sha256']}|{tool_versions()}|{GENERATOR_REVISION}|{sys.version_info[:2]}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def default_out() -> Path:
    """``$GFUSE_CSI_STUBS_DIR`` if set, else the directory of this package (``flexvolume/csi/``)."""
    env = os.environ.get("GFUSE_CSI_STUBS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent


def up_to_date(out: Path, key: str) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("key") == key and all((out / f).is_file() for f in OUTPUTS)


def write_stubs(fdp: Any, out: Path) -> None:
    """protoc the ``FileDescriptorProto`` into ``out/csi_pb2.py`` and ``out/csi_pb2_grpc.py``."""
    protoc = _protoc()
    from google.protobuf import descriptor_pb2, timestamp_pb2, wrappers_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    for mod in (descriptor_pb2, timestamp_pb2, wrappers_pb2):
        mod.DESCRIPTOR.CopyToProto(fds.file.add())
    fds.file.add().CopyFrom(fdp)
    fds_path = out / "csi.fds"
    fds_path.write_bytes(fds.SerializeToString())
    args = ["grpc_tools.protoc", f"--descriptor_set_in={fds_path}", f"--python_out={out}",
            f"--grpc_python_out={out}", PROTO_NAME]
    rc = protoc.main(args)  # protoc prints its complaints on stderr
    fds_path.unlink()
    if rc != 0:
        raise StubsError(f"grpc_tools.protoc failed with status {rc} ({' '.join(args)})")
    grpc_file = out / "csi_pb2_grpc.py"
    text = grpc_file.read_text("utf-8")
    # protoc writes a top-level import; load the message module from our package instead
    old = "import csi_pb2 as csi__pb2"
    if old not in text:
        raise StubsError(f"unexpected protoc output: {old!r} not in csi_pb2_grpc.py")
    grpc_file.write_text(text.replace(old, f"from {PACKAGE} import csi_pb2 as csi__pb2"), "utf-8")


def generate(out: Path | None = None, proto: str | None = None, wheel: str | None = None,
             force: bool = False) -> tuple[Path, bool]:
    """Make the stubs in ``out`` unless they are up to date; ``(out, whether they were written)``."""
    from google.protobuf import descriptor_pb2

    out = out or default_out()
    proto = proto or os.environ.get("GFUSE_CSI_PROTO") or None
    wheel = wheel or os.environ.get("GFUSE_CSI_EMBER_WHEEL") or None
    orig = origin(proto)
    key = key_of(orig)
    if not force and up_to_date(out, key):
        return out, False
    if proto:
        raw = descriptor_from_proto(Path(proto))
    else:
        src = ember_wheel(wheel)
        raw = from_wheel(src)
    fdp = descriptor_pb2.FileDescriptorProto()
    fdp.ParseFromString(raw)
    if fdp.name != PROTO_NAME or fdp.package != "csi.v1":
        raise StubsError(f"the descriptor is {fdp.name!r} of package {fdp.package!r}, not csi.proto/csi.v1")
    added = [] if proto else extend(fdp)
    missing = missing_features(fdp)
    if missing:
        raise StubsError(f"the CSI descriptor lacks {', '.join(missing)} (spec v1.9 or later is needed)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".csi-gen-"))
    try:
        write_stubs(fdp, tmp)
        marker = {"key": key, **orig, "additions": added, "tools": tool_versions(),
                  "generator": f"{PACKAGE}.genstubs revision {GENERATOR_REVISION}"}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", "utf-8")
        for name in (*OUTPUTS, MARKER):  # the marker last: present means complete
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m flexvolume.csi.genstubs",
                                 description="Generate the CSI stubs (csi_pb2.py, csi_pb2_grpc.py).")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory to write them to (default: $GFUSE_CSI_STUBS_DIR, else flexvolume/csi/)")
    ap.add_argument("--proto", default=None, help="a csi.proto (spec v1.9 or later) to compile instead of "
                                                  "the extended v1.1 descriptor (or $GFUSE_CSI_PROTO)")
    ap.add_argument("--ember-wheel", default=None, help=f"a local {EMBER_WHEEL} (or $GFUSE_CSI_EMBER_WHEEL)")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = ap.parse_args(argv)
    try:
        out, written = generate(args.out, args.proto, args.ember_wheel, args.force)
    except StubsError as e:
        print(f"flexvolume.csi.genstubs: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"CSI stubs {'generated' if written else 'up to date'} in {out}")


if __name__ == "__main__":
    main()
