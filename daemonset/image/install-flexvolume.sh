#!/bin/sh
# gfuse-install-flexvolume: install the gfuse FlexVolume driver into kubelet's plugin dir.
#
# Environment (defaults in brackets):
#   FLEXVOLUME_DIR       the kubelet plugin dir as mounted in this container [/flexvolume]; on the host it
#                        is --volume-plugin-dir of kubelet [/usr/libexec/kubernetes/kubelet-plugins/volume/exec]
#   FLEXVOLUME_VENDOR    [gfuse.example.org]    driver name in PVs: $FLEXVOLUME_VENDOR/$FLEXVOLUME_DRIVER
#   FLEXVOLUME_DRIVER    [gfuse]
#   GFUSE_AGENT_PIDFILE  host path of the agent's pid file [/run/gfuse/agent.pid]
#   GFUSE_AGENT_MATCH    text the agent's command line must contain [gfuse-agent] ("" skips the check)
#   GFUSE_FLEXVOLUME_CMD path of the real driver inside the agent container [/usr/local/bin/gfuse-flexvolume]
#   GFUSE_SHIM_TEMPLATE  [/usr/local/lib/gfuse/flexvolume-shim.sh]
#
# Atomic: kubelet's prober ignores names starting with '.' and calls `init` on a driver directory as soon
# as it changes. The executable is written under a dot-name, then renamed into place (rename(2) within
# one filesystem); a first install renames a whole staged directory, so kubelet never sees a driver
# directory without its executable, nor a half-written executable.
set -eu

FLEXVOLUME_DIR="${FLEXVOLUME_DIR:-/flexvolume}"
FLEXVOLUME_VENDOR="${FLEXVOLUME_VENDOR:-gfuse.example.org}"
FLEXVOLUME_DRIVER="${FLEXVOLUME_DRIVER:-gfuse}"
GFUSE_AGENT_PIDFILE="${GFUSE_AGENT_PIDFILE:-/run/gfuse/agent.pid}"
GFUSE_AGENT_MATCH="${GFUSE_AGENT_MATCH-gfuse-agent}"
GFUSE_FLEXVOLUME_CMD="${GFUSE_FLEXVOLUME_CMD:-/usr/local/bin/gfuse-flexvolume}"
GFUSE_SHIM_TEMPLATE="${GFUSE_SHIM_TEMPLATE:-/usr/local/lib/gfuse/flexvolume-shim.sh}"

die() { echo "gfuse-install-flexvolume: $*" >&2; exit 1; }

case "$FLEXVOLUME_VENDOR$FLEXVOLUME_DRIVER" in
    *'~'* | */* | *'|'* | *\'*) die "FLEXVOLUME_VENDOR/FLEXVOLUME_DRIVER must not contain ~ / | or '" ;;
esac
[ -n "$FLEXVOLUME_DRIVER" ] || die "FLEXVOLUME_DRIVER is empty"
for v in "$GFUSE_AGENT_PIDFILE" "$GFUSE_AGENT_MATCH" "$GFUSE_FLEXVOLUME_CMD"; do
    case "$v" in *'|'* | *\'* | *'"'* | *'\'*) die "paths and match text must not contain | ' \" or \\: $v" ;; esac
done
[ -d "$FLEXVOLUME_DIR" ] || die "$FLEXVOLUME_DIR is not a directory (mount the host's plugin dir there)"
[ -r "$GFUSE_SHIM_TEMPLATE" ] || die "shim template $GFUSE_SHIM_TEMPLATE not found"

name="$FLEXVOLUME_VENDOR~$FLEXVOLUME_DRIVER"
dir="$FLEXVOLUME_DIR/$name"
stage="$FLEXVOLUME_DIR/.$name.install.$$"
trap 'rm -rf "$stage"' EXIT

rm -rf "$stage"
mkdir -m 0755 "$stage"
sed -e "s|@VENDOR@|$FLEXVOLUME_VENDOR|g" \
    -e "s|@DRIVER@|$FLEXVOLUME_DRIVER|g" \
    -e "s|@PIDFILE@|$GFUSE_AGENT_PIDFILE|g" \
    -e "s|@DRIVER_CMD@|$GFUSE_FLEXVOLUME_CMD|g" \
    -e "s|@AGENT_MATCH@|$GFUSE_AGENT_MATCH|g" \
    "$GFUSE_SHIM_TEMPLATE" > "$stage/$FLEXVOLUME_DRIVER"
chmod 0755 "$stage/$FLEXVOLUME_DRIVER"
sh -n "$stage/$FLEXVOLUME_DRIVER" || die "the generated driver does not parse"

if [ ! -e "$dir" ] && mv -T "$stage" "$dir" 2> /dev/null; then
    echo "gfuse-install-flexvolume: installed $dir/$FLEXVOLUME_DRIVER"
else
    [ -d "$dir" ] || die "$dir exists and is not a directory"
    tmp="$dir/.$FLEXVOLUME_DRIVER.new.$$"
    mv -f "$stage/$FLEXVOLUME_DRIVER" "$tmp"
    mv -f -T "$tmp" "$dir/$FLEXVOLUME_DRIVER" || { rm -f "$tmp"; die "cannot rename $tmp to $dir/$FLEXVOLUME_DRIVER"; }
    echo "gfuse-install-flexvolume: updated $dir/$FLEXVOLUME_DRIVER"
fi
