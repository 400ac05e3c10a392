#!/usr/bin/env bash
# Stops a Shoal started with `hack/up.sh --detach` (by its recorded pid), which
# stops its workers too. With --engine, also stops the dockerd that hack/up.sh
# started (only that one, by pid).
#
# A recorded pid is signalled only when it still runs what we started: after a
# crash it may be a zombie or, reused, an unrelated process. When the process
# outlives the wait (SHOAL_STOP_WAIT_S, default 30 s) this says so, keeps the
# pid file and exits 1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

wait_s="${SHOAL_STOP_WAIT_S:-30}"
if ! [[ "$wait_s" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    log "SHOAL_STOP_WAIT_S must be a number of seconds, not '$wait_s'"
    exit 2
fi

# stop_pid FILE WHAT CHECK: SIGTERM to the pid in FILE when CHECK (a function
# of the pid) says it is WHAT, then wait for it to end.
stop_pid() {
    local file="$1" what="$2" check="$3" pid steps i
    [[ -f "$file" ]] || return 0
    pid="$(head -n 1 "$file")"
    if ! "$check" "$pid"; then
        log "$file names pid ${pid:-(none)}, which is no running $what; nothing signalled"
        rm -f "$file"
        return 0
    fi
    log "stopping $what (pid $pid)"
    kill -TERM "$pid"
    steps="$(awk -v s="$wait_s" 'BEGIN { printf "%d", s / 0.2 }')"
    for ((i = 0; i < steps; i++)); do
        pid_alive "$pid" || break
        sleep 0.2
    done
    if pid_alive "$pid"; then
        log "$what (pid $pid) still runs ${wait_s} s after SIGTERM (it may still be stopping" \
            "its workers); $file kept. Run hack/down.sh again, or kill -KILL $pid"
        return 1
    fi
    rm -f "$file"
}

status=0
stop_pid "$state_dir/shoal.pid" "Shoal" is_shoal_up || status=1
if [[ "${1:-}" == "--engine" ]]; then
    stop_pid "$state_dir/dockerd.pid" "dockerd" is_dockerd || status=1
fi
exit "$status"
