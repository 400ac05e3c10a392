#!/usr/bin/env bash
# Runs Shoal's tests: sets up the virtual environment, makes sure a Docker
# engine answers and the worker image exists, then runs ruff and pytest.
# Arguments go to pytest (e.g. hack/test.sh tests/unit -k plan).
#
# Under CI=true a missing Docker engine or redis-server is a failure, never a skip.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_dir"

ensure_venv
if ensure_docker; then
    ensure_worker_image
elif in_ci; then
    log "CI=true and no Docker engine: failing"
    exit 1
else
    log "no Docker engine: Docker tests will be skipped"
fi
if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server || { in_ci && exit 1; }
fi

"$venv_dir/bin/ruff" check controller api hack tests
"$venv_dir/bin/mypy"
"$venv_dir/bin/python" -m pytest "${@:-tests}"
