"""``gfuse-csi``: the CSI plugin's gRPC server on a unix socket.

::

    gfuse-csi --endpoint unix:///var/lib/kubelet/plugins/gfuse.csi.example.org/csi.sock \\
              --nodeid "$NODE_NAME" --mode node --agent-socket /run/gfuse/agent.sock
    gfuse-csi --endpoint unix:///csi/csi.sock --mode controller      # with csi-provisioner/csi-resizer

``--mode node`` serves Identity + Node (needs the node agent, ``gfuse-agent``), ``controller``
Identity + Controller (needs the gluster CLI on a glusterd socket: ``--gluster-command``,
``--glusterd-socket``), ``both`` all three. SIGTERM/SIGINT stop it gracefully (the controller
unmounts its pool mounts; volumes staged on the node stay mounted: they belong to the pods and the
agent). Environment fallbacks: ``CSI_ENDPOINT``, ``NODE_ID`` (then the host name).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
import sys
import threading
from concurrent import futures

from . import DEFAULT_DRIVER_NAME, DEFAULT_ENDPOINT, DEFAULT_KUBELET_DIR, DEFAULT_STATE_DIR

log = logging.getLogger("gfuse.csi")

_DRIVER_NAME_MAX = 63


def socket_path(endpoint: str) -> str:
    """The filesystem path of a ``unix://`` endpoint (``unix:///p``, ``unix:/p`` or a bare ``/p``)."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise ValueError(f"endpoint {endpoint!r}: only unix sockets are supported (unix:///path/csi.sock)")
    if not path.startswith("/"):
        raise ValueError(f"endpoint {endpoint!r}: the socket path must be absolute")
    if len(path.encode()) > 107:
        raise ValueError(f"endpoint {endpoint!r}: a unix socket path is limited to 107 bytes")
    return path


def check_driver_name(name: str) -> str:
    import re

    if len(name) > _DRIVER_NAME_MAX or not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", name):
        raise ValueError(f"driver name {name!r}: at most {_DRIVER_NAME_MAX} characters, lower-case "
                         f"alphanumerics, '-' and '.', beginning and ending with an alphanumeric")
    return name


def _prepare_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: its server is gone
    else:
        raise ValueError(f"another process serves {path}")
    finally:
        probe.close()


