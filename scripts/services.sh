#!/usr/bin/env bash
# Local Kafka (KRaft, single node), Redis and PostgreSQL 15 without Docker.
#
#   scripts/services.sh up | down | status | env | clean
#   scripts/services.sh restart-redis | kill-kafka | start-kafka | restart-pg-immediate
#   scripts/services.sh redis-cluster-up | redis-cluster-down   (3 nodes, for cluster tests)
#
# KAFKA_SECURE_PORT=N adds a SASL_SSL listener on 127.0.0.1:N (PLAIN, SCRAM-SHA-256/512 and
# OAUTHBEARER with the broker's unsecured dev validator), with a CA, a broker and a client
# certificate made by openssl under .services/tls/; its settings go to .env (KAFKA_SECURE_*).
#
# Everything (data, logs, pid files, the Kafka jars) lives under .services/ (git-ignored).
# Only processes recorded in our own pid files are ever signalled.
# See docs/services.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES_DIR="${SERVICES_DIR:-$ROOT/.services}"
ENV_FILE="${ENV_FILE:-$ROOT/.env}"

KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19093}"
REDIS_PORT="${REDIS_PORT:-16379}"
PG_PORT="${PG_PORT:-15432}"
PG_DATABASE="${PG_DATABASE:-consumer}"
START_TIMEOUT="${SERVICES_START_TIMEOUT:-90}" # seconds, per service
STOP_TIMEOUT="${SERVICES_STOP_TIMEOUT:-30}"   # seconds before SIGKILL
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_SECURE_PORT="${KAFKA_SECURE_PORT:-}" # optional SASL_SSL listener, see the top
KAFKA_SECURE_USER="${KAFKA_SECURE_USER:-alice}"
KAFKA_SECURE_PASSWORD="${KAFKA_SECURE_PASSWORD:-alice-secret}" # a local dev broker's user
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"

KAFKA_DIR="$SERVICES_DIR/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$KAFKA_DIR/kafka.log"
REDIS_DIR="$SERVICES_DIR/redis"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"
PG_DIR="$SERVICES_DIR/pg" # may become a symlink, see pg_prepare_dir
PG_PID="$SERVICES_DIR/pg.pid"

declare -A STATE=() SECONDS_TAKEN=() LAUNCHED_AT=()

# ---------------------------------------------------------------- helpers

