#!/usr/bin/env bash
# Docker engine for the sandboxes, without systemd.
#   tools/docker_engine.sh start   start dockerd if it is not answering, then build the base image if absent
#   tools/docker_engine.sh stop    stop a dockerd started by this script
#   tools/docker_engine.sh image   (re)build the base image only
#   tools/docker_engine.sh runsc   register gVisor's runsc (if installed) as the engine's "runsc" runtime
#   tools/docker_engine.sh second  start a second engine on its own socket (unix://$SECOND_DIR/docker.sock, own
#                                  data-root, exec-root and pidfile under SECOND_DIR) with the same image, for the
#                                  tests of sandboxes placed on several engines; `stop-second` stops it
# The base image is Debian bookworm (debootstrap --variant=minbase) with python3, imported with
# `docker import` because no registry is reachable. The root filesystem tarball is cached under
# CACHE_DIR so that a wiped engine re-imports it in seconds instead of re-running debootstrap.
# runsc: when /usr/bin/runsc exists (Debian package runsc), `start` adds it to DAEMON_JSON's "runtimes"
# with RUNSC_ARGS (--network=none: gVisor's own network stack refuses Docker's netns here and sandboxes
# have none; --host-uds=open: the allow-list forwarder connects to its bind-mounted unix socket) and
# reloads a running engine with SIGHUP, so `docker run --runtime=runsc` works without a restart.
# Knobs: IMAGE, CACHE_DIR, DEBIAN_MIRROR (debootstrap's default when empty), EXTRA_PACKAGES, DAEMON_JSON, SECOND_DIR.
set -euo pipefail
IMAGE=${IMAGE:-klong-sandbox:bookworm}
CACHE_DIR=${CACHE_DIR:-/var/cache/klong-megatron}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-}
EXTRA_PACKAGES=${EXTRA_PACKAGES:-}
PACKAGES="python3,procps${EXTRA_PACKAGES:+,$EXTRA_PACKAGES}"
STATE_DIR=${STATE_DIR:-/run/klong-dockerd}
DAEMON_JSON=${DAEMON_JSON:-/etc/docker/daemon.json}
RUNSC_ARGS=${RUNSC_ARGS:---network=none --host-uds=open}
SECOND_DIR=${SECOND_DIR:-/var/lib/klong-dockerd2}
DOCKERD_ARGS=()

log() { echo "[docker_engine $(date +%H:%M:%S)] $*" >&2; }

engine_up() { docker info >/dev/null 2>&1; }

start_engine() {
    if engine_up; then
        log "engine already running"
        return
    fi
    command -v dockerd >/dev/null || { log "dockerd not installed (apt-get install docker.io)"; exit 1; }
    mkdir -p "$STATE_DIR"
    log "starting dockerd (--bridge=none --iptables=false), log: $STATE_DIR/dockerd.log"
    # setsid: the engine outlives this script and its caller's terminal.
    setsid dockerd --bridge=none --iptables=false --pidfile "$STATE_DIR/dockerd.pid" ${DOCKERD_ARGS[@]+"${DOCKERD_ARGS[@]}"} \
        >"$STATE_DIR/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        engine_up && { log "engine up"; return; }
        sleep 0.25
    done
    log "dockerd did not answer within 30 s; last log lines:"
    tail -n 20 "$STATE_DIR/dockerd.log" >&2
    exit 1
}

register_runsc() {
    local runsc
    runsc=$(command -v runsc) || { log "runsc not installed; the runsc runtime is not registered"; return 0; }
    local want
    want=$(python3 -c 'import json, sys; print(json.dumps({"path": sys.argv[1], "runtimeArgs": sys.argv[2].split()}))' \
        "$runsc" "$RUNSC_ARGS")
    if docker info --format '{{json .Runtimes.runsc}}' 2>/dev/null | python3 -c 'import json, sys; sys.exit(json.loads(sys.stdin.read() or "null") != json.loads(sys.argv[1]))' "$want"; then
        log "runtime runsc already registered ($RUNSC_ARGS)"
        return 0
    fi
    mkdir -p "$(dirname "$DAEMON_JSON")"
    # Merge into an existing daemon.json instead of overwriting the operator's settings.
    python3 - "$DAEMON_JSON" "$want" <<'PY'
import json, os, sys
path, want = sys.argv[1], json.loads(sys.argv[2])
cfg = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
cfg.setdefault("runtimes", {})["runsc"] = want
json.dump(cfg, open(path, "w"), indent=2)
PY
    local pid
    pid=$(cat "$STATE_DIR/dockerd.pid" 2>/dev/null || pgrep -x dockerd || true)
    [ -n "$pid" ] && kill -HUP "$pid"
    for _ in $(seq 1 40); do
        docker info --format '{{json .Runtimes.runsc}}' | grep -q -- "${RUNSC_ARGS##* }" &&
            { log "runtime runsc registered ($runsc $RUNSC_ARGS)"; return 0; }
        sleep 0.25
    done
    log "runsc written to $DAEMON_JSON but the engine did not load it (restart dockerd)"
}

build_image() {
    local tarball="$CACHE_DIR/bookworm-minbase-${PACKAGES//,/-}.tar"
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || { log "debootstrap not installed"; exit 1; }
        local root
        root=$(mktemp -d)
        trap 'rm -rf "$root"' RETURN
        mkdir -p "$CACHE_DIR"
        log "debootstrap --variant=minbase bookworm (+ $PACKAGES), ~1 min"
        # shellcheck disable=SC2086
        debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" $DEBIAN_MIRROR >"$CACHE_DIR/debootstrap.log" 2>&1 ||
            { log "debootstrap failed:"; tail -n 20 "$CACHE_DIR/debootstrap.log" >&2; exit 1; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    fi
    log "docker import $tarball -> $IMAGE"
    docker import --change 'CMD ["/bin/sh"]' "$tarball" "$IMAGE" >/dev/null
}

case "${1:-start}" in
start)
    start_engine
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        log "image $IMAGE present"
    else
        build_image
    fi
    register_runsc
    ;;
image) start_engine && build_image ;;
runsc) start_engine && register_runsc ;;
second | stop-second)
    STATE_DIR=$SECOND_DIR
    export DOCKER_HOST=unix://$SECOND_DIR/docker.sock
    if [ "$1" = stop-second ]; then
        [ -s "$STATE_DIR/dockerd.pid" ] && kill "$(cat "$STATE_DIR/dockerd.pid")" 2>/dev/null && log "second dockerd stopped"
        exit 0
    fi
    DOCKERD_ARGS=(--data-root "$SECOND_DIR/data" --exec-root "$SECOND_DIR/exec" -H "$DOCKER_HOST")
    start_engine
    docker image inspect "$IMAGE" >/dev/null 2>&1 || build_image
    ;;
stop)
    if [ -s "$STATE_DIR/dockerd.pid" ]; then
        kill "$(cat "$STATE_DIR/dockerd.pid")" && log "dockerd stopped"
    else
        log "no dockerd started by this script"
    fi
    ;;
*)
    echo "usage: $0 start|stop|image|runsc|second|stop-second" >&2
    exit 2
    ;;
esac
