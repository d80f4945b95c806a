"""What the three CSI services share: errors, volume ids and context, capabilities, paths, locks.

Volume ids
----------
- ``subdir:SERVER:/POOL/DIR`` — a volume the controller made with the subdir backend: directory
  ``DIR`` of the pool volume ``SERVER:/POOL`` (see :mod:`flexvolume.csi.controller`). The node
  mounts ``SERVER:/POOL/DIR``. (The controller issued the same ids before it used quota.)
- ``volume:SERVER:/VOL`` — a volume the controller made with the volume backend: the gluster
  volume ``VOL`` (``gfuse_<name>``). The node mounts ``SERVER:/VOL``.
- ``SERVER[:PORT]:/VOL[/SUBDIR]`` — a pre-provisioned (static) volume named by its gluster source.
- anything else — a static volume whose ``volumeAttributes`` (the CSI volume context) give the
  source.

Volume context keys (``PV.spec.csi.volumeAttributes``; the controller fills them for its volumes)
--------------------------------------------------------------------------------------------------
``source`` (alias ``volume``)
    ``SERVER[:PORT]:/VOL[/SUBDIR]``; overrides what the id says.
``backupServers``
    other glusterd hosts for the volfile, ``h2:h3`` or ``h2,h3:24007``.
``mountOptions``
    extra ``gfuse mount -o`` items, comma-separated (e.g. ``ping-timeout=10``). Like the mount flags
    (``PV.spec.mountOptions``, a StorageClass's ``mountOptions``), they come from Kubernetes objects: only
    :data:`gfuse.untrusted.KUBERNETES_OPTIONS` pass (no ``log-file=``, no TLS files: the node's), and no
    ``subdir=``/``backup-volfile-servers=`` (``source``/``backupServers`` say those).
``readOnly``
    ``"true"`` mounts the volume read-only on every node.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from gfuse.mgmt import parse_servers, parse_volume_spec
from gfuse.options import MountError, parse_bool, parse_options, split_options
from gfuse.untrusted import check_options

from ..agentclient import AgentError
from ..storage.api import StorageError
from .stubs import csi_pb2

log = logging.getLogger(__name__)

SUBDIR_PREFIX = "subdir:"
VOLUME_PREFIX = "volume:"
#: CSI spec: ids and names SHOULD be at most 128 bytes; a CO may reject longer ones
MAX_ID_BYTES = 128

AccessMode = csi_pb2.VolumeCapability.AccessMode
READ_ONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY})
#: spec v1.5+: SINGLE_NODE_SINGLE_WRITER and SINGLE_NODE_MULTI_WRITER refine SINGLE_NODE_WRITER; a gfuse
#: volume serves them as it serves that one (the single-writer one is published at one target at a time:
#: see flexvolume.csi.node)
SUPPORTED_MODES = frozenset({
    AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY,
    AccessMode.MULTI_NODE_SINGLE_WRITER, AccessMode.MULTI_NODE_MULTI_WRITER,
    AccessMode.SINGLE_NODE_SINGLE_WRITER, AccessMode.SINGLE_NODE_MULTI_WRITER,
})


class CsiError(Exception):
    """Ends an RPC with a gRPC status ``code`` and a one-line ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = " ".join(str(message).split())


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


#: agent error codes (flexvolume.protocol.ERROR_CODES) → gRPC codes
AGENT_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "conflict": grpc.StatusCode.ALREADY_EXISTS,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "internal": grpc.StatusCode.INTERNAL,
}


def agent_error(e: AgentError, what: str) -> CsiError:
    return CsiError(AGENT_CODES.get(getattr(e, "code", "internal"), grpc.StatusCode.INTERNAL), f"{what}: {e}")


#: StorageError reasons (flexvolume.storage.api.REASONS) → gRPC codes. ``insufficient-nodes`` (a replica
#: count larger than the nodes with brick pools) is RESOURCE_EXHAUSTED, not INVALID_ARGUMENT: the request
#: is well formed and becomes possible, unchanged, when nodes are added; the CO keeps retrying it (an
#: impossible *value*, replica 0 or 17, is ``invalid-parameters``).
STORAGE_CODES = {
    "invalid-parameters": grpc.StatusCode.INVALID_ARGUMENT,
    "not-found": grpc.StatusCode.NOT_FOUND,
    "name-conflict": grpc.StatusCode.ALREADY_EXISTS,
    "pool-full": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "insufficient-nodes": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "no-brick-pools": grpc.StatusCode.FAILED_PRECONDITION,
    "pool-unavailable": grpc.StatusCode.UNAVAILABLE,
    "glusterd-unreachable": grpc.StatusCode.UNAVAILABLE,
    "busy": grpc.StatusCode.ABORTED,
    "gluster-error": grpc.StatusCode.INTERNAL,
}


