"""``gfuse-provisioner``: the FlexVolume dynamic provisioner as a long-running process.

Runs as the ``gfuse-flexvolume-provisioner`` Deployment (``daemonset/converged/``) under the
ServiceAccount of the same name (``daemonset/base/rbac-flexvolume-provisioner.yaml`` grants exactly
the calls this package makes: PVCs and their status, PVs, StorageClasses, Events, and its Lease in
``gfuse-system``; ``tests/unit/test_manifests.py`` derives them from the code). Cluster access: in-cluster config when
``KUBERNETES_SERVICE_HOST`` is set, else ``--kubeconfig`` / ``$KUBECONFIG`` / ``~/.kube/config``.

With ``--leader-elect`` (the default) replicas elect a leader on the Lease
``--leader-election-namespace``/``--leader-election-lease-name``; only the leader acts. A leader that
loses its Lease exits with status 1 (its Deployment restarts it as a follower); SIGTERM/SIGINT stop
it cleanly (the Lease is released) with status 0.

Storage: :func:`flexvolume.storage.backends.backend_for` picks the backend from each StorageClass's
parameters; it reaches glusterd by running ``--gluster-command`` (default ``gluster``) on
``--glusterd-socket``, mounts pool volumes under ``--state-dir``, and ``--pool`` is the default pool
volume (and, for the ``volume`` backend, the brick pool registry). The StorageClass parameters
``mountOptions`` and ``readOnly`` are the controller's (they go into the PV's flexVolume options),
all others are the backend's.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from .controller import PROVISIONER, BackendFactory, Controller

log = logging.getLogger("gfuse-provisioner")


def _lease_name(provisioner: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", provisioner.lower()).strip("-")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gfuse-provisioner", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                   help="kubeconfig file (unset: in-cluster config, else ~/.kube/config)")
    p.add_argument("--provisioner-name", default=PROVISIONER,
                   help="StorageClass provisioner this controller serves")
    p.add_argument("--identity", default=None, help="this replica's name in the Lease (unset: HOSTNAME_random)")
    p.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                   help="elect a leader among replicas (only the leader acts)")
    p.add_argument("--leader-election-namespace", default=os.environ.get("POD_NAMESPACE") or "gfuse-system")
    p.add_argument("--leader-election-lease-name", default=None,
                   help="Lease name (unset: the provisioner name, sanitized)")
    p.add_argument("--lease-duration", type=float, default=15.0, help="seconds a Lease is valid unrenewed")
    p.add_argument("--renew-deadline", type=float, default=10.0, help="leader stops acting if not renewed by then")
    p.add_argument("--retry-period", type=float, default=2.0, help="seconds between Lease attempts")
    p.add_argument("--pv-finalizer", action=argparse.BooleanOptionalAction, default=True,
                   help="put the finalizer gfuse.example.org/provisioner on new PVs with reclaim policy Delete (a PV "
                        "deleted by hand then still frees its storage); --no-pv-finalizer: none, and remove it from "
                        "existing PVs of this provisioner (do that before uninstalling: daemonset/README.md)")
    p.add_argument("--resync-period", type=float, default=300.0, help="seconds between full resyncs")
    p.add_argument("--watch-timeout", type=float, default=300.0, help="timeoutSeconds of each watch request")
    p.add_argument("--workers", type=int, default=4, help="claims/volumes worked on in parallel")
    p.add_argument("--retry-max", type=float, default=300.0, help="longest backoff between retries (seconds)")
    p.add_argument("--glusterd-socket", default=os.environ.get("GFUSE_GLUSTERD_SOCKET", "/var/run/glusterd.socket"),
                   help="glusterd's unix socket (the gluster CLI's --glusterd-sock)")
    p.add_argument("--gluster-command", default=os.environ.get("GFUSE_GLUSTER_COMMAND", "gluster"),
                   help="how to run the gluster CLI, e.g. 'kubectl exec -n glusterfs ds/glusterfs -- gluster'")
    p.add_argument("--pool", default=os.environ.get("GFUSE_POOL") or None,
                   help="default pool volume (SERVER:/VOLUME or VOLUME); StorageClass parameter 'pool' overrides")
    p.add_argument("--state-dir", default=os.environ.get("GFUSE_PROVISIONER_STATE", "/var/lib/gfuse/provisioner"),
                   help="where pool volumes are mounted and operation locks kept")
    p.add_argument("--log-level", default=os.environ.get("GFUSE_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def backend_factory(args: argparse.Namespace) -> BackendFactory:
    """StorageClass parameters → backend (one per distinct pool, sharing its mount)."""
    from ..storage.backends import backend_for
    from ..storage.glusterd import Glusterd

    glusterd = Glusterd(args.glusterd_socket or None, command=shlex.split(args.gluster_command))
    cache: dict[Any, Any] = {}
    return functools.partial(backend_for, glusterd=glusterd, pool=args.pool, state_dir=args.state_dir,
                             _cache=cache)


def api_client(kubeconfig: str | None) -> Any:
    from kubernetes import client, config

    if kubeconfig:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
    else:
        cfg = client.Configuration()
        config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s", stream=sys.stderr)
    identity = args.identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    try:
        factory = backend_factory(args)
        api = api_client(args.kubeconfig)
    except Exception as e:  # noqa: BLE001 - a configuration error: say it in one line
        log.error("cannot start: %s: %s", type(e).__name__, e)
        return 2

    elector = None
    if args.leader_elect:
        from .leader import LeaderElector

        try:
            elector = LeaderElector(api, args.leader_election_namespace,
                                    args.leader_election_lease_name or _lease_name(args.provisioner_name), identity,
                                    lease_duration=args.lease_duration, renew_deadline=args.renew_deadline,
                                    retry_period=args.retry_period)
        except ValueError as e:
            log.error("cannot start: %s", e)
            return 2

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    controller = Controller(api, factory, provisioner=args.provisioner_name, identity=identity,
                            is_leader=elector.is_leader if elector else (lambda: True),
                            resync_period=args.resync_period, watch_timeout=args.watch_timeout,
                            workers=args.workers, retry_max=args.retry_max, pv_finalizer=args.pv_finalizer)
    log.info("gfuse-provisioner %s: provisioner %s, leader election %s", identity, args.provisioner_name,
             f"on Lease {elector.namespace}/{elector.name}" if elector else "off")
    if elector is None:
        controller.run(stop)
        return 0
    if elector.run(stop, controller.run):
        return 0
    log.error("lost the leader Lease: exiting so that this replica restarts as a follower")
    return 1


if __name__ == "__main__":
    sys.exit(main())
