#!/usr/bin/env bash
# The agent's own cost, on the peers' 2 GB data set (PostgreSQL 15, pgbench scale 100 and
# the 200,000 x 384 vector table `items`), WAL archived through custos:
#   idle: the agent with the seed's matrix (no slot due during the window), probing the
#     archiver every 30 s and the repository every 10 minutes as configured by default,
#     for IDLE_S seconds: its CPU time (utime + stime of the agent process alone) as a
#     share of one core, and its RSS (VmRSS, VmHWM);
#   a simulated day of the seed's matrix (the test clock: the agent jumps from slot to
#     slot, jobs run for real): 24 hourly incrementals, the daily full, 24 hourly
#     vector-store exports, the daily verify and forget, the daily report. Wall time,
#     the agent's own CPU and peak RSS against its children's, runs by result.
# The peers have no long-running scheduler to compare with (pgBackRest, restic and borg
# are run from cron); the reference is cron's cost: none while idle.
# Run as root:  IDLE_S=600 ./bench/agent.sh   Not a test: nothing asserts a time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS:-$ROOT/../shared/bench/peers}"
export RES="${RES:-${BENCH:-/tmp/peerbench}/custos-agent}"
IDLE_S="${IDLE_S:-600}"
# shellcheck source=/dev/null
source "$PEERS/common.sh"
need_root
apt_need postgresql-15 time bc python3 curl
"$ROOT/scripts/setup.sh" >/dev/null
(cd "$ROOT" && cargo build --release --quiet)
[ -f "$PRISTINE/.complete" ] || "$PEERS/10-dataset.sh"

pg_stop || true
rm -rf "$PGDATA" "$REPOS" "$CONF" "$RES"
mkdir -p "$RES"
log "reset PGDATA from pristine"; cp -a "$PRISTINE" "$PGDATA"; rm -f "$PGDATA/.complete"
install -d -o "$PGUSER_OS" -m 755 "$REPOS" "$CONF" "$RUNDIR" "$BENCH/bin"
install -d -o "$PGUSER_OS" -m 700 "$BENCH/custos-cache"
install -m 755 "$ROOT/target/release/custos" "$BENCH/bin/custos"
CUSTOS="$BENCH/bin/custos"
head -c 24 /dev/urandom | base64 > "$CONF/restore.pw"
chown "$PGUSER_OS" "$CONF/restore.pw"; chmod 600 "$CONF/restore.pw"
cat > "$CONF/custos.toml" <<EOF
[repository]
url = "$REPOS/custos"
password_file = "$CONF/restore.pw"
cache_dir = "$BENCH/custos-cache"

[postgres]
name = "bench"
host = "$RUNDIR"
port = $PGPORT
user = "postgres"
pgdata = "$PGDATA"

[retention]
keep_daily = 30
keep_weekly = 12
keep_monthly = 12
keep_yearly = 7

[retention_incremental]
keep_within = "7d"

[agent]
listen = "127.0.0.1:0"
state_dir = "$BENCH/custos-agent-state"

[[source]]
name = "vector-store"
kind = "table"
tables = ["items"]

[[job]]
name = "db-incremental"
run = "postgres-incremental"
schedule = "0 * * * *"

[[job]]
name = "db-full"
run = "postgres-full"
schedule = "0 2 * * *"

[[job]]
name = "vector-store-hourly"
run = "vector-store"
schedule = "15 * * * *"

[[job]]
name = "verify"
run = "verify"
schedule = "0 5 * * *"

[[job]]
name = "forget"
run = "forget"
schedule = "0 6 * * *"
EOF
chown "$PGUSER_OS" "$CONF/custos.toml"
as_c() { runuser -u "$PGUSER_OS" -- "$CUSTOS" --config "$CONF/custos.toml" "$@"; }
as_c init -q
pg_set "archive_command = '$CUSTOS --config $CONF/custos.toml wal-push %p'"
pg_start
as_c backup postgres --type full -q

# Polls the agent process alone (not its children): CPU jiffies and RSS.
poll() {  # poll PID OUT: every second, "elapsed utime+stime vmrss_kb vmhwm_kb"
    local pid=$1 out=$2 t0; t0=$(date +%s.%N)
    while [ -d "/proc/$pid" ]; do
        local st rss hwm
        st=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null) || break
        rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null) || break
        hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null) || break
        echo "$(echo "$(date +%s.%N) - $t0" | bc) $st $rss $hwm" >> "$out"
        sleep 1
    done
}
agent_pid() { sed -n 's/.*(pid \([0-9]*\)).*/\1/p' "$1"; }
TCK=$(getconf CLK_TCK)

