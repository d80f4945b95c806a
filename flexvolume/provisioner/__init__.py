"""Dynamic provisioning for the gfuse FlexVolume driver (``gfuse-provisioner``).

Kubernetes has no dynamic provisioning for FlexVolume, so this controller does it: it watches
PersistentVolumeClaims of StorageClasses whose ``provisioner`` is ``gfuse.example.org/gfuse`` and
creates (and, when released, deletes) PersistentVolumes with a ``flexVolume`` source for the gfuse
FlexVolume driver, backed by :mod:`flexvolume.storage` (a quota'd directory of a pool volume, or a
gluster volume of its own).

- :mod:`.controller` — informers, work queue, provisioning / deletion / expansion
- :mod:`.leader`     — leader election on a coordination.k8s.io/v1 Lease
- :mod:`.main`       — the ``gfuse-provisioner`` command
"""

from .controller import DRIVER, FINALIZER, PROVISIONER, Controller

__all__ = ["DRIVER", "FINALIZER", "PROVISIONER", "Controller"]
