#!/bin/sh
# gfuse FlexVolume driver as kubelet runs it: <plugin dir>/@VENDOR@~@DRIVER@/@DRIVER@ on the host.
# Installed by gfuse-install-flexvolume (the install-flexvolume init container of the gfuse-node DaemonSet).
#
# The real driver, gfuse-flexvolume, is Python and lives in the image of the gfuse-node agent container,
# not on the host. This shim runs it inside that container's mount namespace (nsenter), where the kubelet
# dir and /run/gfuse are mounted at the same paths as on the host, so argv and paths pass through as they
# are. stdin/stdout/stderr and the exit code are the driver's own.
# The agent container writes its (host, hostPID) pid to @PIDFILE@.
PIDFILE='@PIDFILE@'
DRIVER_CMD='@DRIVER_CMD@'
AGENT_MATCH='@AGENT_MATCH@'

pid=
if [ -r "$PIDFILE" ]; then
    read -r pid < "$PIDFILE" 2>/dev/null || pid=
fi
case "$pid" in
    '' | *[!0-9]*) pid= ;;
esac
if [ -n "$pid" ] && [ -e "/proc/$pid/root$DRIVER_CMD" ] \
    && { [ -z "$AGENT_MATCH" ] || tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$AGENT_MATCH"; } \
    && command -v nsenter > /dev/null 2>&1; then
    exec nsenter --target "$pid" --mount -- "$DRIVER_CMD" "$@"
fi

# No live agent on this node (not started yet, restarting, or gone with its DaemonSet).
# init: kubelet calls it as soon as this file appears (before the agent has started) and drops the plugin if
# it fails: answer it here, as the driver would (kubelet defaults every capability left out to true).
# mount: a Failure; kubelet retries, the pod waits in ContainerCreating until the agent is back.
# unmount: done here, as the driver does when it cannot reach the agent (flexvolume/driver.py, cmd_unmount):
# kubelet retries a failed unmount forever and the pod stays Terminating; the mount needs no agent to go
# (its FUSE server exits when the kernel ends the session). Only a gfuse mount is unmounted; the directory is
# removed, so an agent that comes back drops its record instead of mounting it again.
answer() { printf '{"status":"%s","message":"gfuse: %s"}\n' "$1" "$2"; }

# the file system type of the top mount at $1, from this (the host's) mount table; empty if none
fstype_at() {
    _t=
    while read -r _id _parent _dev _root _mnt _rest; do
        [ "$_mnt" = "$1" ] && { _t=${_rest#* - }; _t=${_t%% *}; }
    done < /proc/self/mountinfo
    printf '%s' "$_t"
}

case "${1:-}" in
    init)
        echo '{"status":"Success","capabilities":{"attach":false,"selinuxRelabel":false,"fsGroup":false,"supportsMetrics":true,"requiresFSResize":false}}'
        exit 0
        ;;
    mount)
        answer Failure "the gfuse node agent is not running on this node (no live gfuse-agent pid in $PIDFILE); check the gfuse-node pod of this node (namespace gfuse-system)"
        exit 1
        ;;
    unmount)
        dir=${2:-}
        [ "$dir" = / ] || dir=${dir%/}
        case "$dir" in
            /*) ;;
            *) answer Failure "usage: unmount <mount-dir> (an absolute path)"; exit 1 ;;
        esac
        case "$dir" in
            *[[:space:]\\\"]*) answer Failure "the gfuse agent is not running and this mount dir has characters the shim does not handle; start the gfuse-node pod of this node"; exit 1 ;;
        esac
        what="$dir was not mounted"
        n=0
        while fs=$(fstype_at "$dir"); [ -n "$fs" ]; do
            if [ "$fs" != fuse.gfuse ]; then
                answer Failure "$dir is mounted with $fs, which is not a gfuse mount; not unmounting it"
                exit 1
            fi
            n=$((n + 1))
            # -c: never stat the dir (a dead mount); -l: busy; plain -l: a umount without -c (busybox)
            if [ "$n" -gt 8 ] || ! { umount -c "$dir" || umount -c -l "$dir" || umount -l "$dir"; } 2> /dev/null; then
                answer Failure "the gfuse agent is not running and unmounting $dir here failed; check the gfuse-node pod of this node (namespace gfuse-system)"
                exit 1
            fi
            what="unmounted $dir"
        done
        rmdir "$dir" 2> /dev/null || true
        answer Success "$what without the gfuse agent (no live gfuse-agent pid in $PIDFILE)"
        exit 0
        ;;
    *)
        echo '{"status":"Not supported"}'
        exit 1
        ;;
esac
