#!/bin/sh
# gfuse-install-flexvolume: install the gfuse FlexVolume driver into kubelet's plugin dir — an optional step.
#
# The FlexVolume driver is optional: the CSI driver of the same pod does not need it. So this never blocks
# the pod: whatever goes wrong (a read-only /usr on Flatcar, Talos or k3OS, a kubelet with another
# --volume-plugin-dir, a bad setting) is reported — on stdout, in `kubectl logs -c install-flexvolume`, and as
# the init container's termination message (`kubectl describe pod`) — and the script exits 0, unless
# FLEXVOLUME_REQUIRED is true.
#
# Environment (defaults in brackets):
#   FLEXVOLUME_INSTALL   [true]   "false": install nothing (report it and exit 0)
#   FLEXVOLUME_REQUIRED  [false]  "true": a failed install fails this container (and so holds the pod back)
#   FLEXVOLUME_PLUGIN_DIR  kubelet's --volume-plugin-dir on the host
#                        [/usr/libexec/kubernetes/kubelet-plugins/volume/exec]; made if missing
#   FLEXVOLUME_HOST_ROOT [/host]  where the host's / is mounted in this container
#   FLEXVOLUME_DIR       the plugin dir as this container sees it [$FLEXVOLUME_HOST_ROOT$FLEXVOLUME_PLUGIN_DIR]
#   FLEXVOLUME_VENDOR    [gfuse.example.org]    driver name in PVs: $FLEXVOLUME_VENDOR/$FLEXVOLUME_DRIVER
#   FLEXVOLUME_DRIVER    [gfuse]
#   GFUSE_AGENT_PIDFILE  host path of the agent's pid file [/run/gfuse/agent.pid]
#   GFUSE_AGENT_MATCH    text the agent's command line must contain [gfuse-agent] ("" skips the check)
#   GFUSE_FLEXVOLUME_CMD path of the real driver inside the agent container [/usr/local/bin/gfuse-flexvolume]
#   GFUSE_SHIM_TEMPLATE  [/usr/local/lib/gfuse/flexvolume-shim.sh]
#   TERMINATION_LOG      [/dev/termination-log]  where the one-line report also goes (if writable)
#
# Atomic: kubelet's prober ignores names starting with '.' and calls `init` on a driver directory as soon
# as it changes. The executable is written under a dot-name, then renamed into place (rename(2) within
# one filesystem); a first install renames a whole staged directory, so kubelet never sees a driver
# directory without its executable, nor a half-written executable.
set -u

FLEXVOLUME_INSTALL="${FLEXVOLUME_INSTALL:-true}"
FLEXVOLUME_REQUIRED="${FLEXVOLUME_REQUIRED:-false}"
FLEXVOLUME_PLUGIN_DIR="${FLEXVOLUME_PLUGIN_DIR:-/usr/libexec/kubernetes/kubelet-plugins/volume/exec}"
FLEXVOLUME_HOST_ROOT="${FLEXVOLUME_HOST_ROOT:-/host}"
shown="${FLEXVOLUME_DIR:-$FLEXVOLUME_PLUGIN_DIR}"   # the dir as the admin knows it (the host's path)
FLEXVOLUME_DIR="${FLEXVOLUME_DIR:-${FLEXVOLUME_HOST_ROOT%/}$FLEXVOLUME_PLUGIN_DIR}"
FLEXVOLUME_VENDOR="${FLEXVOLUME_VENDOR:-gfuse.example.org}"
FLEXVOLUME_DRIVER="${FLEXVOLUME_DRIVER:-gfuse}"
GFUSE_AGENT_PIDFILE="${GFUSE_AGENT_PIDFILE:-/run/gfuse/agent.pid}"
GFUSE_AGENT_MATCH="${GFUSE_AGENT_MATCH-gfuse-agent}"
GFUSE_FLEXVOLUME_CMD="${GFUSE_FLEXVOLUME_CMD:-/usr/local/bin/gfuse-flexvolume}"
GFUSE_SHIM_TEMPLATE="${GFUSE_SHIM_TEMPLATE:-/usr/local/lib/gfuse/flexvolume-shim.sh}"
TERMINATION_LOG="${TERMINATION_LOG:-/dev/termination-log}"

