#!/usr/bin/env bash
# Stops a Shoal started with `hack/up.sh --detach` (by its recorded pid), which
# stops its workers too. With --engine, also stops the dockerd that hack/up.sh
# started (only that one, by pid).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stop_pid() {
    local file="$1" what="$2" pid
    [[ -f "$file" ]] || return 0
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $what (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
    fi
    rm -f "$file"
}

stop_pid "$state_dir/shoal.pid" "Shoal"
if [[ "${1:-}" == "--engine" ]]; then
    stop_pid "$state_dir/dockerd.pid" "dockerd"
fi