log "idle for ${IDLE_S}s"
rm -rf "$BENCH/custos-agent-state"; install -d -o "$PGUSER_OS" -m 700 "$BENCH/custos-agent-state"
# The same matrix with no slot inside the window: every job yearly.
sed 's/^schedule = .*/schedule = "0 0 1 1 *"/' "$CONF/custos.toml" > "$CONF/idle.toml"
chown "$PGUSER_OS" "$CONF/idle.toml"
runuser -u "$PGUSER_OS" -- "$CUSTOS" --config "$CONF/idle.toml" agent > "$RES/idle.out" 2> "$RES/idle.log" &
RUNNER=$!
for _ in $(seq 100); do grep -q listening "$RES/idle.out" 2>/dev/null && break; sleep 0.1; done
APID=$(agent_pid "$RES/idle.out")
[ -n "$APID" ] || { cat "$RES/idle.out" "$RES/idle.log" >&2; exit 1; }
# Skip the first repository look (at start), measure the steady state after it.
sleep 15
poll "$APID" "$RES/idle.tsv" &
POLL=$!
sleep "$IDLE_S"
kill -TERM "$APID"; wait "$RUNNER" || true; wait "$POLL" || true
read -r IDLE_T IDLE_J0 _ _ < <(head -1 "$RES/idle.tsv")
read -r IDLE_T1 IDLE_J1 IDLE_RSS IDLE_HWM < <(tail -1 "$RES/idle.tsv")
IDLE_CPU_S=$(echo "scale=3; ($IDLE_J1 - $IDLE_J0) / $TCK" | bc)
IDLE_PCT=$(echo "scale=4; 100 * $IDLE_CPU_S / ($IDLE_T1 - $IDLE_T)" | bc)
IDLE_PER_H=$(echo "scale=2; 3600 * $IDLE_CPU_S / ($IDLE_T1 - $IDLE_T)" | bc)

log "a simulated day of the matrix"
rm -rf "$BENCH/custos-agent-state"; install -d -o "$PGUSER_OS" -m 700 "$BENCH/custos-agent-state"
T0=$(date +%s.%N)
/usr/bin/time -v -o "$RES/day.time" runuser -u "$PGUSER_OS" -- env CUSTOS_TEST_CLOCK="2026-12-01T00:00:30Z..2026-12-02T00:10:00Z" \
    "$CUSTOS" --config "$CONF/custos.toml" agent > "$RES/day.out" 2> "$RES/day.log" &
RUNNER=$!
for _ in $(seq 100); do grep -q listening "$RES/day.out" 2>/dev/null && break; sleep 0.1; done
APID=$(agent_pid "$RES/day.out")
[ -n "$APID" ] || { cat "$RES/day.out" "$RES/day.log" >&2; exit 1; }
poll "$APID" "$RES/day.tsv" &
POLL=$!
wait "$RUNNER"; wait "$POLL" || true
T1=$(date +%s.%N)
DAY_WALL=$(echo "$T1 - $T0" | bc)
read -r _ DAY_J _ DAY_HWM < <(tail -1 "$RES/day.tsv")
DAY_AGENT_CPU=$(echo "scale=2; $DAY_J / $TCK" | bc)
CHILD_MAXRSS=$(awk -F': ' '/Maximum resident/ {print $2}' "$RES/day.time")
TOTAL_CPU=$(awk -F': ' '/User time/ {u=$2} /System time/ {s=$2} END {print u + s}' "$RES/day.time")
H="$BENCH/custos-agent-state/history.jsonl"
RUNS=$(wc -l < "$H"); OK=$(grep -c '"outcome":"ok"' "$H" || true)
pg_stop

cat <<EOF | tee "$RES/summary.txt"
custos agent, on the peers' data set ($(du -sh "$PGDATA" | cut -f1) cluster), $(date -u +%Y-%m-%d)
idle ${IDLE_S}s (the seed's matrix loaded; archiver probed every 30 s, repository every 10 min):
  agent CPU            ${IDLE_CPU_S} s  = ${IDLE_PCT}% of a core  (${IDLE_PER_H} s per hour)
  agent RSS            $((IDLE_RSS / 1024)) MiB now, $((IDLE_HWM / 1024)) MiB peak
a simulated day of the matrix (24 incrementals, 1 full, 24 vector-store exports, verify, forget, report):
  wall                 ${DAY_WALL} s
  runs                 ${RUNS} (${OK} ok)
  agent CPU            ${DAY_AGENT_CPU} s of ${TOTAL_CPU} s in all (jobs included)
  agent peak RSS       $((DAY_HWM / 1024)) MiB
  largest job RSS      $((CHILD_MAXRSS / 1024)) MiB
EOF
