#!/usr/bin/env bash
# Docker for the tests and the demo, on a machine that may have no Docker at all.
#
#   scripts/containers.sh engine-up | engine-down | images | env
#   scripts/containers.sh run -- COMMAND...     engine, images, COMMAND, no container left, stop
#   scripts/containers.sh compose -- COMMAND... docker-compose.yml up (local images), COMMAND, down
#
# engine-up uses the Docker engine that answers (DOCKER_HOST or the default socket); when none
# does, it installs Debian's docker.io if dockerd is missing and starts a private dockerd with
# its socket, data and pid file under .services/docker/ and no networking of its own
# (--bridge=none --iptables=false --ip-masq=false): containers run with host networking, so
# all their traffic stays on this machine. engine-down stops only that private dockerd, by pid.
#
# images builds the local images when they are missing: a Debian base from
# `debootstrap --variant=minbase` imported with `docker import`, then Kafka (Debian's Java and
# the jars scripts/services.sh resolves with Maven), Redis and PostgreSQL (Debian's packages)
# on top, each tagged with a checksum of its recipe, so a changed recipe rebuilds and an
# unchanged one is reused. See docs/services.md ("Containers").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES_DIR="${SERVICES_DIR:-$ROOT/.services}"
ENGINE_DIR="$SERVICES_DIR/docker"
RECIPES="$ROOT/scripts/containers"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
IMAGE_PREFIX="${CONTAINERS_IMAGE_PREFIX:-dedup-consumer}"
START_TIMEOUT="${SERVICES_START_TIMEOUT:-90}"
STOP_TIMEOUT="${SERVICES_STOP_TIMEOUT:-30}"
# Ports of the containers: not those of scripts/services.sh, so both can run side by side.
export CONTAINERS_KAFKA_PORT="${CONTAINERS_KAFKA_PORT:-19192}"
export CONTAINERS_KAFKA_CONTROLLER_PORT="${CONTAINERS_KAFKA_CONTROLLER_PORT:-19193}"
export CONTAINERS_REDIS_PORT="${CONTAINERS_REDIS_PORT:-16479}"
export CONTAINERS_PG_PORT="${CONTAINERS_PG_PORT:-15532}"
COMPOSE_PROJECT="${COMPOSE_PROJECT:-dedup-consumer-local}"

