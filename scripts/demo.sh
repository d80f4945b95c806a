#!/usr/bin/env bash
# The main job, end to end on one Debian machine (as root): a GlusterFS replica-3 volume on
# loopback, probed and mounted with gfuse, used, checked against the native client, torn down.
#   sudo ./scripts/demo.sh            # replica 3 (default)
#   sudo ./scripts/demo.sh distrep    # 2 x 3 distributed-replicate
set -euo pipefail
cd "$(dirname "$0")/.."
KIND="${1:-replica3}"
PYTHON="${PYTHON:-python3}"

./scripts/install-deps.sh >/dev/null
step() { printf '\n== %s\n' "$*"; }

step "starting glusterd and creating a $KIND volume on loopback"
VOL=$("$PYTHON" -m testkit.cluster up --kind "$KIND" --keep --print-name)
MNT=$(mktemp -d /tmp/gfuse-demo.XXXXXX)
NATIVE=$(mktemp -d /tmp/gfuse-demo-native.XXXXXX)
cleanup() {
    set +e
    step "cleaning up"
    "$PYTHON" -m gfuse.cli umount "$MNT" 2>/dev/null
    umount "$NATIVE" 2>/dev/null
    rmdir "$MNT" "$NATIVE" 2>/dev/null
    "$PYTHON" -m testkit.cluster down "$VOL"
}
trap cleanup EXIT
SRC="127.0.0.1:/$VOL"

step "gfuse probe $SRC"
"$PYTHON" -m gfuse.cli probe "$SRC"

step "gfuse mount $SRC $MNT"
"$PYTHON" -m gfuse.cli mount "$SRC" "$MNT"
"$PYTHON" -m gfuse.cli status "$MNT"

step "using the mount"
mkdir -p "$MNT/app/data"
dd if=/dev/urandom of="$MNT/app/data/blob" bs=1M count=32 status=none
for i in $(seq 1 20); do echo "record $i" > "$MNT/app/data/r$i.txt"; done
ln -s data/blob "$MNT/app/latest"
setfattr -n user.owner -v demo "$MNT/app/data/blob"
ls -l "$MNT/app" "$MNT/app/data" | head -8
sha_gfuse=$(sha256sum < "$MNT/app/data/blob" | cut -d' ' -f1)
echo "sha256 through gfuse:  $sha_gfuse"

step "the native glusterfs client sees the same data"
mount -t glusterfs "$SRC" "$NATIVE"
sha_native=$(sha256sum < "$NATIVE/app/data/blob" | cut -d' ' -f1)
echo "sha256 through native: $sha_native"
echo "xattr through native:  $(getfattr --only-values -n user.owner "$NATIVE/app/data/blob")"
echo "files through native:  $(ls "$NATIVE/app/data" | wc -l)"
[ "$sha_gfuse" = "$sha_native" ] || { echo "MISMATCH" >&2; exit 1; }
gluster volume heal "$VOL" info | grep -E "^Number of entries" | sort | uniq -c

step "done: gfuse mounted, wrote and read $SRC; the native client agrees"
