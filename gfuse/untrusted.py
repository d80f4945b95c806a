"""What a Kubernetes object may ask of a gfuse mount, and how what it gives reaches libfuse; pure.

A PersistentVolume, a StorageClass (through the CSI volume context or a provisioned PV), the CSI mount
flags (``PV.spec.mountOptions``) and FlexVolume options are written by people who do not own the node.
They may choose the volume and how it is mounted, never a file on the node nor the node's security
settings: ``log-file=PATH`` would make the node append root-owned lines to any host path (following
symlinks), the TLS options name the node's key and certificates. Those options are the node admin's —
given to ``gfuse mount`` on the command line, or decided by the node agent — and :func:`check_options`
refuses them from Kubernetes with a message saying so.

Only the options in :data:`KUBERNETES_OPTIONS` pass: an option added to :data:`gfuse.options.KNOWN_OPTIONS`
stays the node's until it is added here (never add one that names a path or weakens the transport).
Unknown options are left to :func:`gfuse.options.parse_options`, which refuses them by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from .options import HOST_PATH_OPTIONS, IGNORED_OPTIONS, KNOWN_OPTIONS, SELINUX_OPTIONS, MountError

#: ``-o`` options a Kubernetes object may set
KUBERNETES_OPTIONS = frozenset({
    "backup-volfile-servers", "backupvolfile-server", "ro", "log-level", "allow_other", "subdir",
    "attribute-timeout", "entry-timeout", "read-ahead-kb", "ping-timeout", *SELINUX_OPTIONS,
})
#: the node's security settings (whether glusterd is spoken to over TLS): a PV must not turn them off
NODE_SETTINGS = frozenset({"secure-mgmt"})


def option_key(item: str) -> str:
    return item.partition("=")[0].strip()


def check_options(items: Iterable[str], where: str) -> None:
    """Raise :class:`MountError` for an item a Kubernetes object may not set (``where`` names the field the
    item came from, e.g. "PV spec.flexVolume.options.mountOptions")."""
    for item in items:
        key = option_key(item)
        if key in KUBERNETES_OPTIONS or key in IGNORED_OPTIONS or key.startswith("x-"):
            continue
        if key in HOST_PATH_OPTIONS:
            raise MountError(f"mount option {key!r} ({where}) names a file on the node: a PV, StorageClass or "
                             f"volume context cannot set it; the node's admin does (gfuse mount on the node, "
                             f"or the gfuse agent's configuration)")
        if key in KNOWN_OPTIONS or key in NODE_SETTINGS:
            raise MountError(f"mount option {key!r} ({where}) is the node's to decide: a PV, StorageClass or "
                             f"volume context cannot set it")


def libfuse_escape(value: str) -> str:
    """``value`` as one item of libfuse's ``-o`` list: libfuse splits at commas unless escaped with a
    backslash (and takes a backslash as the escape character)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")
