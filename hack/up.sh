#!/usr/bin/env bash
# Brings Shoal up from a fresh clone: virtual environment, dependencies, a
# Docker engine (started if none runs and we are root), the worker image, and
# then `shoal up` with any arguments you pass (see `shoal up --help`).
#
#   hack/up.sh                      # foreground; Ctrl-C stops Shoal and its workers
#   hack/up.sh --detach             # background; logs in .state/shoal.log, stop with hack/down.sh
#
# Without a Docker engine it still runs, with workers as local processes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

detach=0
args=()
for arg in "$@"; do
    case "$arg" in
        -d | --detach) detach=1 ;;
        *) args+=("$arg") ;;
    esac
done

ensure_venv
if ensure_docker; then
    ensure_worker_image
else
    log "no Docker engine: Shoal will run workers as local processes"
fi

mkdir -p "$state_dir"
cmd=("$venv_dir/bin/shoal" up --state-dir "$state_dir" ${args[@]+"${args[@]}"})
if [[ "$detach" == 0 ]]; then
    exec "${cmd[@]}"
fi

if running="$(running_shoal_pid)"; then
    log "Shoal already runs (pid $running); hack/down.sh stops it"
    exit 1
fi
if [[ -f "$state_dir/shoal.pid" ]]; then
    # A crash leaves the file behind; its pid is gone, a zombie, or another process.
    log "pid file $state_dir/shoal.pid names no running Shoal; replacing it"
    rm -f "$state_dir/shoal.pid"
fi
# Keep the previous run's log: after a crash it is what tells why.
[[ -f "$state_dir/shoal.log" ]] && mv -f "$state_dir/shoal.log" "$state_dir/shoal.log.1"
nohup "${cmd[@]}" >"$state_dir/shoal.log" 2>&1 &
pid=$!
echo "$pid" >"$state_dir/shoal.pid"
port=8700
host=127.0.0.1
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --port) port="${args[$((i + 1))]}" ;;
        --port=*) port="${args[$i]#--port=}" ;;
        --host) host="${args[$((i + 1))]}" ;;
        --host=*) host="${args[$i]#--host=}" ;;
    esac
done
for _ in $(seq 1 100); do
    if ! pid_alive "$pid"; then
        log "Shoal exited at start; its log:"
        tail -n 30 "$state_dir/shoal.log" >&2
        exit 1
    fi
    if curl -fsS "http://$host:$port/healthz" >/dev/null 2>&1; then
        log "Shoal is up at http://$host:$port (pid $pid, log $state_dir/shoal.log)"
        exit 0
    fi
    sleep 0.2
done
log "Shoal did not answer on http://$host:$port within 20 s; see $state_dir/shoal.log"
exit 1
