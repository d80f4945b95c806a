#!/bin/sh
# gfuse-node-gluster ARGS...: the gluster CLI of this node's glusterd, run inside glusterd's own
# namespaces. The --gluster-command of the CSI controller (gfuse-csi, every mode) and of the FlexVolume
# provisioner in converged mode (gfuse-flexvolume-provisioner, daemonset/converged/): the pod runs on a storage
# node with hostPID, finds the glusterd process of the node and runs `gluster ARGS` with nsenter in its
# namespaces (see below).
#
# Why not the CLI in the provisioner's own container: glusterd carries out changes (volume create, quota
# limit-usage) only for requests on its unix socket (TCP 24007 serves read-only CLI requests), and the CLI
# must see glusterd's files to do quota: `volume quota VOL list` reads /var/lib/glusterd/vols/VOL/quota.conf
# and the auxiliary mount under /var/run/gluster that glusterd makes in *its* mount namespace. nsenter gives
# the CLI glusterd's view (socket, state, aux mounts) and glusterd's own gluster binary (same version).
#
# All of glusterd's namespaces but user and cgroup (mount, uts, ipc, net, pid: what `kubectl exec`/`podman
# exec` into glusterd's container gives), not only its mount namespace: a glusterd in a pod has a pid
# namespace of its own, and its /proc (in its mount namespace) is that pid namespace's. A CLI left in the
# host's pid namespace has no /proc/self there, so its first thread's pthread_setname_np
# (/proc/self/task/TID/comm: ENOENT) fails in mem_pools_init, before the CLI's logging is set up, and the
# warning it logs dereferences NULL: SIGSEGV, exit 139, no output (gluster 10.3; strace/gdb in
# daemonset/converged/README.md). Against a glusterd in the host's pid namespace this did not show.
#
# Entering a pid namespace makes nsenter fork: the CLI is its child, and a provisioner timeout that kills
# nsenter would leave the CLI running (holding the provisioner's pipes). So the pid namespace is entered
# first, and the child runs `setpriv --pdeathsig KILL nsenter --mount ... gluster` (this image's setpriv
# and nsenter, util-linux): the CLI (exec'd, no further fork) is killed with whatever kills the outer
# nsenter.
#
# GFUSE_GLUSTERD_PID: the glusterd to use (a host pid); unset: the only process named glusterd on the node.
# Fails with "Connection failed: ..." (what the provisioner reports as glusterd-unreachable) when there is
# no such process, it is ambiguous, or nsenter cannot enter it.
set -u
pid="${GFUSE_GLUSTERD_PID:-}"
if [ -z "$pid" ]; then
    found=
    for d in /proc/[0-9]*; do
        [ "$(cat "$d/comm" 2> /dev/null)" = glusterd ] && found="$found ${d#/proc/}"
    done
    n=$(echo $found | wc -w)
    if [ "$n" -ne 1 ]; then
        if [ "$n" -eq 0 ]; then
            why="no glusterd process on this node (is this a storage node, and does the pod have hostPID?)"
        else
            why="$n glusterd processes on this node (pids$found): set GFUSE_GLUSTERD_PID"
        fi
        echo "Connection failed: gfuse-node-gluster: $why" >&2
        exit 1
    fi
    pid=${found# }
fi
case "$pid" in
    '' | *[!0-9]*)
        echo "Connection failed: gfuse-node-gluster: GFUSE_GLUSTERD_PID=$pid is not a pid" >&2
        exit 1
        ;;
esac
if [ ! -e "/proc/$pid/root/usr/sbin/gluster" ]; then
    echo "Connection failed: gfuse-node-gluster: glusterd (pid $pid) has no /usr/sbin/gluster in its file system" >&2
    exit 1
fi
exec nsenter --target "$pid" --uts --ipc --net --pid -- \
    setpriv --pdeathsig KILL -- \
    nsenter --target "$pid" --mount -- /usr/sbin/gluster "$@"
