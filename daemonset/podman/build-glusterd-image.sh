#!/usr/bin/env bash
# Build converged mode's GlusterFS server image (the Dockerfile's target `glusterd`) without a registry, as
# root with rootful podman, from the debootstrap base that scripts/build-image.sh makes for the gfuse image:
#
#   1. a "glusterd base": that base plus the Debian packages the glusterd stage installs which the base lacks
#      (glusterfs-server, glusterfs-cli, procps, libproc2-0), as .debs fetched on the host (`apt-get download`,
#      or apt's cache), installed with dpkg in a `podman build --network none`;
#   2. `podman build --network none --target glusterd --build-arg BASE_IMAGE=<glusterd base>` with the
#      repository's Dockerfile, unchanged (its apt-install then finds everything installed, needs no network).
#
#   daemonset/podman/build-glusterd-image.sh [-t IMAGE] [--base IMAGE] [--workdir DIR]
#
# Defaults: -t localhost/gfuse-glusterd:test, --base localhost/gfuse-base:bookworm, --workdir /var/tmp/gfuse-image.
# The image is labelled org.example.gfuse.glusterd-hash (Dockerfile + apt-install.sh + base image id):
# --print-hash prints the current one, so callers can tell a stale image. Takes ~20 s when the base exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=localhost/gfuse-glusterd:test
BASE=localhost/gfuse-base:bookworm
WORKDIR=/var/tmp/gfuse-image
PRINT=0
PKGS="glusterfs-server glusterfs-cli procps libproc2-0"
die() { echo "build-glusterd-image: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        -t | --tag) TAG="$2"; shift 2 ;;
        --base) BASE="$2"; shift 2 ;;
        --workdir) WORKDIR="$2"; shift 2 ;;
        --print-hash) PRINT=1; shift ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
base_id=$(podman image inspect --format '{{.Id}}' "$BASE" 2> /dev/null) \
    || die "base image $BASE is missing: run scripts/build-image.sh first (it makes it with debootstrap)"
hash=$( { cat Dockerfile daemonset/image/apt-install.sh; echo "$base_id $PKGS"; } | sha256sum | cut -c1-16)
if [ "$PRINT" = 1 ]; then echo "$hash"; exit 0; fi

debs="$WORKDIR/glusterd-debs"
mkdir -p "$debs"
for p in $PKGS; do
    ls "$debs/${p}_"*.deb > /dev/null 2>&1 && continue
    cached=$(ls /var/cache/apt/archives/"${p}_"*.deb 2> /dev/null | head -n 1 || true)
    if [ -n "$cached" ]; then
        cp "$cached" "$debs/"
    else
        (cd "$debs" && apt-get download "$p" > /dev/null 2>&1) || die "cannot get the $p package (apt-get download $p)"
    fi
done
ctx="$WORKDIR/glusterd-context.$$"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/debs" "$ctx/daemonset/image"
cp "$debs"/*.deb "$ctx/debs/"
printf 'FROM %s\nCOPY debs/ /tmp/debs/\nRUN dpkg -i /tmp/debs/*.deb && rm -rf /tmp/debs\n' "$BASE" > "$ctx/Containerfile.base"
podman build --network none -t localhost/gfuse-glusterd-base:build -f "$ctx/Containerfile.base" "$ctx" \
    > "$WORKDIR/glusterd-build.log" 2>&1 || die "glusterd base build failed: $(tail -n 15 "$WORKDIR/glusterd-build.log")"
# the Dockerfile's glusterd target copies only apt-install.sh (buildah skips the stages it does not need)
cp Dockerfile "$ctx/"
cp daemonset/image/apt-install.sh "$ctx/daemonset/image/"
podman build --network none --target glusterd --build-arg BASE_IMAGE=localhost/gfuse-glusterd-base:build \
    --label "org.example.gfuse.glusterd-hash=$hash" -t "$TAG" -f "$ctx/Dockerfile" "$ctx" \
    >> "$WORKDIR/glusterd-build.log" 2>&1 || die "podman build --target glusterd failed: $(tail -n 15 "$WORKDIR/glusterd-build.log")"
podman rmi localhost/gfuse-glusterd-base:build > /dev/null 2>&1 || true
podman image prune -f --filter "label=org.example.gfuse.glusterd-hash" > /dev/null 2>&1 || true
echo "build-glusterd-image: $TAG ready (hash $hash)" >&2
