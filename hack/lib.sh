# Shared by hack/up.sh, hack/test.sh and .ci/run: the virtual environment and
# the Docker engine. Sourced, not executed.

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${SHOAL_VENV:-$repo_dir/.venv}"
state_dir="${SHOAL_STATE_DIR:-$repo_dir/.state}"

log() { echo "shoal: $*" >&2; }

in_ci() { [[ "${CI:-}" =~ ^(1|true|yes)$ ]]; }

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
        "$venv_dir/bin/python" -m pip install -q --upgrade pip >&2
        "$venv_dir/bin/python" -m pip install -q -e "$repo_dir[test,dev]" >&2
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
