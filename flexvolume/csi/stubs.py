"""The CSI protocol stubs (``csi.v1`` messages and gRPC services), generated — never hand-written.

``from .stubs import csi_pb2, csi_pb2_grpc`` loads the modules that :mod:`flexvolume.csi.genstubs`
generated at install or image-build time (``scripts/install-deps.sh``, the ``Dockerfile``) from the CSI
spec's descriptor; see that module for where the spec comes from. They live in ``$GFUSE_CSI_STUBS_DIR``
if it is set (the image: ``/opt/gfuse/csi-stubs``), else in this package's directory (ignored by git),
and are importable as ``flexvolume.csi.csi_pb2`` and ``flexvolume.csi.csi_pb2_grpc``.

Importing this module never generates or downloads anything: when the stubs were never made it raises
:class:`StubsMissingError` (an ImportError) saying which command makes them.
``python3 -m flexvolume.csi.stubs`` is that command (it runs :func:`flexvolume.csi.genstubs.main`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

_PACKAGE = "flexvolume.csi"
GENERATE_COMMAND = "python3 -m flexvolume.csi.stubs"
OUTPUTS = ("csi_pb2.py", "csi_pb2_grpc.py")


class StubsMissingError(ImportError):
    """The generated stubs are not there (or do not load); the message names the command that makes them."""


def stubs_dir() -> Path:
    """Where the generated modules are looked for: ``$GFUSE_CSI_STUBS_DIR``, else this package's directory."""
    env = os.environ.get("GFUSE_CSI_STUBS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent


def source_info(directory: Path | None = None) -> dict[str, object]:
    """What the stubs were generated from (the ``csi_stubs.json`` genstubs writes next to them)."""
    try:
        return dict(json.loads(((directory or stubs_dir()) / "csi_stubs.json").read_text("utf-8")))
    except (OSError, ValueError):
        return {}


def _load(name: str, path: Path) -> types.ModuleType:
    full = f"{_PACKAGE}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, path)
    if spec is None or spec.loader is None:
        raise StubsMissingError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[full]
        raise
    setattr(sys.modules[_PACKAGE], name, mod)
    return mod


def load(directory: Path | None = None) -> tuple[types.ModuleType, types.ModuleType]:
    """``(csi_pb2, csi_pb2_grpc)`` from ``directory`` (default :func:`stubs_dir`); StubsMissingError if absent."""
    d = directory or stubs_dir()
    missing = [f for f in OUTPUTS if not (d / f).is_file()]
    if missing:
        raise StubsMissingError(f"{_PACKAGE}: the CSI stubs were never generated ({', '.join(missing)} missing "
                                f"in {d}); make them with: {GENERATE_COMMAND}")
    try:
        return _load("csi_pb2", d / "csi_pb2.py"), _load("csi_pb2_grpc", d / "csi_pb2_grpc.py")
    except ImportError as e:
        if isinstance(e, StubsMissingError):
            raise
        raise StubsMissingError(f"{_PACKAGE}: the CSI stubs in {d} do not load ({e}); "
                                f"make them again with: {GENERATE_COMMAND} --force") from None
    except Exception as e:  # noqa: BLE001 - protobuf's VersionError and the like: gencode vs runtime
        raise StubsMissingError(f"{_PACKAGE}: the CSI stubs in {d} do not load ({type(e).__name__}: "
                                f"{' '.join(str(e).split())}); make them again with: "
                                f"{GENERATE_COMMAND} --force") from None


#: the generated modules (typed Any: their classes are made at run time from the descriptor)
csi_pb2: Any
csi_pb2_grpc: Any

if __name__ == "__main__":
    from .genstubs import main

    main()
else:
    csi_pb2, csi_pb2_grpc = load()
