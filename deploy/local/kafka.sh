#!/usr/bin/env bash
# A real, single-node Apache Kafka broker (KRaft, combined broker+controller)
# for local runs, tests and benchmarks, provisioned from Maven Central with the
# machine's Java 17 and Maven. No Docker needed.
#
#   deploy/local/kafka.sh start     resolve jars (once), format storage (once), start, wait until it answers
#   deploy/local/kafka.sh stop      stop the broker started by this script (SIGTERM, then SIGKILL)
#   deploy/local/kafka.sh restart   stop + start (data kept)
#   deploy/local/kafka.sh status    exit 0 if it is running and answering
#   deploy/local/kafka.sh wipe      stop and delete its data directory
#   deploy/local/kafka.sh logs [N]  print the last N (default 80) lines of its log
#   deploy/local/kafka.sh env       print the settings in use
#   deploy/local/kafka.sh scram-user NAME PASSWORD
#                                   create or update a SASL/SCRAM-SHA-512 user
#   deploy/local/kafka.sh acls ARGS...
#                                   run Kafka's ACL command (kafka-acls.sh)
#                                   against this broker, e.g. `acls --list`
#
# Two client listeners: PLAINTEXT on 127.0.0.1:<port> (unauthenticated; its
# principal, User:ANONYMOUS, is a super user, so local runs need no
# credentials) and SASL_PLAINTEXT with SCRAM-SHA-512 on 127.0.0.1:<sasl port>,
# where ACLs apply and a principal without one is refused
# (allow.everyone.if.no.acl.found=false). docs/security.md has the ACLs.
#
# Settings (environment):
#   JOBMETER_KAFKA_PORT        client port on 127.0.0.1 (default 9092)
#   JOBMETER_KAFKA_CONTROLLER_PORT  controller port (default: client port + 1)
#   JOBMETER_KAFKA_SASL_PORT   SASL/SCRAM client port (default: client port + 2)
#   JOBMETER_CACHE             cache outside the tree (default ~/.cache/jobmeter)
#   JOBMETER_KAFKA_HEAP        JVM heap (default 512m)
#   JOBMETER_KAFKA_START_TIMEOUT  seconds to wait for the broker (default 120)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${JOBMETER_KAFKA_PORT:-9092}"
cport="${JOBMETER_KAFKA_CONTROLLER_PORT:-$((port + 1))}"
sport="${JOBMETER_KAFKA_SASL_PORT:-$((port + 2))}"
cache="${JOBMETER_CACHE:-$HOME/.cache/jobmeter}"
kafka_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka-pom.xml")"
libdir="$cache/kafka-$kafka_version/lib"
rundir="$cache/kafka-run-$port"
datadir="$rundir/data"
logfile="$rundir/broker.log"
pidfile="$rundir/broker.pid"
heap="${JOBMETER_KAFKA_HEAP:-512m}"
start_timeout="${JOBMETER_KAFKA_START_TIMEOUT:-120}"

say() { echo "[kafka] $*" >&2; }
die() { echo "[kafka] error: $*" >&2; exit 1; }

need_tools() {
  # Java 17+ and Maven, checked (and installed as root) by deps.sh.
  bash "$here/deps.sh" install broker
}

# The resolved jars are complete for this pom: the marker holds the pom's
# checksum, so a dependency added to the pom is resolved on the next start.
pom_sum() { sha256sum "$here/kafka-pom.xml" | cut -d' ' -f1; }

provision() {
  if [ "$(cat "$libdir/.complete" 2>/dev/null)" = "$(pom_sum)" ] \
      && [ -f "$libdir/kafka_2.13-$kafka_version.jar" ] && [ -f "$libdir/kafka-tools-$kafka_version.jar" ]; then
    return 0
  fi
  need_tools
  say "resolving Apache Kafka $kafka_version from Maven Central into $libdir"
  mkdir -p "$libdir"
  local t0=$SECONDS
  if ! mvn -q -B -f "$here/kafka-pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$libdir" >"$cache/mvn-$kafka_version.log" 2>&1; then
    tail -30 "$cache/mvn-$kafka_version.log" >&2
    die "Maven could not resolve org.apache.kafka:kafka_2.13:$kafka_version (log: $cache/mvn-$kafka_version.log)"
  fi
  pom_sum >"$libdir/.complete"
  say "resolved $(ls "$libdir"/*.jar | wc -l) jars in $((SECONDS - t0))s"
}

java_cmd() { (java_cmd_exec "$@"); }

