#!/usr/bin/env bash
# A throwaway Docker engine plus a Python 3.11 base image made from Debian
# packages, for machines that cannot pull from Docker Hub or ECR (CI here).
# tests/integration/test_docker_build.py uses whatever engine DOCKER_HOST names.
#
#   eval "$(sudo docker/local-engine.sh start)"   # exports DOCKER_HOST and SHARDLINE_DOCKER_BASE_IMAGE
#   .venv/bin/python -m pytest tests/integration/test_docker_build.py
#   sudo docker/local-engine.sh stop              # add --purge to delete its images too
#
# Needs root and Debian's package registry: installs docker.io and
# debootstrap if they are missing.  The engine gets its own socket, data
# and exec roots under $SHARDLINE_ENGINE_DIR (default /tmp/shardline-docker),
# no bridge and no iptables rules: build with --network host, run with
# --network none or host.  Everything it prints on stdout is shell to eval;
# progress goes to stderr.
#
# The base image `shardline-local-base:3.11` stands in for python:3.11-slim:
# Debian bookworm (minbase) with python3, venv and pip, `python`/`pip` on
# PATH, no EXTERNALLY-MANAGED marker, and the host's extra CA certificates
# (/usr/local/share/ca-certificates), so pip in a build trusts what the host
# trusts.

set -euo pipefail

DIR=${SHARDLINE_ENGINE_DIR:-/tmp/shardline-docker}
SOCK="unix://$DIR/docker.sock"
BASE_IMAGE=${SHARDLINE_LOCAL_BASE_IMAGE:-shardline-local-base:3.11}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

say() { echo "local-engine: $*" >&2; }

running() {
    [[ -f $DIR/dockerd.pid ]] && kill -0 "$(cat "$DIR/dockerd.pid")" 2>/dev/null
}

start_engine() {
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        say "installing docker.io and debootstrap"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >&2
    fi
    mkdir -p "$DIR/data" "$DIR/exec"
    if running; then
        say "dockerd already running (pid $(cat "$DIR/dockerd.pid"))"
    else
        say "starting dockerd (log: $DIR/dockerd.log)"
        setsid dockerd --host "$SOCK" --data-root "$DIR/data" --exec-root "$DIR/exec" \
            --pidfile "$DIR/dockerd.pid" --iptables=false --ip-forward=false --ip-masq=false \
            --bridge=none >"$DIR/dockerd.log" 2>&1 </dev/null &
    fi
    for _ in $(seq 1 60); do
        DOCKER_HOST=$SOCK docker info >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    say "dockerd did not answer on $SOCK; last lines of its log:"
    tail -n 20 "$DIR/dockerd.log" >&2
    return 1
}

build_base() {
    if DOCKER_HOST=$SOCK docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "$BASE_IMAGE exists"
        return 0
    fi
    local rootfs="$DIR/rootfs"
    rm -rf "$rootfs"
    say "debootstrap $SUITE into $rootfs (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" >"$DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$DIR/debootstrap.log" >&2; return 1; }
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/*
    say "importing $BASE_IMAGE"
    tar -C "$rootfs" -c . | DOCKER_HOST=$SOCK docker import \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

stop_engine() {
    if running; then
        local pid
        pid=$(cat "$DIR/dockerd.pid")
        say "stopping dockerd (pid $pid)"
        kill "$pid"
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
    fi
    # dockerd leaves its default network namespace (and sometimes the data
    # root) mounted; unmount whatever is left under $DIR, deepest first.
    local mount
    while read -r mount; do
        umount "$mount" 2>/dev/null || umount -l "$mount"
    done < <(awk -v dir="$DIR/" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r)
    if [[ ${1:-} == --purge ]]; then
        say "deleting $DIR"
        rm -rf "$DIR"
    fi
}

case ${1:-} in
    start)
        start_engine
        build_base
        echo "export DOCKER_HOST=$SOCK SHARDLINE_DOCKER_BASE_IMAGE=$BASE_IMAGE"
        ;;
    stop)
        stop_engine "${2:-}"
        ;;
    *)
        echo "usage: $0 start | stop [--purge]" >&2
        exit 2
        ;;
esac
