# shellcheck shell=bash
# Shared by hack/up.sh, hack/test.sh and .ci/run: the virtual environment and
# the Docker engine. Sourced, not executed.

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${SHOAL_VENV:-$repo_dir/.venv}"
state_dir="${SHOAL_STATE_DIR:-$repo_dir/.state}"

log() { echo "shoal: $*" >&2; }

in_ci() { [[ "${CI:-}" =~ ^(1|true|yes)$ ]]; }

# -- pids -------------------------------------------------------------------------
# A pid file can outlive its process: after a crash the pid may name a zombie
# (dead, not yet reaped: `kill -0` still succeeds) or, once reused, any other
# process. These checks decide whether a recorded pid is still the process we
# started before anything trusts or signals it.

# The process's state letter (R, S, D, Z, ...); fails when there is no such pid.
pid_state() {
    local stat
    if [[ -d /proc/$1 ]]; then
        stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
        stat="${stat##*) }" # the name in parentheses may hold spaces: skip past it
        echo "${stat%% *}"
    else
        stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
        echo "${stat:0:1}"
    fi
}

# The process's arguments, one a line (approximated by splitting on blanks where
# there is no /proc).
pid_args() {
    if [[ -d /proc/$1 ]]; then
        tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null
    else
        ps -o command= -p "$1" 2>/dev/null | tr ' ' '\n'
    fi
}

# Succeeds when $1 is a pid that runs: not a zombie, not gone.
pid_alive() {
    local state
    [[ "$1" =~ ^[1-9][0-9]*$ ]] || return 1
    state="$(pid_state "$1")" || return 1
    [[ -n "$state" && "$state" != Z* && "$state" != X* ]]
}

# Succeeds when $1 runs this clone's `shoal up`: its arguments hold
# "$venv_dir/bin/shoal up" and "--state-dir $state_dir" (hack/up.sh starts it so).
is_shoal_up() {
    pid_alive "$1" || return 1
    local args=() i shoal=0 state=0
    mapfile -t args < <(pid_args "$1")
    for ((i = 0; i + 1 < ${#args[@]}; i++)); do
        [[ "${args[$i]}" == "$venv_dir/bin/shoal" && "${args[$((i + 1))]}" == up ]] && shoal=1
        [[ "${args[$i]}" == --state-dir && "${args[$((i + 1))]}" == "$state_dir" ]] && state=1
    done
    [[ "$shoal" == 1 && "$state" == 1 ]]
}

# Succeeds when $1 runs a dockerd.
is_dockerd() {
    pid_alive "$1" || return 1
    local first
    first="$(pid_args "$1" | head -n 1)"
    [[ "$(basename -- "${first:-none}")" == dockerd ]]
}

# Prints the pid in $state_dir/shoal.pid and succeeds when that process is this
# clone's running `shoal up`; fails (printing nothing) for a missing or stale file.
running_shoal_pid() {
    local file="$state_dir/shoal.pid" pid
    [[ -f "$file" ]] || return 1
    pid="$(head -n 1 "$file" 2>/dev/null)" || return 1
    is_shoal_up "$pid" || return 1
    echo "$pid"
}

# Creates .venv and installs Shoal with its test extras; repeats the install
# only when pyproject.toml changed since the last one.
ensure_venv() {
    local python="${PYTHON:-python3}"
    if [[ ! -x "$venv_dir/bin/python" ]]; then
        log "creating the virtual environment in $venv_dir"
        "$python" -m venv "$venv_dir"
    fi
    local stamp="$venv_dir/.shoal-installed"
    if [[ ! -f "$stamp" ]] || ! cmp -s "$repo_dir/pyproject.toml" "$stamp"; then
        log "installing Shoal and its dependencies into $venv_dir"
        # -qq: errors only (a failed build still shows its output); the warnings pip and
        # setuptools print on a first install are harmless and alarm newcomers.
        "$venv_dir/bin/python" -m pip install -qq --upgrade pip >&2
        "$venv_dir/bin/python" -m pip install -qq -e "${repo_dir}[test,dev]" >&2
        cp "$repo_dir/pyproject.toml" "$stamp"
    fi
}

apt_install() {
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "cannot install $* here (needs root and apt-get); install it and try again"
        return 1
    fi
    if [[ -z "${_shoal_apt_updated:-}" ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        _shoal_apt_updated=1
    fi
    log "installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# Makes sure a Docker engine answers. When none does and we may, installs
# docker.io and starts dockerd in the background (its pid goes to
# $state_dir/dockerd.pid so hack/down.sh can stop exactly that one).
ensure_docker() {
    if docker info >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        apt_install docker.io || return 1
    fi
    if docker info >/dev/null 2>&1; then
        return 0
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        log "no Docker engine answers and starting one needs root"
        return 1
    fi
    mkdir -p "$state_dir"
    log "starting dockerd in the background (log: $state_dir/dockerd.log)"
    nohup dockerd >"$state_dir/dockerd.log" 2>&1 &
    echo $! >"$state_dir/dockerd.pid"
    local i
    for i in $(seq 1 60); do
        if docker info >/dev/null 2>&1; then
            log "Docker engine is up"
            return 0
        fi
        sleep 1
    done
    log "dockerd did not answer within 60 s; see $state_dir/dockerd.log"
    return 1
}

ensure_worker_image() {
    local image="${SHOAL_WORKER_IMAGE:-shoal/worker:latest}" digest built
    digest="$(cat "$repo_dir/workerimg/Dockerfile" "$repo_dir/workerimg/worker.py" | sha256sum | cut -c1-16)"
    built="$(docker image inspect --format '{{index .Config.Labels "shoal.source-digest"}}' \
        "$image" 2>/dev/null || true)"
    if [[ "$built" == "$digest" ]]; then
        return 0
    fi
    "$repo_dir/hack/build-images.sh"
}
