"""The provisioning backend API shared by the provisioners (FlexVolume controller, CSI controller).

Stable: the FlexVolume provisioner (``flexvolume/provisioner/``) and the CSI controller program
against exactly this. Implementations live in :mod:`flexvolume.storage.backends`.

``Backend``
    ``create(name, size_bytes, params)``  idempotent per ``name``: a second call with the same name
        returns the same volume (growing it if ``size_bytes`` is larger is *not* done: use expand).
    ``delete(name)``                      idempotent; an unknown name is fine (returns None).
    ``expand(name, size_bytes)``          raises the capacity (never shrinks); StorageError
        ``not-found`` for an unknown name.
    ``get(name)``                         the volume, or None.

``name`` is the provisioner's volume name, e.g. ``pvc-<PVC uid>`` (what the external provisioner
library and the CSI ``CreateVolume.name`` give). Names are mapped deterministically to gluster
objects, so two different names never collide and a retry after a crash finds what the first
attempt made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "REASONS",
    "Backend",
    "ProvisionedVolume",
    "StorageError",
]

#: every StorageError.reason, and what an admin/user can do about it
REASONS: dict[str, str] = {
    "glusterd-unreachable": "glusterd does not answer on its socket: is it running, is the socket path right?",
    "gluster-error": "glusterd refused the operation; the message has gluster's own answer",
    "pool-full": "the pool (or every brick pool) has no room left for the requested size: add storage or ask for less",
    "insufficient-nodes": "the volume type needs more storage nodes (with registered brick pools) than there are",
    "no-brick-pools": "no brick pools are registered (run `gfuse cluster init`)",
    "invalid-parameters": "a StorageClass parameter is wrong; the message names it",
    "not-found": "no such volume",
    "name-conflict": "something not made by this provisioner already has the volume's name; it is left alone",
    "pool-unavailable": "the pool volume does not exist, is not started, or cannot be mounted",
    "busy": "another operation on the same volume is in progress; retry",
}


class StorageError(Exception):
    """An error a user or admin can act on. ``reason`` is one of :data:`REASONS`' keys."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = " ".join(str(message).split())

    def __str__(self) -> str:
        return f"{self.message} [{self.reason}]"


@dataclass
class ProvisionedVolume:
    """A volume as the provisioner needs it to write a PV."""

    name: str                 # the name given to create()
    source: str               # what to mount: "server:/vol" or "server:/vol/subdir"
    backup_servers: list[str] # other glusterd hosts for the volfile (mount -o backup-volfile-servers=a:b)
    size_bytes: int           # capacity enforced by gluster quota
    backend: str              # "subdir" | "volume"
    extra: dict[str, Any] = field(default_factory=dict)  # backend details (pool, dir, bricks, replica, ...)


@runtime_checkable
class Backend(Protocol):
    def create(self, name: str, size_bytes: int, params: Mapping[str, str]) -> ProvisionedVolume: ...

    def delete(self, name: str) -> None: ...

    def expand(self, name: str, size_bytes: int) -> ProvisionedVolume: ...

    def get(self, name: str) -> ProvisionedVolume | None: ...
