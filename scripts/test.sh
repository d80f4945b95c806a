#!/usr/bin/env bash
# The project's test command (as root): sudo ./scripts/test.sh [unit|cluster|k8s|podman] [pytest args...]
# Installs the dependencies, makes sure glusterd runs, then runs pytest with the given arguments.
# A first argument naming a test directory runs only it: `./scripts/test.sh unit` needs no server and
# takes seconds (no glusterd, no image build).
# Cluster tests fail instead of skipping here (GFUSE_REQUIRE_CLUSTER=1): this script installs
# GlusterFS, so a skip would hide a broken setup.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHON

SUITE=""
# Test processes (pytest-xdist): most of the suite's time is spent waiting on bricks, glusterd and timeouts,
# so two workers on two cores nearly halve it (measured: 1,185 s of test time in 600 s). Whole test modules go to one worker (--dist loadfile: a module's
# shared mounts and volumes stay in one process); every test owns its volumes, mounts, network namespaces
# and sockets, so workers never share one. GFUSE_TEST_WORKERS=0 runs everything in this process.
WORKERS="${GFUSE_TEST_WORKERS:-2}"
XDIST=()
case "$WORKERS" in
    0|1) ;;
    *[!0-9]*|"") echo "test.sh: GFUSE_TEST_WORKERS must be a number, not '$WORKERS'" >&2; exit 2 ;;
    *) XDIST=(-n "$WORKERS" --dist loadfile) ;;
esac
case "${1:-}" in
    unit|cluster|k8s|podman) SUITE="$1"; shift ;;
esac
./scripts/install-deps.sh
if [ "$SUITE" = unit ]; then
    exec "$PYTHON" -m pytest -q "${XDIST[@]}" --durations=10 tests/unit "$@"
fi
"$PYTHON" -c 'from testkit.cluster import ensure_glusterd; g = ensure_glusterd(); print(f"glusterd running, pid {g.pid}")'
export GFUSE_REQUIRE_CLUSTER="${GFUSE_REQUIRE_CLUSTER:-1}"
# The podman tests' images (the node image and converged mode's glusterd image) are built here, before
# any test runs, when missing or older than the checkout: making them reaches the network (a Debian mirror
# for debootstrap and the glusterd .debs, PyPI for the wheelhouse; ~3 min the first time), the tests then
# run offline. GFUSE_PODMAN_BUILD=0 skips this (the podman tests then skip unless the images exist).
export GFUSE_PODMAN_BUILD="${GFUSE_PODMAN_BUILD:-1}"
label() { podman image inspect --format "{{index .Labels \"$2\"}}" "$1" 2>/dev/null || true; }
if [ "$GFUSE_PODMAN_BUILD" != 0 ] && command -v podman >/dev/null 2>&1 && [ -e /dev/fuse ]; then
    if [ "$(label localhost/gfuse:test org.example.gfuse.source-hash)" != "$(./scripts/build-image.sh --print-source-hash)" ]; then
        ./scripts/build-image.sh
    fi
    if [ "$(label localhost/gfuse-glusterd:test org.example.gfuse.glusterd-hash)" != "$(./daemonset/podman/build-glusterd-image.sh --print-hash)" ]; then
        ./daemonset/podman/build-glusterd-image.sh
    fi
fi
exec "$PYTHON" -m pytest -q "${XDIST[@]}" --durations=15 ${SUITE:+"tests/$SUITE"} "$@"