def storage_error(e: StorageError) -> CsiError:
    return CsiError(STORAGE_CODES.get(e.reason, grpc.StatusCode.INTERNAL), str(e))


F = TypeVar("F", bound=Callable[..., Any])


def rpc(method: F) -> F:
    """Wrap a servicer method: CsiError/AgentError become their status, anything else INTERNAL."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            resp = method(self, request, context)
        except CsiError as e:
            log.warning("%s: %s %s", name, e.code.name, e.message)
            context.abort(e.code, e.message)
        except StorageError as e:
            err = storage_error(e)
            log.warning("%s: %s %s", name, err.code.name, err.message)
            context.abort(err.code, err.message)
        except AgentError as e:
            err = agent_error(e, "the gfuse agent")
            log.warning("%s: %s %s", name, err.code.name, err.message)
            context.abort(err.code, err.message)
        except Exception as e:  # the CO gets a status, the log the traceback
            log.exception("%s failed", name)
            context.abort(grpc.StatusCode.INTERNAL, f"{name}: {type(e).__name__}: {e}")
        log.debug("%s: OK", name)
        return resp

    return wrapper  # type: ignore[return-value]


def require(value: Any, field_name: str) -> None:
    """INVALID_ARGUMENT unless a required field is set (non-empty)."""
    if not value:
        raise invalid(f"{field_name} is required")


# ------------------------------------------------------------------------------------------------
# volumes


@dataclass(frozen=True)
class Volume:
    """Where a CSI volume lives in gluster, and how to mount it."""

    source: str                         # SERVER[:PORT]:/VOL[/SUBDIR]
    backup_servers: tuple[str, ...] = ()
    options: tuple[str, ...] = ()       # gfuse mount -o items
    readonly: bool = False

    def mount_options(self, extra: Sequence[str] = ()) -> list[str]:
        opts = list(self.options) + [o for o in extra if o not in self.options]
        if self.backup_servers:
            opts.append("backup-volfile-servers=" + ":".join(self.backup_servers))
        return opts


def check_source(source: str, what: str = "source") -> str:
    """``SERVER[:PORT]:/VOL[/SUBDIR]`` normalised; INVALID_ARGUMENT if it is not one."""
    try:
        spec = parse_volume_spec(source)
    except ValueError as e:
        raise invalid(f"{what}: {e}") from None
    if any(part in ("..", ".") for part in spec.subdir.split("/")):
        raise invalid(f"{what}: {source!r} has '.' or '..' in its subdirectory")
    host = spec.server.host
    host = f"[{host}]" if ":" in host else host
    port = "" if spec.server.port == 24007 else f":{spec.server.port}"
    return f"{host}{port}:/{spec.volume}" + (f"/{spec.subdir}" if spec.subdir else "")


def split_list(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,\s]+", text or "") if t.strip()]


def parse_backup_servers(text: str, what: str = "backupServers") -> tuple[str, ...]:
    if not text:
        return ()
    try:
        servers = parse_servers(text)
    except ValueError as e:
        raise invalid(f"{what}: {e}") from None
    if any(not s.host or "/" in s.host or " " in s.host for s in servers):
        raise invalid(f"{what}: {text!r} is not a list of hosts")
    # gfuse's backup-volfile-servers takes ':'-separated hosts (the default port)
    return tuple(s.host for s in servers)


def context_bool(context: Mapping[str, str], key: str) -> bool:
    try:
        return parse_bool(context.get(key) or "")
    except ValueError:
        raise invalid(f"volume context {key}: {context.get(key)!r} is not true or false") from None


def split_mount_options(text: str) -> list[str]:
    """``a,b c`` → items, split at commas and spaces outside double quotes (``context="u:r:t:s0:c1,c2"`` is
    one item)."""
    return [part for item in split_options(text)
            for part in ([item] if '"' in item else split_list(item))]


def check_mount_options(text: str | Sequence[str], what: str = "volume context mountOptions") -> tuple[str, ...]:
    """``gfuse mount -o`` items from a Kubernetes object (a text, or a list such as the CSI mount flags);
    INVALID_ARGUMENT for those that have their own key, that name files of the node or are the node's to
    decide (:mod:`gfuse.untrusted`), and for any :func:`gfuse.options.parse_options` refuses."""
    items = [text] if isinstance(text, str) else list(text)
    opts = tuple(o for item in items for o in split_mount_options(item))
    for opt in opts:
        if opt.split("=", 1)[0] in ("subdir", "backup-volfile-servers", "backupvolfile-server"):
            raise invalid(f"{what}: {opt!r} must be given as 'source'/'backupServers'")
    try:
        check_options(opts, what)
    except MountError as e:
        raise invalid(str(e)) from None
    try:
        parse_options(",".join(opts))
    except MountError as e:
        raise invalid(f"{what}: {e}") from None
    return opts


def volume_from(volume_id: str, context: Mapping[str, str]) -> Volume:
    """The gluster volume a CSI volume id (and its volume context) names."""
    source = context.get("source") or context.get("volume") or ""
    if source:
        source = check_source(source, "volume context 'source'")
    elif volume_id.startswith((SUBDIR_PREFIX, VOLUME_PREFIX)):
        source = check_source(volume_id.split(":", 1)[1], "volume id")
    else:
        try:
            source = check_source(volume_id, "volume id")
        except CsiError:
            raise CsiError(grpc.StatusCode.NOT_FOUND,
                           f"volume {volume_id!r}: the id names no gluster volume (SERVER:/VOL[/SUBDIR]) and "
                           f"the volume context has no 'source'") from None
    options = check_mount_options(context.get("mountOptions", ""))
    return Volume(
        source=source,
        backup_servers=parse_backup_servers(context.get("backupServers", "")),
        options=options,
        readonly=context_bool(context, "readOnly"),
    )


# ------------------------------------------------------------------------------------------------
# capabilities


def check_capability(cap: Any, what: str = "volume_capability") -> None:
    """INVALID_ARGUMENT unless ``cap`` is a filesystem (mount) capability with a mode we serve."""
    kind = cap.WhichOneof("access_type")
    if kind == "block":
        raise invalid(f"{what}: block volumes are not supported (gfuse volumes are filesystems)")
    if kind != "mount":
        raise invalid(f"{what}: access_type (mount) is required")
    if not cap.HasField("access_mode"):
        raise invalid(f"{what}: access_mode is required")
    mode = cap.access_mode.mode
    if mode not in SUPPORTED_MODES:
        name = AccessMode.Mode.Name(mode) if mode in AccessMode.Mode.values() else str(mode)
        raise invalid(f"{what}: access mode {name} is not supported")


def unsupported_capability(cap: Any) -> str | None:
    """Why ``cap`` is not supported, or None (for ValidateVolumeCapabilities)."""
    try:
        check_capability(cap)
    except CsiError as e:
        return e.message
    return None


def capability_readonly(cap: Any) -> bool:
    return cap.HasField("access_mode") and cap.access_mode.mode in READ_ONLY_MODES


# ------------------------------------------------------------------------------------------------
# paths and mounts


def check_path(path: str, root: str, what: str) -> str:
    """``path`` normalised; INVALID_ARGUMENT unless absolute and inside ``root`` (the kubelet dir).

    No realpath: resolving would stat through a possibly dead FUSE mount and hang.
    """
    require(path, what)
    if "\0" in path:
        raise invalid(f"{what} {path!r} holds a NUL byte")
    if not os.path.isabs(path):
        raise invalid(f"{what} {path!r} is not absolute")
    norm = os.path.normpath(path)
    root = os.path.normpath(root)
    if norm == root or not norm.startswith(root.rstrip("/") + "/"):
        raise invalid(f"{what} {path!r} is outside the kubelet directory {root} (see --kubelet-dir)")
    return norm


# ------------------------------------------------------------------------------------------------
# one operation per volume at a time


class OpLocks:
    """CSI: an operation on a volume while another is in flight on it SHOULD fail with ABORTED."""

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._mu = threading.Lock()

    @contextlib.contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        keys = tuple(k for k in keys if k)
        with self._mu:
            busy = [k for k in keys if k in self._held]
            if busy:
                raise CsiError(grpc.StatusCode.ABORTED,
                               f"an operation on {busy[0]!r} is already in progress; retry later")
            self._held.update(keys)
        try:
            yield
        finally:
            with self._mu:
                self._held.difference_update(keys)
