#!/usr/bin/env bash
# Builds Shoal's worker image (shoal/worker:latest) from workerimg/.
#
# The base image is chosen in this order, and the choice is printed with its reason:
#   1. $BASE_IMAGE, when set;
#   2. python:3.12-slim, when it is present locally or can be pulled within $PULL_TIMEOUT_S;
#   3. an offline Debian bookworm base with python3 (shoal/base-offline:bookworm), built once with
#      debootstrap and reused afterwards. Its rootfs lives under the user's cache directory, never
#      in the repository, and is deleted once imported.
# Safe to run again: an existing offline base is reused and docker's layer cache does the rest.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
worker_image="${SHOAL_WORKER_IMAGE:-shoal/worker:latest}"
public_base="python:3.12-slim"
offline_base="${SHOAL_OFFLINE_BASE:-shoal/base-offline:bookworm}"
pull_timeout_s="${PULL_TIMEOUT_S:-15}"
cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/shoal"
debian_mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

say() { echo "build-images: $*" >&2; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

build_offline_base() {
    if ! command -v debootstrap >/dev/null 2>&1; then
        say "debootstrap is missing; installing it with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        say "debootstrap needs root; run this script as root or set BASE_IMAGE"
        exit 1
    fi
    mkdir -p "$cache_dir"
    rootfs="$(mktemp -d "$cache_dir/rootfs-bookworm.XXXXXX")"
    # The rootfs is only an intermediate: it goes whether the import works or not.
    trap 'rm -rf --one-file-system "$rootfs"' EXIT
    say "bootstrapping Debian bookworm with python3 into $rootfs (takes a few minutes)"
    debootstrap --variant=minbase --include=python3 bookworm "$rootfs" "$debian_mirror" >&2
    # Trim what a runtime image never needs.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    say "importing $rootfs as $offline_base"
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        - "$offline_base" >/dev/null
    rm -rf --one-file-system "$rootfs"
    trap - EXIT
}

choose_base() {
    if [[ -n "${BASE_IMAGE:-}" ]]; then
        say "base: $BASE_IMAGE (BASE_IMAGE is set)"
        base="$BASE_IMAGE"
    elif image_exists "$public_base"; then
        say "base: $public_base (present locally)"
        base="$public_base"
    elif timeout "$pull_timeout_s" docker pull -q "$public_base" >/dev/null 2>&1; then
        say "base: $public_base (pulled)"
        base="$public_base"
    elif image_exists "$offline_base"; then
        say "base: $offline_base ($public_base could not be pulled; reusing the offline base)"
        base="$offline_base"
    else
        say "$public_base could not be pulled within ${pull_timeout_s}s; building an offline base"
        build_offline_base
        say "base: $offline_base (built now with debootstrap)"
        base="$offline_base"
    fi
}

choose_base
say "building $worker_image from $repo_dir/workerimg"
# The digest of the sources lets hack/test.sh and the tests see a stale image.
source_digest="$(cat "$repo_dir/workerimg/Dockerfile" "$repo_dir/workerimg/worker.py" | sha256sum | cut -c1-16)"
docker build \
    --build-arg "BASE_IMAGE=$base" \
    --label "shoal.source-digest=$source_digest" \
    --label "org.opencontainers.image.title=shoal-worker" \
    --label "org.opencontainers.image.base.name=$base" \
    --tag "$worker_image" \
    "$repo_dir/workerimg" >&2
say "built $worker_image on $base"
