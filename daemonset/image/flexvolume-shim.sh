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

# No live agent on this node. kubelet calls init as soon as this file appears (before the agent has
# started), and drops the plugin if init fails: answer it here, as the driver would.
case "${1:-}" in
    init)
        echo '{"status":"Success","capabilities":{"attach":false,"selinuxRelabel":false,"fsGroup":false,"supportsMetrics":true}}'
        exit 0
        ;;
    mount | unmount)
        echo '{"status":"Failure","message":"gfuse: the gfuse node agent is not running on this node (no live gfuse-agent pid in '"$PIDFILE"'); check the gfuse-node pod of this node (namespace gfuse-system)"}'
        exit 1
        ;;
    *)
        echo '{"status":"Not supported"}'
        exit 1
        ;;
esac
