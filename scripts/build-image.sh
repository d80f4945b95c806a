#!/usr/bin/env bash
# Build the gfuse container image locally, without any image registry (as root, rootful podman):
#
#   1. a Debian bookworm base from debootstrap (minbase + the Debian packages the Dockerfile's stages
#      install: python3 python3-venv fuse3 glusterfs-client systemd util-linux ca-certificates), imported
#      with `podman import` (skipped when the base image exists);
#   2. a wheelhouse of the project and all its dependencies ("[k8s,csi]", setuptools/wheel for the build
#      backend, the ember-csi wheel whose CSI descriptor the stubs are generated from: the build stage runs
#      python3 -m flexvolume.csi.stubs offline), made on this host with Debian's python3
#      (same interpreter as the base, so pyfuse3 is compiled here and the build stage compiles nothing);
#   3. `podman build --network none --build-arg BASE_IMAGE=<base>` with the repository's Dockerfile,
#      unchanged, from a staging copy of the build context (so the wheelhouse never lands in the checkout).
#
#   scripts/build-image.sh [-t IMAGE] [--base IMAGE] [--rebuild-base] [--workdir DIR]
#
# Defaults: -t localhost/gfuse:test, --base localhost/gfuse-base:bookworm, --workdir /var/tmp/gfuse-image.
# Environment: MIRROR (Debian mirror for debootstrap, default the first deb.debian.org-style URI of apt's
# sources, else http://deb.debian.org/debian), PYTHON (python for pip wheel, default /usr/bin/python3),
# CONTAINERS_CONF (if unset, a file in the workdir selecting runc, cgroupfs and ulimits that work where crun
# fails on hybrid cgroups and podman's default ulimits are refused).
#
# The image gets the label org.example.gfuse.source-hash: a hash of the build inputs (Dockerfile,
# pyproject.toml, README.md, gfuse/, flexvolume/, daemonset/image/ scripts), so callers can tell a stale
# image (`scripts/build-image.sh --print-source-hash` prints the current one).
# Needs: podman, debootstrap (first run only), python3 with pip, and network access to a Debian mirror and
# PyPI (or pip's configured indexes) on the host; the image build itself runs with --network none.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
TAG=localhost/gfuse:test
BASE=localhost/gfuse-base:bookworm
WORKDIR=/var/tmp/gfuse-image
REBUILD_BASE=0
PYTHON="${PYTHON:-/usr/bin/python3}"
BASE_PACKAGES=python3,python3-venv,fuse3,glusterfs-client,systemd,util-linux,ca-certificates

die() { echo "build-image: $*" >&2; exit 1; }
log() { echo "build-image: $(date +%T) $*" >&2; }

source_hash() {
    # the build inputs the Dockerfile COPYs (tracked or not, caches excluded), plus the Dockerfile itself
    (cd "$ROOT" && find Dockerfile pyproject.toml README.md gfuse flexvolume daemonset/image \
        -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path 'daemonset/image/wheelhouse/*' \
        ! -name 'csi_pb2*.py' ! -name csi_stubs.json -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

while [ $# -gt 0 ]; do
    case "$1" in
        -t | --tag) TAG="$2"; shift 2 ;;
        --base) BASE="$2"; shift 2 ;;
        --workdir) WORKDIR="$2"; shift 2 ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        --print-source-hash) source_hash; exit 0 ;;
        -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (rootful podman, debootstrap)"
command -v podman > /dev/null || die "podman is not installed (apt-get install --no-install-recommends podman runc conmon catatonit)"
mkdir -p "$WORKDIR"

if [ -z "${CONTAINERS_CONF:-}" ]; then
    # crun fails on hybrid cgroups and podman's default ulimits need CAP_SYS_RESOURCE on these machines
    export CONTAINERS_CONF="$WORKDIR/containers.conf"
    cat > "$CONTAINERS_CONF.tmp" << 'EOF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF
    mv -f "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
fi