class Plugin:
    """The configured services and their gRPC server."""

    def __init__(self, args: argparse.Namespace) -> None:
        import grpc

        from ..agentclient import AgentClient
        from .controller import ControllerService, backends_from_args
        from .identity import IdentityService
        from .node import NodeService
        from .stubs import csi_pb2_grpc

        self.args = args
        self.path = socket_path(args.endpoint)
        self._stopping = threading.Event()
        self.agent = AgentClient(args.agent_socket, timeout=10.0)
        node_mode = args.mode in ("node", "both")
        ctrl_mode = args.mode in ("controller", "both")
        self.node = NodeService(args.nodeid, args.kubelet_dir, self.agent, mount_timeout=args.mount_timeout) \
            if node_mode else None
        self.backends = backends_from_args(args, self.agent) if ctrl_mode else None
        self.controller = ControllerService(args.driver_name, self.backends) if self.backends else None
        self.identity = IdentityService(args.driver_name, controller=ctrl_mode,
                                        health=self.node.health if self.node else None)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="csi"),
                                  options=[("grpc.max_receive_message_length", 4 << 20)])
        csi_pb2_grpc.add_IdentityServicer_to_server(self.identity, self.server)
        if self.node is not None:
            csi_pb2_grpc.add_NodeServicer_to_server(self.node, self.server)
        if self.controller is not None:
            csi_pb2_grpc.add_ControllerServicer_to_server(self.controller, self.server)

    def start(self) -> None:
        _prepare_socket(self.path)
        old = os.umask(0o077)  # the socket is for kubelet and the sidecars (root) only
        try:
            port = self.server.add_insecure_port(f"unix://{self.path}")
        finally:
            os.umask(old)
        if not port:
            raise ValueError(f"cannot listen on unix://{self.path}")
        self.server.start()
        if self.node is not None and self.args.repair_interval > 0:
            threading.Thread(target=self.node.repair_loop, args=(self.args.repair_interval, self._stopping),
                             name="repair", daemon=True).start()
        log.info("gfuse CSI plugin %s (mode %s, node %s) listening on unix://%s", self.args.driver_name,
                 self.args.mode, self.args.nodeid, self.path)

    def stop(self, grace: float = 5.0) -> None:
        self._stopping.set()
        self.server.stop(grace).wait(grace + 1)
        if self.backends is not None:
            try:
                self.backends.close()
            except Exception:  # shutting down anyway
                log.exception("unmounting the pool mounts failed")
        try:
            os.unlink(self.path)
        except OSError:
            pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ..protocol import DEFAULT_SOCKET

    p = argparse.ArgumentParser(prog="gfuse-csi", description="gfuse CSI plugin (Identity, Node, Controller) "
                                "for GlusterFS volumes mounted with gfuse.")
    p.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT),
                   help="unix:///path/csi.sock to serve on (default $CSI_ENDPOINT or %(default)s)")
    p.add_argument("--nodeid", default=os.environ.get("NODE_ID") or socket.gethostname(),
                   help="this node's id, returned by NodeGetInfo (default $NODE_ID or the host name)")
    p.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME, help="CSI driver name (default %(default)s)")
    p.add_argument("--kubelet-dir", default=DEFAULT_KUBELET_DIR,
                   help="kubelet's root directory; the node service mounts only inside it (default %(default)s; "
                        "k3s and microk8s use other paths)")
    p.add_argument("--mode", choices=("node", "controller", "both"), default="both",
                   help="which services to serve besides Identity (default %(default)s)")
    p.add_argument("--agent-socket", default=DEFAULT_SOCKET,
                   help="the node agent's socket (default %(default)s)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                   help="where the controller mounts its pools (default %(default)s)")
    p.add_argument("--pool-mounter", choices=("private", "agent"), default="private",
                   help="how the controller mounts pools: its own 'gfuse mount' or through the node agent "
                        "(default %(default)s)")
    p.add_argument("--gluster-command", default=os.environ.get("GFUSE_GLUSTER_COMMAND", "gluster"),
                   help="controller: how to run the gluster CLI, e.g. 'kubectl exec -n glusterfs ds/glusterfs -- "
                        "gluster' (default $GFUSE_GLUSTER_COMMAND or %(default)s)")
    p.add_argument("--glusterd-socket", default=os.environ.get("GFUSE_GLUSTERD_SOCKET", "/var/run/glusterd.socket"),
                   help="controller: glusterd's unix socket, the CLI's --glusterd-sock; empty: the CLI's default "
                        "(default $GFUSE_GLUSTERD_SOCKET or %(default)s)")
    p.add_argument("--pool", default=os.environ.get("GFUSE_POOL") or None,
                   help="controller: the default pool volume (SERVER:/VOLUME or VOLUME) of StorageClasses without "
                        "'pool', and the brick pool registry of the volume backend (default $GFUSE_POOL)")
    p.add_argument("--mount-timeout", type=float, default=60.0, metavar="S",
                   help="time limit of one gfuse mount (default %(default)s)")
    p.add_argument("--repair-interval", type=float, default=10.0, metavar="S",
                   help="node: every S seconds, bind published targets left on a dead gfuse mount to the "
                        "repaired staging mount again; 0 disables (default %(default)s)")
    p.add_argument("--workers", type=int, default=8, help="concurrent RPCs (default %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = p.parse_args(argv)
    try:
        check_driver_name(args.driver_name)
        socket_path(args.endpoint)
    except ValueError as e:
        p.error(str(e))
    if not os.path.isabs(args.kubelet_dir):
        p.error(f"--kubelet-dir {args.kubelet_dir!r} must be absolute")
    if not args.nodeid:
        p.error("--nodeid is required")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        plugin = Plugin(args)
        plugin.start()
    except Exception as e:  # one line for the admin (stubs, socket, options)
        log.debug("start failed", exc_info=True)
        print(f"gfuse-csi: {e}", file=sys.stderr)
        sys.exit(1)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(3600):
        pass
    plugin.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