log() { printf '[containers] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
now_us() { echo "${EPOCHREALTIME/./}"; }
elapsed_since() {
    local d=$(($(now_us) - $1))
    printf '%d.%d' $((d / 1000000)) $((d % 1000000 / 100000))
}

apt_install() { # $@ = Debian packages
    export DEBIAN_FRONTEND=noninteractive
    log "installing $* with apt-get"
    apt-get install -y -q "$@" >&2 || { apt-get update -q >&2 && apt-get install -y -q "$@" >&2; }
}

# ---------------------------------------------------------------- the engine

# A unix socket path is limited to 107 bytes: a deep checkout keeps its engine in /tmp.
engine_paths() {
    local base=$ENGINE_DIR
    if ((${#base} > 60)); then
        base="/tmp/dedup-consumer-docker-$(echo "$ENGINE_DIR" | sha1sum | cut -c1-12)"
    fi
    RUN_DIR="$base/run"
    SOCKET="$base/docker.sock"
    PID_FILE="$ENGINE_DIR/dockerd.pid"
    DATA_DIR="$ENGINE_DIR/data"
    ENGINE_LOG="$ENGINE_DIR/dockerd.log"
}

private_alive() {
    local pid
    [[ -s $PID_FILE ]] || return 1
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "dockerd.*$DATA_DIR"
}

answers() { docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; }

cmd_engine_up() { # prints the DOCKER_HOST to use
    engine_paths
    if private_alive; then
        export DOCKER_HOST="unix://$SOCKET"
    elif answers; then
        log "using the Docker engine that answers (${DOCKER_HOST:-default socket})"
        echo "${DOCKER_HOST:-}"
        return 0
    fi
    if ! private_alive; then
        command -v dockerd >/dev/null || apt_install docker.io
        command -v docker >/dev/null || apt_install docker.io
        mkdir -p "$ENGINE_DIR" "$RUN_DIR" "$DATA_DIR"
        rm -f "$SOCKET" "$PID_FILE"
        local t0
        t0=$(now_us)
        log "starting a private dockerd (socket $SOCKET, data $DATA_DIR)"
        setsid dockerd --host "unix://$SOCKET" --data-root "$DATA_DIR" --exec-root "$RUN_DIR" \
            --pidfile "$PID_FILE" --bridge=none --iptables=false --ip-masq=false \
            --ip-forward=false --userland-proxy=false --storage-driver=overlay2 \
            </dev/null >>"$ENGINE_LOG" 2>&1 &
        export DOCKER_HOST="unix://$SOCKET"
        local deadline=$((SECONDS + START_TIMEOUT))
        until answers; do
            if ((SECONDS >= deadline)) || ! kill -0 $! 2>/dev/null; then
                tail -n 30 "$ENGINE_LOG" >&2
                die "dockerd did not answer within ${START_TIMEOUT}s (log: $ENGINE_LOG)"
            fi
            sleep 0.2
        done
        log "private dockerd $(tr -dc '0-9' <"$PID_FILE") ready after $(elapsed_since "$t0")s"
    fi
    echo "$DOCKER_HOST"
}

cmd_engine_down() { # stops the private dockerd (and the containerd it runs), never another one
    engine_paths
    private_alive || {
        rm -f "$PID_FILE"
        return 0
    }
    local pid i ctr_pid=""
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    [[ -s $RUN_DIR/containerd/containerd.pid ]] && ctr_pid="$(tr -dc '0-9' <"$RUN_DIR/containerd/containerd.pid")"
    log "stopping the private dockerd (pid $pid)"
    kill -TERM "$pid"
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "dockerd still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # dockerd stops the containerd it started; wait for that too
    for ((i = 0; i < 100; i++)); do
        [[ -n $ctr_pid ]] && kill -0 "$ctr_pid" 2>/dev/null || break
        sleep 0.1
    done
    # dockerd bind-mounts the host's network namespace into its exec-root and leaves it
    # there on exit; unmount ours, or the folder cannot be deleted
    if mountpoint -q "$RUN_DIR/netns/default" 2>/dev/null; then umount "$RUN_DIR/netns/default"; fi
    rm -f "$PID_FILE" "$SOCKET"
}

# ---------------------------------------------------------------- the images

recipe_sum() { # $@ = files and folders -> short checksum of their names and contents
    (cd "$ROOT" && find "$@" -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-12
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

build_base() { # sets BASE_IMAGE
    BASE_IMAGE="$IMAGE_PREFIX/debian:$DEBIAN_SUITE-$(echo "$DEBIAN_SUITE $DEBIAN_MIRROR minbase v1" | sha256sum | cut -c1-12)"
    have_image "$BASE_IMAGE" && return 0
    command -v debootstrap >/dev/null || apt_install debootstrap
    local t0 tree="$ENGINE_DIR/rootfs"
    t0=$(now_us)
    log "building $BASE_IMAGE: debootstrap --variant=minbase $DEBIAN_SUITE from $DEBIAN_MIRROR"
    rm -rf "$tree"
    debootstrap --variant=minbase "$DEBIAN_SUITE" "$tree" "$DEBIAN_MIRROR" >"$ENGINE_DIR/debootstrap.log" 2>&1 ||
        { tail -n 30 "$ENGINE_DIR/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
    tar -C "$tree" --numeric-owner -c . | docker import - "$BASE_IMAGE" >/dev/null
    rm -rf "$tree"
    log "$BASE_IMAGE built in $(elapsed_since "$t0")s"
}

build_service() { # $1 = kafka | redis | postgres; sets IMAGE[$1]
    local svc=$1 extra=() sum ctx t0
    [[ $svc == kafka ]] && extra=(scripts/kafka/pom.xml)
    sum="$(recipe_sum "scripts/containers/$svc" "${extra[@]}")-${BASE_IMAGE##*-}"
    IMAGE[$svc]="$IMAGE_PREFIX/$svc:$sum"
    have_image "${IMAGE[$svc]}" && return 0
    t0=$(now_us)
    ctx="$ENGINE_DIR/build-$svc"
    rm -rf "$ctx" && cp -r "$RECIPES/$svc" "$ctx"
    if [[ $svc == kafka ]]; then
        # the same jars as the local broker: resolved once by scripts/services.sh into
        # .services/kafka/libs (keyed by the pom's checksum), hard-linked into the context
        SERVICES_DIR="$SERVICES_DIR" bash "$ROOT/scripts/services.sh" kafka-libs >&2
        cp -al "$SERVICES_DIR/kafka/libs" "$ctx/libs" 2>/dev/null || cp -a "$SERVICES_DIR/kafka/libs" "$ctx/libs"
    fi
    log "building ${IMAGE[$svc]}"
    # the legacy builder: Debian's docker.io has no BuildKit plugin; host network because the
    # engine has no bridge (apt inside the build reaches the Debian mirror like the host)
    DOCKER_BUILDKIT=0 docker build -q --network host --build-arg "BASE=$BASE_IMAGE" \
        -t "${IMAGE[$svc]}" "$ctx" >"$ENGINE_DIR/build-$svc.log" 2>&1 ||
        { tail -n 30 "$ENGINE_DIR/build-$svc.log" >&2; die "docker build of $svc failed"; }
    rm -rf "$ctx"
    log "${IMAGE[$svc]} built in $(elapsed_since "$t0")s"
}

declare -A IMAGE=()

cmd_images() { # build what is missing; write and print the image settings
    [[ -n ${DOCKER_HOST:-} ]] || answers || die "no Docker engine answers: run engine-up first"
    mkdir -p "$ENGINE_DIR"
    build_base
    local svc
    for svc in kafka redis postgres; do build_service "$svc"; done
    cat >"$ENGINE_DIR/images.env" <<EOF
CONTAINERS_KAFKA_IMAGE=${IMAGE[kafka]}
CONTAINERS_REDIS_IMAGE=${IMAGE[redis]}
CONTAINERS_POSTGRES_IMAGE=${IMAGE[postgres]}
EOF
    cat "$ENGINE_DIR/images.env"
}

# ---------------------------------------------------------------- run and compose

ours() { # the containers of test runs and of our compose project that still exist
    docker ps -aq --filter label=org.testcontainers=true
    docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT"
}

STARTED_ENGINE=0
finish() { # [$1 = exit status]: assert that every container is gone, stop the engine we started
    local rc=${1:-$?} left
    trap - EXIT
    left="$(ours | sort -u)"
    if [[ -n $left ]]; then
        log "ERROR: containers left behind: $(echo "$left" | tr '\n' ' '); removing them"
        # shellcheck disable=SC2086
        docker rm -f $left >/dev/null || true
        ((rc)) || rc=1
    else
        log "no container left behind"
    fi
    if ((STARTED_ENGINE)); then cmd_engine_down; fi
    exit "$rc"
}

prepare() { # engine and images, exported for the command
    engine_paths
    private_alive || answers || STARTED_ENGINE=1
    DOCKER_HOST="$(cmd_engine_up)"
    if [[ -n $DOCKER_HOST ]]; then export DOCKER_HOST; else unset DOCKER_HOST; fi
    trap finish EXIT
    set -a
    # shellcheck disable=SC1090
    . <(cmd_images)
    set +a
    # Ryuk, testcontainers' reaper, is an image from a registry; the fixtures and finish()
    # remove the containers instead.
    export TESTCONTAINERS_RYUK_DISABLED="${TESTCONTAINERS_RYUK_DISABLED:-true}"
    export CONTAINERS_NETWORK="${CONTAINERS_NETWORK:-host}"
}

cmd_run() {
    prepare
    local t0 rc=0
    t0=$(now_us)
    "$@" || rc=$?
    log "command finished with status $rc after $(elapsed_since "$t0")s"
    return "$rc"
}

# docker-compose.yml as it is, less its `ports:` lists: with host networking the services
# listen on the machine's ports themselves, and docker-compose 1.29 refuses published ports
# next to network_mode: host (compose v2 would only warn). compose.host.yml adds the mode.
compose_file() {
    awk '/^    ports:$/ { skip = 1; next } skip && /^      - / { next } { skip = 0; print }' \
        "$ROOT/docker-compose.yml" >"$ENGINE_DIR/docker-compose.host-network.yml"
}

compose() {
    docker-compose -p "$COMPOSE_PROJECT" --project-directory "$ROOT" \
        -f "$ENGINE_DIR/docker-compose.host-network.yml" -f "$RECIPES/compose.host.yml" "$@"
}

compose_wait() { # every service healthy, or fail with its log
    local deadline=$((SECONDS + START_TIMEOUT * 2)) svc id state
    for svc in kafka redis postgres; do
        id="$(compose ps -q "$svc")"
        while :; do
            state="$(docker inspect -f '{{.State.Status}}/{{.State.Health.Status}}' "$id")"
            [[ $state == running/healthy ]] && break
            if [[ $state == exited/* ]] || ((SECONDS >= deadline)); then
                compose logs --tail 40 "$svc" >&2
                die "compose: $svc is $state"
            fi
            sleep 1
        done
        log "compose: $svc healthy"
    done
}

cmd_compose() { # docker-compose.yml with the local images and our ports; COMMAND; down
    prepare
    command -v docker-compose >/dev/null || apt_install docker-compose
    export KAFKA_IMAGE="$CONTAINERS_KAFKA_IMAGE" REDIS_IMAGE="$CONTAINERS_REDIS_IMAGE"
    export POSTGRES_IMAGE="$CONTAINERS_POSTGRES_IMAGE" LISTEN_HOST=127.0.0.1
    export KAFKA_PORT="$CONTAINERS_KAFKA_PORT" KAFKA_CONTROLLER_PORT="$CONTAINERS_KAFKA_CONTROLLER_PORT"
    export REDIS_PORT="$CONTAINERS_REDIS_PORT" PG_PORT="$CONTAINERS_PG_PORT"
    local t0 rc=0
    t0=$(now_us)
    compose_file
    compose up -d >&2
    # the command's exit status, not that of `down`
    trap 'rc=$?; compose down -v --remove-orphans >&2 || true; finish "$rc"' EXIT
    compose_wait
    log "compose: all services healthy after $(elapsed_since "$t0")s"
    export COMPOSE_ENV_FILE="$ENGINE_DIR/compose.env"
    cat >"$COMPOSE_ENV_FILE" <<EOF
# written by scripts/containers.sh compose: the services of docker-compose.yml
CONSUMER_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
CONSUMER_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
CONSUMER_POSTGRES_DSN=postgresql://postgres@127.0.0.1:$PG_PORT/consumer
EOF
    "$@" || rc=$?
    return "$rc"
}

usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

main() {
    local cmd=${1:-}
    shift || true
    [[ ${1:-} == -- ]] && shift
    case "$cmd" in
    engine-up) cmd_engine_up ;;
    engine-down) cmd_engine_down ;;
    images) cmd_images ;;
    run) cmd_run "$@" ;;
    compose) cmd_compose "$@" ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
