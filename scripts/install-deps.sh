#!/usr/bin/env bash
# Install what gfuse's tests need on Debian/Ubuntu (as root): GlusterFS server + native client,
# FUSE 3 (pyfuse3 builds against libfuse3-dev), attr (getfattr/setfattr), and the Python package
# with its test extras, then the CSI stubs (python3 -m flexvolume.csi.stubs). Idempotent: apt is skipped when every package is installed already, and
# pip only installs what is missing.
#   PYTHON=/path/to/python ./scripts/install-deps.sh   # choose the interpreter (default: python3)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
APT_PACKAGES=(glusterfs-server glusterfs-client fuse3 libfuse3-dev pkg-config attr
              # rootful podman for the DaemonSet-pod test (crun fails here: runc), debootstrap for its image
              podman runc conmon catatonit busybox-static debootstrap)

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: needs root (apt-get, glusterd, mounts); run: sudo $0" >&2
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    missing+=(python3-pip)  # Debian's python3 (e.g. under sudo's secure_path) has no pip
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps.sh: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "install-deps.sh: apt packages present: ${APT_PACKAGES[*]}"
fi

# Debian marks its own python3 externally managed; this is a throw-away test machine, so allow it
# (no effect on a pyenv/venv interpreter).
export PIP_BREAK_SYSTEM_PACKAGES=1
echo "install-deps.sh: $PYTHON -m pip install -e '.[test]' ($("$PYTHON" -c 'import sys; print(sys.executable)'))"
"$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore -q -e '.[test]'

# the CSI stubs (flexvolume/csi/csi_pb2*.py, ignored by git): generated here, never at import; a no-op when
# up to date (the spec descriptor's wheel is fetched from PyPI once, into ~/.cache/gfuse/)
"$PYTHON" -m flexvolume.csi.stubs

# mount(8) runs /sbin/mount.fuse.<subtype> for `mount -t fuse.gfuse` and fstab lines
helper="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/mount.fuse.gfuse"
if [ -x "$helper" ] && [ "$(readlink -f /sbin/mount.fuse.gfuse 2>/dev/null)" != "$(readlink -f "$helper")" ]; then
    ln -sf "$helper" /sbin/mount.fuse.gfuse
    echo "install-deps.sh: /sbin/mount.fuse.gfuse -> $helper"
fi
