#!/bin/sh
# apt-install PKG...: install the Debian packages among PKG that are not installed yet, without
# recommends, and clean apt's lists. Installs nothing (and needs no network) when a base image already has
# them all, which is how the image builds offline from a debootstrap base (see daemonset/README.md).
set -eu
missing=
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "apt-install: already installed: $*"
    exit 0
fi
echo "apt-install:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $missing
apt-get clean
rm -rf /var/lib/apt/lists/*
