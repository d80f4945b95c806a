"""Server-side storage for gfuse provisioners: glusterd access, provisioning backends, cluster set-up.

- :mod:`.api`       — the stable Backend API (``Backend``, ``ProvisionedVolume``, ``StorageError``)
- :mod:`.glusterd`  — how we talk to glusterd (the gluster CLI on glusterd's unix socket)
- :mod:`.backends`  — ``SubdirBackend`` (quota'd directories of a pool volume) and ``VolumeBackend``
  (one gluster volume per PV, bricks from registered brick pools), ``backend_for(params)``
- :mod:`.cluster`   — ``gfuse cluster init/status`` (independent mode)
"""

from .api import REASONS, Backend, ProvisionedVolume, StorageError

__all__ = ["REASONS", "Backend", "ProvisionedVolume", "StorageError"]