java_cmd_exec() {
  local main="$1"; shift
  exec java -Xms128m -Xmx"$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="file:$rundir/log4j2.properties" \
    -Dkafka.logs.dir="$rundir" \
    -cp "$libdir/*" "$main" "$@"
}

server_properties() {
  cat <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport,SASL_PLAINTEXT://127.0.0.1:$sport
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_PLAINTEXT://127.0.0.1:$sport
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS
allow.everyone.if.no.acl.found=false
log.dirs=$datadir
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
transaction.remove.expired.transaction.cleanup.interval.ms=60000
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=-1
log.segment.bytes=67108864
log.cleaner.dedupe.buffer.size=16777216
num.io.threads=4
num.network.threads=2
PROPS
}

write_config() {
  mkdir -p "$rundir" "$datadir"
  server_properties >"$rundir/server.properties"
  cat >"$rundir/log4j2.properties" <<'L4J'
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
L4J
}

# The pid of this script's broker, if it is alive. A pid file left behind by
# a broker that died without `stop` (kill -9, a reboot, a container torn
# down) is stale, and its pid may since belong to another process: the
# process must also be running this broker's server.properties.
running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid; pid="$(cat "$pidfile" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$rundir/server.properties" || return 1
  fi
  echo "$pid"
}

answering() {
  # The broker answers once its client port accepts connections and it has
  # logged that the server started.
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || return 1
  grep -q "Kafka Server started" "$rundir/server.log" 2>/dev/null
}

start() {
  if pid="$(running_pid)"; then
    if ! cmp -s <(server_properties) "$rundir/server.properties"; then
      say "running with another configuration (an older version of this script): restarting it"
      stop
    elif answering; then say "already running (pid $pid) on 127.0.0.1:$port"; return 0; fi
  fi
  if running_pid >/dev/null; then :
  elif (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is taken by another process; set JOBMETER_KAFKA_PORT"
  fi
  provision
  need_tools
  write_config
  if [ ! -f "$datadir/meta.properties" ]; then
    local cluster_id
    cluster_id="$(java_cmd kafka.tools.StorageTool random-uuid 2>>"$logfile" | tail -1)"
    say "formatting KRaft storage in $datadir (cluster $cluster_id)"
    java_cmd kafka.tools.StorageTool format -t "$cluster_id" -c "$rundir/server.properties" >>"$logfile" 2>&1 \
      || { tail -20 "$logfile" >&2; die "storage format failed (log: $logfile)"; }
  fi
  if ! running_pid >/dev/null; then
    if [ -f "$pidfile" ]; then
      say "removing a stale pid file (pid $(cat "$pidfile" 2>/dev/null || true) is not this broker)"
      rm -f "$pidfile"
    fi
    : >"$rundir/server.log"
    say "starting Apache Kafka $kafka_version on 127.0.0.1:$port (log: $rundir/server.log)"
    # Detached in its own session so that the caller's exit or signals to
    # its process group do not take the broker down with it.
    export -f java_cmd_exec
    export heap rundir libdir
    nohup setsid bash -c 'echo $$ >"$0"; java_cmd_exec kafka.Kafka "$1"' "$pidfile" "$rundir/server.properties" \
      >>"$logfile" 2>&1 </dev/null &
    for _ in $(seq 1 50); do [ -s "$pidfile" ] && break; sleep 0.1; done
  fi
  local t0=$SECONDS
  until answering; do
    if ! running_pid >/dev/null; then
      tail -40 "$rundir/server.log" "$logfile" >&2 2>/dev/null || true
      die "broker exited during start (logs: $rundir/server.log, $logfile)"
    fi
    if ((SECONDS - t0 > start_timeout)); then
      tail -40 "$rundir/server.log" >&2 || true
      die "broker did not answer within ${start_timeout}s"
    fi
    sleep 0.2
  done
  say "ready on 127.0.0.1:$port after $((SECONDS - t0))s (pid $(cat "$pidfile"))"
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then say "not running"; rm -f "$pidfile"; return 0; fi
  say "stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then say "still running after 30s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) if running_pid >/dev/null && answering; then say "running on 127.0.0.1:$port"; else say "not running"; exit 1; fi ;;
  wipe) stop; rm -rf "$rundir"; say "wiped $rundir" ;;
  logs) tail -n "${2:-80}" "$rundir/server.log" 2>/dev/null || say "no log at $rundir/server.log" ;;
  provision) provision ;;
  env) echo "port=$port controller_port=$cport sasl_port=$sport version=$kafka_version libdir=$libdir rundir=$rundir" ;;
  scram-user)
    [ $# -eq 3 ] || die "usage: kafka.sh scram-user NAME PASSWORD"
    provision
    java_cmd kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$port" --alter \
      --entity-type users --entity-name "$2" --add-config "SCRAM-SHA-512=[iterations=4096,password=$3]" >&2 ;;
  acls)
    shift
    provision
    java_cmd org.apache.kafka.tools.AclCommand --bootstrap-server "127.0.0.1:$port" "$@" ;;
  *) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