log() { printf '[services] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
now_us() { echo "${EPOCHREALTIME/./}"; }
elapsed_since() { # $1 = start in microseconds -> seconds with one decimal
    local d=$(($(now_us) - $1))
    printf '%d.%d' $((d / 1000000)) $((d % 1000000 / 100000))
}

port_open() { # $1 = port; true when something accepts TCP connections on 127.0.0.1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

read_pid() { # $1 = pid file -> pid on stdout, or nothing
    if [[ -s $1 ]]; then tr -dc '0-9' <"$1"; fi
}

pid_alive() { # $1 = pid file, $2 = pattern the process command line must contain
    local pid
    pid="$(read_pid "$1")"
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

spawn() { # $1 = pid file, $2 = log file, rest = command; detached, pid written by the child
    local pidfile=$1 logfile=$2
    shift 2
    # shellcheck disable=SC2016  # $$ and $@ belong to the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 &
    local i
    for i in $(seq 50); do
        [[ -s $pidfile ]] && return 0
        sleep 0.05
    done
    die "could not start: $*"
}

stop_pid() { # $1 = name, $2 = pid file, $3 = pattern; SIGTERM, wait, SIGKILL
    local name=$1 pidfile=$2 pattern=$3 pid i
    if ! pid_alive "$pidfile" "$pattern"; then
        rm -f "$pidfile"
        return 0
    fi
    pid="$(read_pid "$pidfile")"
    log "$name: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name: still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait_gone "$pid"
    rm -f "$pidfile"
}

kill_pid() { # $1 = name, $2 = pid file, $3 = pattern; SIGKILL at once (fault injection)
    local name=$1 pidfile=$2 pattern=$3 pid
    if pid_alive "$pidfile" "$pattern"; then
        pid="$(read_pid "$pidfile")"
        log "$name: SIGKILL pid $pid"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid"
    fi
    rm -f "$pidfile"
}

wait_gone() { # $1 = pid
    local i
    for i in $(seq 100); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.05
    done
}

# wait_ready NAME PIDFILE PATTERN LOGFILE CHECK...: poll CHECK until it succeeds; fail fast
# when the process dies, and fail after START_TIMEOUT seconds; both print the log's tail.
wait_ready() {
    local name=$1 pidfile=$2 pattern=$3 logfile=$4
    shift 4
    local deadline=$((SECONDS + START_TIMEOUT))
    while ! "$@" >/dev/null 2>&1; do
        if ! pid_alive "$pidfile" "$pattern"; then
            fail_with_log "$name" "$logfile" "process exited during start-up"
        fi
        if ((SECONDS >= deadline)); then
            fail_with_log "$name" "$logfile" "not ready after ${START_TIMEOUT}s"
        fi
        sleep 0.2
    done
}

fail_with_log() { # $1 = name, $2 = log file, $3 = message
    log "$1: $3; last lines of $2:"
    tail -n 40 "$2" >&2 2>/dev/null || true
    exit 1
}

refuse_foreign_port() { # $1 = name, $2 = port: a port taken by something we did not start
    if port_open "$2"; then
        ss -ltnp "( sport = :$2 )" >&2 2>/dev/null || true
        die "$1: port $2 is already in use by a process this script did not start"
    fi
}

apt_install() { # $@ = Debian packages
    export DEBIAN_FRONTEND=noninteractive
    log "installing $* with apt-get"
    apt-get install -y -q "$@" >&2 || { apt-get update -q >&2 && apt-get install -y -q "$@" >&2; }
}

# ---------------------------------------------------------------- kafka

kafka_fetch_libs() { # resolve the broker's jars with Maven once; keyed by the pom's checksum
    local pom="$ROOT/scripts/kafka/pom.xml" stamp="$KAFKA_LIBS/.pom.sha256" sum
    sum="$(sha256sum "$pom" | cut -d' ' -f1)"
    if [[ -f $stamp && "$(cat "$stamp")" == "$sum" ]]; then
        return 0
    fi
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    command -v mvn >/dev/null || apt_install maven
    log "kafka: resolving jars with Maven into $KAFKA_LIBS"
    rm -rf "$KAFKA_LIBS.tmp" "$KAFKA_LIBS"
    mkdir -p "$KAFKA_DIR"
    if ! mvn -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$KAFKA_LIBS.tmp" >"$KAFKA_DIR/mvn.log" 2>&1; then
        fail_with_log kafka "$KAFKA_DIR/mvn.log" "mvn could not resolve the Kafka jars"
    fi
    echo "$sum" >"$KAFKA_LIBS.tmp/.pom.sha256"
    mv "$KAFKA_LIBS.tmp" "$KAFKA_LIBS"
}

TLS_DIR="$SERVICES_DIR/tls"

tls_make() { # once: a CA, a broker certificate for 127.0.0.1/localhost, a client certificate
    [[ -s $TLS_DIR/broker.pem && -s $TLS_DIR/client.crt ]] && return 0
    command -v openssl >/dev/null || apt_install openssl
    mkdir -p "$TLS_DIR"
    log "tls: making a CA and certificates in $TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=dedup-consumer dev CA" \
        -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" 2>/dev/null
    local who
    for who in broker client; do
        openssl req -newkey rsa:2048 -nodes -subj "/CN=$who" -keyout "$TLS_DIR/$who.key" \
            -out "$TLS_DIR/$who.csr" 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$TLS_DIR/$who.ext"
        openssl x509 -req -in "$TLS_DIR/$who.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
            -CAcreateserial -days 3650 -extfile "$TLS_DIR/$who.ext" -out "$TLS_DIR/$who.crt" 2>/dev/null
    done
    # Kafka's PEM key store: the PKCS#8 key, then the certificate chain, in one file
    openssl pkcs8 -topk8 -nocrypt -in "$TLS_DIR/broker.key" -out "$TLS_DIR/broker.p8"
    cat "$TLS_DIR/broker.p8" "$TLS_DIR/broker.crt" "$TLS_DIR/ca.crt" >"$TLS_DIR/broker.pem"
}

kafka_secure_config() { # the SASL_SSL listener's part of server.properties, or nothing
    [[ -n $KAFKA_SECURE_PORT ]] || return 0
    local l=listener.name.sasl_ssl
    cat <<EOF
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512,OAUTHBEARER
$l.ssl.keystore.type=PEM
$l.ssl.keystore.location=$TLS_DIR/broker.pem
$l.ssl.truststore.type=PEM
$l.ssl.truststore.location=$TLS_DIR/ca.crt
$l.ssl.client.auth=requested
$l.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_SECURE_USER="$KAFKA_SECURE_PASSWORD";
$l.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
$l.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
$l.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;
EOF
}

kafka_scram_users() { # the SCRAM credentials live in the cluster metadata: set them once up
    [[ -n $KAFKA_SECURE_PORT ]] || return 0
    local mech
    kafka_java_cmd
    for mech in SCRAM-SHA-256 SCRAM-SHA-512; do # one per request: the broker refuses two
        "${KAFKA_JAVA[@]}" kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
            --alter --add-config "$mech=[password=$KAFKA_SECURE_PASSWORD]" \
            --entity-type users --entity-name "$KAFKA_SECURE_USER" >>"$KAFKA_LOG" 2>&1 ||
            fail_with_log kafka "$KAFKA_LOG" "adding the $mech user failed"
    done
    log "kafka: SASL_SSL listener on 127.0.0.1:$KAFKA_SECURE_PORT (user $KAFKA_SECURE_USER)"
}

kafka_write_config() {
    mkdir -p "$KAFKA_DIR/data"
    local listeners="PLAINTEXT://127.0.0.1:$KAFKA_PORT"
    local protocols="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    if [[ -n $KAFKA_SECURE_PORT ]]; then
        tls_make
        listeners+=",SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT"
        protocols+=",SASL_SSL:SASL_SSL"
    fi
    cat >"$KAFKA_DIR/server.properties" <<EOF
# generated by scripts/services.sh; edits are overwritten on every start
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=$listeners,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=$listeners
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols
log.dirs=$KAFKA_DIR/data
num.partitions=6
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
# after a SIGKILL the restarted broker may register only once the old registration's
# session expired (DUPLICATE_BROKER_REGISTRATION until then): keep that short
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=1000
num.network.threads=2
num.io.threads=4
log.retention.hours=24
$(kafka_secure_config)
EOF
    cat >"$KAFKA_DIR/log4j.properties" <<'EOF'
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.storage.internals.log=WARN
EOF
}

kafka_java_cmd() { # sets KAFKA_JAVA: the java command line, main class still to append
    local heap
    read -r -a heap <<<"$KAFKA_HEAP_OPTS"
    KAFKA_JAVA=(java "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
        -Dlog4j.configuration="file:$KAFKA_DIR/log4j.properties" -cp "$KAFKA_LIBS/*")
}

kafka_format() { # once: give the empty log dir a cluster id
    [[ -f $KAFKA_DIR/data/meta.properties ]] && return 0
    local cluster_id
    cluster_id="$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode())')"
    log "kafka: formatting storage, cluster id $cluster_id"
    kafka_java_cmd
    "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
        -c "$KAFKA_DIR/server.properties" >>"$KAFKA_LOG" 2>&1 ||
        fail_with_log kafka "$KAFKA_LOG" "storage format failed"
}

kafka_ready() { python3 "$ROOT/scripts/kafka/probe.py" 127.0.0.1 "$KAFKA_PORT"; }
kafka_running() { pid_alive "$KAFKA_PID" kafka.Kafka; }

kafka_launch() {
    kafka_fetch_libs
    kafka_write_config
    kafka_format
    refuse_foreign_port kafka "$KAFKA_PORT"
    refuse_foreign_port kafka-controller "$KAFKA_CONTROLLER_PORT"
    if [[ -n $KAFKA_SECURE_PORT ]]; then refuse_foreign_port kafka-secure "$KAFKA_SECURE_PORT"; fi
    printf '\n===== start %(%F %T)T =====\n' -1 >>"$KAFKA_LOG"
    kafka_java_cmd
    spawn "$KAFKA_PID" "$KAFKA_LOG" "${KAFKA_JAVA[@]}" kafka.Kafka "$KAFKA_DIR/server.properties"
}

kafka_wait() {
    wait_ready kafka "$KAFKA_PID" kafka.Kafka "$KAFKA_LOG" kafka_ready
    kafka_scram_users
}
kafka_stop() { stop_pid kafka "$KAFKA_PID" kafka.Kafka; }

# ---------------------------------------------------------------- redis

redis_ready() { [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }
redis_running() { pid_alive "$REDIS_PID" redis-server; }

redis_launch() {
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        apt_install redis-server
    fi
    mkdir -p "$REDIS_DIR"
    refuse_foreign_port redis "$REDIS_PORT"
    spawn "$REDIS_PID" "$REDIS_LOG" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
        --save '' --appendonly no --daemonize no --dir "$REDIS_DIR" --logfile '' \
        --maxclients 1000
}

redis_wait() { wait_ready redis "$REDIS_PID" redis-server "$REDIS_LOG" redis_ready; }
redis_stop() { stop_pid redis "$REDIS_PID" redis-server; }

# ---------------------------------------------------------------- redis cluster (optional)
# Three master nodes on REDIS_CLUSTER_PORT..+2, no replicas, no persistence: for the tests of
# CONSUMER_REDIS_CLUSTER. Started only by `redis-cluster-up`, stopped by it and by `down`.

REDIS_CLUSTER_PORT="${REDIS_CLUSTER_PORT:-16380}"
REDIS_CLUSTER_DIR="$SERVICES_DIR/redis-cluster"

cluster_ports() { echo "$REDIS_CLUSTER_PORT" $((REDIS_CLUSTER_PORT + 1)) $((REDIS_CLUSTER_PORT + 2)); }
cluster_ok() {
    redis-cli -h 127.0.0.1 -p "$REDIS_CLUSTER_PORT" cluster info 2>/dev/null | grep -q 'cluster_state:ok'
}

cmd_redis_cluster_up() {
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        apt_install redis-server
    fi
    local t0 port fresh=0 deadline
    t0=$(now_us)
    for port in $(cluster_ports); do
        local dir="$REDIS_CLUSTER_DIR/$port"
        if pid_alive "$dir/node.pid" redis-server; then continue; fi
        refuse_foreign_port "redis cluster node" "$port"
        rm -rf "$dir" && mkdir -p "$dir"
        spawn "$dir/node.pid" "$dir/node.log" redis-server --port "$port" --bind 127.0.0.1 \
            --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
            --save '' --appendonly no --daemonize no --dir "$dir" --logfile ''
        fresh=1
    done
    for port in $(cluster_ports); do
        wait_ready "redis cluster node $port" "$REDIS_CLUSTER_DIR/$port/node.pid" redis-server \
            "$REDIS_CLUSTER_DIR/$port/node.log" \
            bash -c "[[ \$(redis-cli -h 127.0.0.1 -p $port ping 2>/dev/null) == PONG ]]"
    done
    if ((fresh)) || ! cluster_ok; then
        local nodes=()
        for port in $(cluster_ports); do nodes+=("127.0.0.1:$port"); done
        redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >&2 ||
            die "redis cluster: create failed"
    fi
    deadline=$((SECONDS + START_TIMEOUT))
    until cluster_ok; do
        ((SECONDS < deadline)) || die "redis cluster: not ok after ${START_TIMEOUT}s"
        sleep 0.2
    done
    log "redis cluster: ok on 127.0.0.1:$(cluster_ports | tr ' ' ',') after $(elapsed_since "$t0")s"
    echo "redis://127.0.0.1:$REDIS_CLUSTER_PORT/0"
}

cmd_redis_cluster_down() {
    local port
    for port in $(cluster_ports); do
        [[ -d $REDIS_CLUSTER_DIR/$port ]] || continue
        stop_pid "redis cluster node $port" "$REDIS_CLUSTER_DIR/$port/node.pid" redis-server
    done
}

# ---------------------------------------------------------------- postgres
# PostgreSQL refuses to run as root, so it runs as the `postgres` system user (or a
# `consumerpg` user created here), owning .services/pg.

pg_user() { # the OS user that runs PostgreSQL; with $1 = create, make one when missing
    local user
    for user in postgres consumerpg; do
        id -u "$user" >/dev/null 2>&1 && echo "$user" && return 0
    done
    [[ ${1:-} == create ]] || return 0
    useradd --system --no-create-home --shell /usr/sbin/nologin consumerpg
    echo consumerpg
}

as_pg() { # run a command as the PostgreSQL user (or as ourselves when not root)
    if ((EUID == 0)); then
        (cd / && runuser -u "$PG_OS_USER" -- "$@")
    else
        "$@"
    fi
}

pg_locate() { # set the PostgreSQL paths; no side effects
    PG_OS_USER="$(pg_user)"
    local base=$PG_DIR
    # through the symlink the path may cross a folder closed to the postgres user
    if [[ -L $PG_DIR ]]; then base="$(readlink -f "$PG_DIR")"; fi
    PG_DATA="$base/data"
    PG_LOG="$base/postgres.log"
    PG_SOCKET_DIR="$base/run"
    # a unix socket path is limited to 107 bytes; over that listen on TCP only
    if ((${#PG_SOCKET_DIR} > 90)); then PG_SOCKET_DIR=""; fi
}

pg_prepare_dir() { # binaries, OS user and a data folder that user can write
    if [[ ! -x $PG_BIN/postgres ]]; then
        apt_install postgresql-15
    fi
    [[ -x $PG_BIN/postgres ]] || die "postgres: no server binaries in $PG_BIN (set PG_BIN)"
    PG_OS_USER="$(pg_user create)"
    if [[ ! -e $PG_DIR ]]; then
        mkdir -p "$PG_DIR"
        if ((EUID == 0)); then chown "$PG_OS_USER:" "$PG_DIR"; fi
        if ! as_pg test -w "$PG_DIR"; then
            # an ancestor of the work tree is closed to the postgres user: keep the
            # cluster in /var/tmp and point .services/pg at it
            local alt
            alt="/var/tmp/dedup-consumer-pg-$(echo "$SERVICES_DIR" | sha1sum | cut -c1-12)"
            log "postgres: $PG_DIR is not reachable by $PG_OS_USER, using $alt"
            rmdir "$PG_DIR"
            mkdir -p "$alt"
            chown "$PG_OS_USER:" "$alt"
            ln -s "$alt" "$PG_DIR"
        fi
    fi
    pg_locate
}

pg_init() { # once: a cluster with trust auth, plus our settings
    [[ -f $PG_DATA/PG_VERSION ]] && return 0
    log "postgres: initdb in $PG_DATA"
    as_pg touch "$PG_LOG" # owned by the postgres user, who appends to it later
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust --encoding=UTF8 \
        --no-locale --no-sync >>"$PG_LOG" 2>&1 || fail_with_log postgres "$PG_LOG" "initdb failed"
    echo "include_if_exists = 'consumer.conf'" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

pg_write_config() {
    if [[ -n $PG_SOCKET_DIR ]]; then as_pg mkdir -p "$PG_SOCKET_DIR"; fi
    as_pg tee "$PG_DATA/consumer.conf" >/dev/null <<EOF
# generated by scripts/services.sh; edits are overwritten on every start
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
max_connections = 200
shared_buffers = 128MB
logging_collector = off
EOF
}

pg_psql() { psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -X -q -v ON_ERROR_STOP=1 "$@"; }
pg_ready() {
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && pg_psql -d postgres -tAc 'select 1' >/dev/null
}
pg_running() { pid_alive "$PG_PID" postgres; }

pg_record_pid() { # the postmaster's pid is the first line of postmaster.pid
    local i
    for i in $(seq 100); do
        if [[ -s $PG_DATA/postmaster.pid ]]; then
            head -n1 "$PG_DATA/postmaster.pid" >"$PG_PID"
            return 0
        fi
        sleep 0.05
    done
}

pg_launch() {
    pg_init
    pg_write_config
    refuse_foreign_port postgres "$PG_PORT"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -W start >/dev/null ||
        fail_with_log postgres "$PG_LOG" "pg_ctl start failed"
    pg_record_pid
}

pg_wait() {
    wait_ready postgres "$PG_PID" postgres "$PG_LOG" pg_ready
    if [[ -z "$(pg_psql -d postgres -tAc "select 1 from pg_database where datname = '$PG_DATABASE'")" ]]; then
        pg_psql -d postgres -c "create database \"$PG_DATABASE\"" >/dev/null
    fi
}

pg_stop() {
    if pg_running; then
        log "postgres: stopping pid $(read_pid "$PG_PID")"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -t "$STOP_TIMEOUT" -w stop >/dev/null ||
            stop_pid postgres "$PG_PID" postgres
    fi
    rm -f "$PG_PID"
}

# ---------------------------------------------------------------- commands

SERVICES=(kafka redis pg)
declare -A PORT=([kafka]=$KAFKA_PORT [redis]=$REDIS_PORT [pg]=$PG_PORT)
declare -A PIDFILE=([kafka]=$KAFKA_PID [redis]=$REDIS_PID [pg]=$PG_PID)
declare -A NAME=([kafka]=kafka [redis]=redis [pg]=postgres)

launch() { # $1 = service: start it unless it already runs and answers
    local svc=$1
    if "${svc}_running"; then
        if "${svc}_ready"; then
            STATE[$svc]="already running"
            log "${NAME[$svc]}: already running (pid $(read_pid "${PIDFILE[$svc]}"))"
            return 0
        fi
        STATE[$svc]="started" # running but not answering yet: wait for it below
        LAUNCHED_AT[$svc]=$(now_us)
        return 0
    fi
    rm -f "${PIDFILE[$svc]}"
    LAUNCHED_AT[$svc]=$(now_us)
    "${svc}_launch"
    STATE[$svc]="started"
}

await() { # $1 = service
    local svc=$1
    [[ ${STATE[$svc]} == started ]] || return 0
    "${svc}_wait"
    SECONDS_TAKEN[$svc]="$(elapsed_since "${LAUNCHED_AT[$svc]}")"
    log "${NAME[$svc]}: ready on 127.0.0.1:${PORT[$svc]} after ${SECONDS_TAKEN[$svc]}s"
}

write_env() {
    cat >"$ENV_FILE.tmp" <<EOF
# written by scripts/services.sh up
CONSUMER_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
CONSUMER_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
CONSUMER_POSTGRES_DSN=postgresql://postgres@127.0.0.1:$PG_PORT/$PG_DATABASE
EOF
    if [[ -n $KAFKA_SECURE_PORT ]]; then # not CONSUMER_*: tests/secure.py reads them
        cat >>"$ENV_FILE.tmp" <<EOF
KAFKA_SECURE_BOOTSTRAP=127.0.0.1:$KAFKA_SECURE_PORT
KAFKA_SECURE_CA_FILE=$TLS_DIR/ca.crt
KAFKA_SECURE_CERT_FILE=$TLS_DIR/client.crt
KAFKA_SECURE_KEY_FILE=$TLS_DIR/client.key
KAFKA_SECURE_USER=$KAFKA_SECURE_USER
KAFKA_SECURE_PASSWORD=$KAFKA_SECURE_PASSWORD
EOF
    fi
    mv "$ENV_FILE.tmp" "$ENV_FILE"
}

table() {
    local svc pid status
    printf '%-9s %-6s %-8s %-16s %s\n' service port pid status start_s
    for svc in "${SERVICES[@]}"; do
        pid="$(read_pid "${PIDFILE[$svc]}")"
        if [[ -n ${STATE[$svc]:-} ]]; then
            status=${STATE[$svc]}
        elif "${svc}_running" && "${svc}_ready"; then
            status=running
        elif "${svc}_running"; then
            status="not answering"
        elif [[ -n $pid ]]; then
            status="dead (stale pid)"
        else
            status=stopped
        fi
        [[ $status == stopped ]] && pid=-
        printf '%-9s %-6s %-8s %-16s %s\n' "${NAME[$svc]}" "${PORT[$svc]}" "${pid:--}" "$status" \
            "${SECONDS_TAKEN[$svc]:--}"
    done
}

cmd_up() {
    mkdir -p "$SERVICES_DIR"
    pg_prepare_dir
    local t0 svc
    t0=$(now_us)
    # Kafka's JVM is the slow one: start it first and wait for it last
    launch kafka
    for svc in redis pg; do
        launch "$svc"
        await "$svc"
    done
    await kafka
    write_env
    log "all services up in $(elapsed_since "$t0")s; environment written to $ENV_FILE"
    table
}

cmd_down() {
    pg_locate
    # Kafka takes longest to shut down: signal it first, stop the others meanwhile
    if kafka_running; then
        log "kafka: stopping pid $(read_pid "$KAFKA_PID")"
        kill -TERM "$(read_pid "$KAFKA_PID")" 2>/dev/null || true
    fi
    redis_stop
    cmd_redis_cluster_down
    pg_stop
    kafka_stop
    local port
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$REDIS_PORT" "$PG_PORT"; do
        port_open "$port" && log "warning: something still listens on port $port"
    done
    table
}

cmd_status() {
    pg_locate
    table
    local svc
    for svc in "${SERVICES[@]}"; do
        "${svc}_running" && "${svc}_ready" || return 3
    done
}

cmd_clean() { # stop, then delete data and logs; the downloaded Kafka jars stay
    cmd_down >/dev/null
    local target
    if [[ -L $PG_DIR ]]; then
        target="$(readlink -f "$PG_DIR")"
        rm -rf -- "$target"
    fi
    rm -rf -- "$PG_DIR" "$REDIS_DIR" "$KAFKA_DIR/data" "$KAFKA_LOG" "$SERVICES_DIR"/*.pid
    log "removed service data under $SERVICES_DIR (kept $KAFKA_LIBS)"
}

restart_one() { # $1 = service, after it was stopped or killed
    STATE[$1]=""
    launch "$1"
    await "$1"
}

cmd_restart_redis() { # kill and start empty (no persistence)
    kill_pid redis "$REDIS_PID" redis-server
    restart_one redis
}

cmd_kill_kafka() { kill_pid kafka "$KAFKA_PID" kafka.Kafka; }
cmd_start_kafka() { restart_one kafka; }

cmd_restart_pg_immediate() { # crash-like restart: no checkpoint, WAL recovery on start
    pg_locate
    pg_running || die "postgres is not running"
    log "postgres: restart -m immediate"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -m immediate -W restart >/dev/null ||
        fail_with_log postgres "$PG_LOG" "pg_ctl restart failed"
    rm -f "$PG_PID"
    pg_record_pid
    STATE[pg]=started
    LAUNCHED_AT[pg]=$(now_us)
    await pg
}

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd=${1:-}
    case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    clean) cmd_clean ;;
    env) write_env && cat "$ENV_FILE" ;;
    kafka-libs) kafka_fetch_libs ;; # the jars only (scripts/containers.sh builds an image of them)
    restart-redis) cmd_restart_redis ;;
    redis-cluster-up) cmd_redis_cluster_up ;;
    redis-cluster-down) cmd_redis_cluster_down ;;
    kill-kafka) cmd_kill_kafka ;;
    start-kafka) cmd_start_kafka ;;
    restart-pg-immediate) cmd_restart_pg_immediate ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
