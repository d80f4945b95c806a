"""The CSI protocol stubs (``csi.v1`` messages and gRPC services), generated — never hand-written.

Where they come from
--------------------
The CSI spec's ``csi.proto`` is compiled by PyPI's ``ember-csi`` 0.9.1 wheel into
``ember_csi/v1_1_0/csi_pb2.py`` (CSI spec v1.1.0). Those old stubs no longer import with a current
protobuf runtime, and ember-csi cannot be a normal dependency (it pulls in OpenStack Cinder). But
the file carries the compiled proto — the serialized ``FileDescriptorProto`` of ``csi.proto`` — as
one bytes literal. This module:

1. finds that file: in an installed ``ember-csi`` distribution if there is one, else in the wheel
   named by ``$GFUSE_CSI_EMBER_WHEEL``, else in the wheel cached under the stubs cache dir, else it
   downloads the wheel with ``python -m pip download --no-deps ember-csi==0.9.1`` into that cache
   (PyPI, checked against the pinned sha256 below);
2. reads the descriptor out of the file with :mod:`ast` (the file is never imported or executed);
3. writes it, with the Google well-known protos it imports, as a ``FileDescriptorSet`` and runs
   ``grpc_tools.protoc --descriptor_set_in=… --python_out --grpc_python_out`` (the protoc of the
   installed ``grpcio-tools``, so the code matches the installed protobuf runtime);
4. imports the result as ``flexvolume.csi.csi_pb2`` and ``flexvolume.csi.csi_pb2_grpc``.

Generation happens once, at the first import, into a cache directory keyed by the descriptor and
the protobuf/grpcio-tools versions (an upgrade regenerates): ``$GFUSE_CSI_STUBS_DIR`` if set, else
``$XDG_CACHE_HOME/gfuse/csi-stubs`` (``~/.cache/gfuse/csi-stubs``); if that is not writable, a
private temporary directory. It is safe when several processes import at once (each generates in
its own temporary directory and renames it into place). A container image bakes the stubs in at
build time with ``GFUSE_CSI_STUBS_DIR=/opt/gfuse/csi-stubs python -m flexvolume.csi.stubs``, so
nodes never download anything.

Spec v1.1 lacks a few newer fields (e.g. SINGLE_NODE_MULTI_WRITER, VolumeCondition); proto3
ignores unknown fields that a newer CO sends, so a kubelet speaking a later v1.x works.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

EMBER_VERSION = "0.9.1"
EMBER_WHEEL = f"ember_csi-{EMBER_VERSION}-py2.py3-none-any.whl"
EMBER_WHEEL_SHA256 = "5e305dfa0706dbb985411f3f76fe1c473110249d44c7859db97d2734bf5544b3"
EMBER_MEMBER = "ember_csi/v1_1_0/csi_pb2.py"
#: the CSI spec version these stubs implement
CSI_SPEC_VERSION = "1.1.0"
PROTO_NAME = "csi.proto"
GENERATOR_REVISION = "1"  # bump when the generation below changes

_PACKAGE = "flexvolume.csi"  # the generated modules are loaded as its submodules


class StubsError(RuntimeError):
    """The stubs could not be produced; the message says what to install or set."""


# ------------------------------------------------------------------------------------------------
# the descriptor


def _descriptor_from_source(text: str, where: str) -> bytes:
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _from_wheel(path: Path, check_hash: bool) -> bytes:
    if check_hash:
        got = _sha256(path)
        if got != EMBER_WHEEL_SHA256:
            raise StubsError(f"{path}: sha256 {got} is not the pinned {EMBER_WHEEL_SHA256} of {EMBER_WHEEL}")
    try:
        with zipfile.ZipFile(path) as z:
            text = z.read(EMBER_MEMBER).decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise StubsError(f"{path}: cannot read {EMBER_MEMBER}: {e}") from None
    return _descriptor_from_source(text, f"{path}!{EMBER_MEMBER}")


def _from_installed() -> bytes | None:
    try:
        dist = importlib.metadata.distribution("ember-csi")
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != EMBER_VERSION:
        return None
    f = Path(str(dist.locate_file(EMBER_MEMBER)))
    if not f.is_file():
        return None
    return _descriptor_from_source(f.read_text("utf-8"), str(f))


def _download_wheel(dest: Path) -> Path:
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
                             + " | ".join(tail) + "; set GFUSE_CSI_EMBER_WHEEL to a local copy")
        if _sha256(got) != EMBER_WHEEL_SHA256:
            raise StubsError(f"downloaded {EMBER_WHEEL} does not match the pinned sha256")
        final = dest / EMBER_WHEEL
        os.replace(got, final)
        return final


def csi_descriptor(cache_root: Path | None = None) -> bytes:
    """The serialized ``FileDescriptorProto`` of the CSI spec's ``csi.proto`` (v1.1.0)."""
    found = _from_installed()
    if found is not None:
        return found
    env = os.environ.get("GFUSE_CSI_EMBER_WHEEL")
    if env:
        return _from_wheel(Path(env), check_hash=True)
    root = cache_root or cache_dir()
    cached = root / EMBER_WHEEL
    if cached.is_file():
        try:
            return _from_wheel(cached, check_hash=True)
        except StubsError:
            with contextlib.suppress(OSError):
                cached.unlink()
    return _from_wheel(_download_wheel(root), check_hash=True)


