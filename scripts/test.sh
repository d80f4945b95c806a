#!/usr/bin/env bash
# The project's test command (as root): sudo ./scripts/test.sh [pytest args...]
# Installs the dependencies, makes sure glusterd runs, then runs pytest with the given arguments.
# Cluster tests fail instead of skipping here (GFUSE_REQUIRE_CLUSTER=1): this script installs
# GlusterFS, so a skip would hide a broken setup.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHON

./scripts/install-deps.sh
"$PYTHON" -c 'from gfuse.testcluster import ensure_glusterd; g = ensure_glusterd(); print(f"glusterd running, pid {g.pid}")'
export GFUSE_REQUIRE_CLUSTER="${GFUSE_REQUIRE_CLUSTER:-1}"
# build the container image for the podman DaemonSet test when it is missing (~2.5 min the first time)
export GFUSE_PODMAN_BUILD="${GFUSE_PODMAN_BUILD:-1}"
exec "$PYTHON" -m pytest -q "$@"