report() {
    echo "gfuse-install-flexvolume: $*"
    if [ -f "$TERMINATION_LOG" ] && [ -w "$TERMINATION_LOG" ]; then  # kubelet makes it for every container
        echo "gfuse-install-flexvolume: $*" > "$TERMINATION_LOG" 2> /dev/null
    fi
    return 0
}
# not installed: say why and what to do; exit 0 (the CSI part of the pod goes on) unless required
skip() {
    report "FlexVolume driver NOT installed: $*. The CSI driver is not affected." \
        "Set FLEXVOLUME_PLUGIN_DIR to kubelet's --volume-plugin-dir (daemonset/README.md lists the distributions)," \
        "or FLEXVOLUME_INSTALL=false."
    case "$FLEXVOLUME_REQUIRED" in true | yes | 1) exit 1 ;; esac
    exit 0
}

case "$FLEXVOLUME_INSTALL" in
    false | no | 0 | off)
        report "FlexVolume driver not installed (FLEXVOLUME_INSTALL=$FLEXVOLUME_INSTALL); the CSI driver is not affected"
        exit 0 ;;
esac
case "$FLEXVOLUME_VENDOR$FLEXVOLUME_DRIVER" in
    *'~'* | */* | *'|'* | *\'*) skip "FLEXVOLUME_VENDOR/FLEXVOLUME_DRIVER must not contain ~ / | or '" ;;
esac
[ -n "$FLEXVOLUME_DRIVER" ] || skip "FLEXVOLUME_DRIVER is empty"
for v in "$GFUSE_AGENT_PIDFILE" "$GFUSE_AGENT_MATCH" "$GFUSE_FLEXVOLUME_CMD"; do
    case "$v" in *'|'* | *\'* | *'"'* | *'\'*) skip "paths and match text must not contain | ' \" or \\: $v" ;; esac
done
case "$FLEXVOLUME_PLUGIN_DIR" in /*) ;; *) skip "FLEXVOLUME_PLUGIN_DIR must be an absolute path, not '$FLEXVOLUME_PLUGIN_DIR'" ;; esac
[ -r "$GFUSE_SHIM_TEMPLATE" ] || skip "shim template $GFUSE_SHIM_TEMPLATE not found"
if [ ! -d "$FLEXVOLUME_DIR" ]; then
    err=$(mkdir -p "$FLEXVOLUME_DIR" 2>&1) || skip "cannot create the plugin dir $shown on the host (${err##*: })"
fi

name="$FLEXVOLUME_VENDOR~$FLEXVOLUME_DRIVER"
dir="$FLEXVOLUME_DIR/$name"
stage="$FLEXVOLUME_DIR/.$name.install.$$"
trap 'rm -rf "$stage"' EXIT

rm -rf "$stage"
err=$(mkdir -m 0755 "$stage" 2>&1) || skip "cannot write to the plugin dir $shown (${err##*: })"
sed -e "s|@VENDOR@|$FLEXVOLUME_VENDOR|g" \
    -e "s|@DRIVER@|$FLEXVOLUME_DRIVER|g" \
    -e "s|@PIDFILE@|$GFUSE_AGENT_PIDFILE|g" \
    -e "s|@DRIVER_CMD@|$GFUSE_FLEXVOLUME_CMD|g" \
    -e "s|@AGENT_MATCH@|$GFUSE_AGENT_MATCH|g" \
    "$GFUSE_SHIM_TEMPLATE" > "$stage/$FLEXVOLUME_DRIVER" || skip "cannot write $stage/$FLEXVOLUME_DRIVER"
chmod 0755 "$stage/$FLEXVOLUME_DRIVER" || skip "cannot make $stage/$FLEXVOLUME_DRIVER executable"
sh -n "$stage/$FLEXVOLUME_DRIVER" || skip "the generated driver does not parse"

if [ ! -e "$dir" ] && mv -T "$stage" "$dir" 2> /dev/null; then
    report "installed $shown/$name/$FLEXVOLUME_DRIVER"
else
    [ -d "$dir" ] || skip "$shown/$name exists and is not a directory"
    tmp="$dir/.$FLEXVOLUME_DRIVER.new.$$"
    mv -f "$stage/$FLEXVOLUME_DRIVER" "$tmp" || skip "cannot write $tmp"
    mv -f -T "$tmp" "$dir/$FLEXVOLUME_DRIVER" || { rm -f "$tmp"; skip "cannot rename $tmp to $dir/$FLEXVOLUME_DRIVER"; }
    report "updated $shown/$name/$FLEXVOLUME_DRIVER"
fi