t0=$SECONDS
# ---- 1. base image -----------------------------------------------------------------------------------------
if [ "$REBUILD_BASE" = 1 ] || ! podman image exists "$BASE"; then
    command -v debootstrap > /dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    if [ -z "${MIRROR:-}" ]; then
        # apt's own mirror (one-line or deb822 sources; comments and security/snapshot archives skipped)
        MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2> /dev/null \
            | sed -e 's/#.*//' | grep -oE 'https?://[^ ]*/debian/?( |$)' | grep -v -e security -e snapshot \
            | head -n1 | tr -d ' ' || true)
        MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    fi
    rootfs="$WORKDIR/rootfs.$$"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm from $MIRROR into $rootfs (about a minute)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$MIRROR" > "$WORKDIR/debootstrap.log" 2>&1 \
        || die "debootstrap failed (is $MIRROR reachable?); last lines of $WORKDIR/debootstrap.log: $(tail -n 5 "$WORKDIR/debootstrap.log")"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    log "podman import $BASE"
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" > /dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "base image $BASE ready ($((SECONDS - t0)) s)"
else
    log "base image $BASE exists (--rebuild-base to make it again)"
fi

# ---- 2. wheelhouse -----------------------------------------------------------------------------------------
base_py=$(podman run --rm --network none "$BASE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
host_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$base_py" = "$host_py" ] || die "$PYTHON is Python $host_py, the base has $base_py: set PYTHON to a $base_py interpreter"
ctx="$WORKDIR/context"
rm -rf "$ctx"
mkdir -p "$ctx/daemonset/image/wheelhouse"
wheels="$WORKDIR/wheelhouse"
mkdir -p "$wheels"
log "wheelhouse in $wheels ($PYTHON, Python $host_py)"
rm -f "$wheels"/gfuse-*.whl
"$PYTHON" -m pip wheel -q --disable-pip-version-check -w "$wheels" "$ROOT[k8s,csi]" "setuptools>=68" wheel 2> "$WORKDIR/pip.log" \
    || die "pip wheel failed: $(grep -v '^WARNING: Location' "$WORKDIR/pip.log" | tail -n 5)"
ls "$wheels"/ember_csi-0.9.1-*.whl > /dev/null 2>&1 \
    || "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$wheels" ember-csi==0.9.1 \
        2>> "$WORKDIR/pip.log" || die "cannot download the ember-csi 0.9.1 wheel (CSI spec descriptor)"
rm -f "$wheels"/gfuse-*.whl   # the image installs the project from its source (/src), not from this wheel

# ---- 3. podman build with the repository's Dockerfile ------------------------------------------------------
# the build context: what the Dockerfile COPYs, nothing else (no .git, caches or test data)
cp -a Dockerfile pyproject.toml README.md "$ctx/"
# (not the host's generated CSI stubs: the image build generates its own into $GFUSE_CSI_STUBS_DIR)
tar -C "$ROOT" -c --exclude=__pycache__ --exclude='*.pyc' --exclude='csi_pb2*.py' --exclude=csi_stubs.json \
    gfuse flexvolume | tar -C "$ctx" -x
find daemonset/image -maxdepth 1 -type f -exec cp -a {} "$ctx/daemonset/image/" \;
cp -a "$wheels"/*.whl "$ctx/daemonset/image/wheelhouse/"
hash=$(source_hash)
log "podman build --network none -t $TAG (source hash $hash)"
podman build --network none --build-arg BASE_IMAGE="$BASE" --label "org.example.gfuse.source-hash=$hash" \
    -t "$TAG" -f "$ctx/Dockerfile" "$ctx" > "$WORKDIR/build.log" 2>&1 \
    || die "podman build failed; last lines of $WORKDIR/build.log:
$(tail -n 20 "$WORKDIR/build.log")"
rm -rf "$ctx"
# earlier builds' stages and replaced images (~1 GB a build): only dangling images carrying our label
podman image prune -f --filter "label=org.example.gfuse.source-hash" > /dev/null 2>&1 || true
log "image $TAG ready ($((SECONDS - t0)) s)"