# ------------------------------------------------------------------------------------------------
# generation


def cache_dir() -> Path:
    env = os.environ.get("GFUSE_CSI_STUBS_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gfuse" / "csi-stubs"


def _versions() -> str:
    out = []
    for dist in ("protobuf", "grpcio-tools"):
        try:
            out.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist}=none")
    return ",".join(out)


def _generate(descriptor: bytes, out: Path) -> None:
    """protoc the descriptor into ``out/csi_pb2.py`` and ``out/csi_pb2_grpc.py``."""
    try:
        from google.protobuf import descriptor_pb2, timestamp_pb2, wrappers_pb2
        from grpc_tools import protoc
    except ImportError as e:
        raise StubsError(f"generating the CSI stubs needs grpcio-tools and protobuf "
                         f"(pip install 'gfuse[csi]'): {e}") from None
    fds = descriptor_pb2.FileDescriptorSet()
    for mod in (descriptor_pb2, timestamp_pb2, wrappers_pb2):
        mod.DESCRIPTOR.CopyToProto(fds.file.add())
    csi = fds.file.add()
    csi.ParseFromString(descriptor)
    if csi.name != PROTO_NAME or csi.package != "csi.v1":
        raise StubsError(f"the descriptor is {csi.name!r} of package {csi.package!r}, not csi.proto/csi.v1")
    fds_path = out / "csi.fds"
    fds_path.write_bytes(fds.SerializeToString())
    args = ["grpc_tools.protoc", f"--descriptor_set_in={fds_path}", f"--python_out={out}",
            f"--grpc_python_out={out}", PROTO_NAME]
    # protoc prints its complaints on stderr and returns non-zero
    rc = protoc.main(args)
    if rc != 0:
        raise StubsError(f"grpc_tools.protoc failed with status {rc} ({' '.join(args)})")
    fds_path.unlink()
    grpc_file = out / "csi_pb2_grpc.py"
    text = grpc_file.read_text("utf-8")
    # protoc writes a top-level import; load the message module from our package instead
    old = "import csi_pb2 as csi__pb2"
    if old not in text:
        raise StubsError(f"unexpected protoc output: {old!r} not in csi_pb2_grpc.py")
    grpc_file.write_text(text.replace(old, f"from {_PACKAGE} import csi_pb2 as csi__pb2"), "utf-8")
    (out / "SOURCE").write_text(
        f"Generated by {_PACKAGE}.stubs from the serialized csi.proto (CSI spec v{CSI_SPEC_VERSION}) in "
        f"{EMBER_WHEEL}:{EMBER_MEMBER} with grpc_tools.protoc; {_versions()}\n", "utf-8")


def _key() -> str:
    """Names one generation: the descriptor's origin (pinned), the tool versions, this generator."""
    h = hashlib.sha256(f"{EMBER_WHEEL_SHA256}|{_versions()}|{GENERATOR_REVISION}|{sys.version_info[:2]}".encode())
    return h.hexdigest()[:20]


def ensure_stubs(root: Path | None = None) -> Path:
    """The directory holding generated ``csi_pb2.py`` and ``csi_pb2_grpc.py`` (generated if needed)."""
    root = root or cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=root, prefix=".w-")
        os.rmdir(probe)
    except OSError:
        root = Path(tempfile.mkdtemp(prefix="gfuse-csi-stubs-"))
    final = root / f"v{CSI_SPEC_VERSION}-{_key()}"
    if (final / "csi_pb2_grpc.py").is_file() and (final / "csi_pb2.py").is_file():
        return final
    descriptor = csi_descriptor(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".gen-"))
    try:
        _generate(descriptor, tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "csi_pb2_grpc.py").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load(name: str, path: Path) -> types.ModuleType:
    full = f"{_PACKAGE}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, path)
    if spec is None or spec.loader is None:
        raise StubsError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[full]
        raise
    setattr(sys.modules[_PACKAGE], name, mod)
    return mod


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """``(csi_pb2, csi_pb2_grpc)``, generating them first if needed."""
    d = ensure_stubs()
    pb2 = _load("csi_pb2", d / "csi_pb2.py")
    pb2_grpc = _load("csi_pb2_grpc", d / "csi_pb2_grpc.py")
    return pb2, pb2_grpc


csi_pb2, csi_pb2_grpc = load()


def main() -> None:
    """``python -m flexvolume.csi.stubs``: generate (if needed) and print the directory."""
    print(ensure_stubs())


if __name__ == "__main__":
    main()
