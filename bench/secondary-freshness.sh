#!/usr/bin/env bash
# How far behind the primary a secondary stays under load (issue 19's freshness goal: the
# secondary's newest restorable point at most 60 s behind the primary's). The peers'
# PostgreSQL 15 cluster archives through `wal-push --async` to a primary repository on
# SeaweedFS server A and, before each segment is acknowledged, to the secondary on
# server B (`[[secondary]] wal = true`); `custos copy` runs in a loop (as the agent's
# copy job would, every 2 s). For SOAK_S seconds of pgbench (tpcb-like, 4 clients), every
# 5 s, `copy --check`: the age of the oldest object the primary has and B lacks (an upper
# bound of how far B's newest restorable point is behind A's).
# Reported: its distribution (min, median, p95, max) and the samples over 60 s.
# Run as root:  SOAK_S=300 ./bench/secondary-freshness.sh     Not a test.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS:-$ROOT/../shared/bench/peers}"
export RES="${RES:-${BENCH:-/tmp/peerbench}/custos-freshness}"
SOAK_S="${SOAK_S:-300}"
# shellcheck source=/dev/null
source "$PEERS/common.sh"
need_root
apt_need postgresql-15 time bc python3 curl
"$ROOT/scripts/setup.sh" >/dev/null
(cd "$ROOT" && cargo build --release --quiet)
[ -f "$PRISTINE/.complete" ] || "$PEERS/10-dataset.sh"
WEED="$ROOT/.tools/seaweedfs/bin/weed"
KEY=freshbench SECRET=freshbench-secret-key
unset AWS_CA_BUNDLE
# shellcheck source=/dev/null
source "$ROOT/bench/lib-s3.sh"
pg_stop || true
rm -rf "$RES" "$BENCH/s3-a" "$BENCH/s3-b" "$BENCH/freshconf" "$PGDATA"
mkdir -p "$RES"
install -d -o "$PGUSER_OS" -m 755 "$BENCH/freshconf" "$BENCH/bin" "$RUNDIR"
install -m 755 "$ROOT/target/release/custos" "$BENCH/bin/custos"
CUSTOS="$BENCH/bin/custos"
start_weed "$BENCH/s3-a"; A_S3=$S3; mkbucket "$FILER" main
start_weed "$BENCH/s3-b"; B_S3=$S3; mkbucket "$FILER" second
echo "$SECRET" > "$BENCH/freshconf/s3.secret"
head -c 24 /dev/urandom | base64 > "$BENCH/freshconf/pw"
cat > "$BENCH/freshconf/custos.toml" <<TOML
[repository]
url = "s3://main/db"
password_file = "$BENCH/freshconf/pw"
cache_dir = "$BENCH/freshconf/cache"
[storage.s3]
endpoint = "http://127.0.0.1:$A_S3"
region = "us-east-1"
access_key_id = "$KEY"
secret_access_key_file = "$BENCH/freshconf/s3.secret"
[postgres]
host = "$RUNDIR"
port = $PGPORT
user = "postgres"
pgdata = "$PGDATA"
[[secondary]]
name = "b"
url = "s3://second/db"
wal = true
max_lag = "60s"
[secondary.s3]
endpoint = "http://127.0.0.1:$B_S3"
access_key_id = "$KEY"
secret_access_key_file = "$BENCH/freshconf/s3.secret"
TOML
chown -R "$PGUSER_OS" "$BENCH/freshconf"; chmod 600 "$BENCH/freshconf/pw" "$BENCH/freshconf/s3.secret"
C() { runuser -u "$PGUSER_OS" -- "$CUSTOS" --config "$BENCH/freshconf/custos.toml" "$@"; }
C init -q
log "reset PGDATA from pristine"; cp -a "$PRISTINE" "$PGDATA"; rm -f "$PGDATA/.complete"
pg_set "archive_mode = on" "archive_command = '$CUSTOS --config $BENCH/freshconf/custos.toml wal-push --async %p'"
pg_start
C backup postgres --type full -q
C copy -q
log "pgbench for ${SOAK_S}s, copy in a loop, samples every 5 s"
as_pg "$PGBIN/pgbench" -h "$RUNDIR" -p "$PGPORT" -U postgres -c 4 -j 2 -T "$SOAK_S" postgres > "$RES/pgbench.log" 2>&1 &
LOAD=$!
( while kill -0 "$LOAD" 2>/dev/null; do C copy -q >> "$RES/copy.log" 2>&1 || true; sleep 2; done ) &
COPIER=$!
printf 'elapsed\tlag_s\n' > "$RES/samples.tsv"
T0=$(date +%s)
while kill -0 "$LOAD" 2>/dev/null; do
    lag=$(C copy --check --json --max-lag 1h 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["secondaries"][0]["report"]["lag_seconds"])' || echo nan)
    printf '%s\t%s\n' "$(( $(date +%s) - T0 ))" "$lag" >> "$RES/samples.tsv"
    sleep 5
done
wait "$COPIER" || true
psqlc -c "SELECT pg_switch_wal()" >/dev/null; sleep 5
C copy -q
C --secondary b verify -q > "$RES/verify.log" 2>&1 && note secondary_verifies yes
note tps "$(grep -o 'tps = [0-9.]*' "$RES/pgbench.log" | head -1)"
pg_stop
python3 - "$RES" <<'PY' | tee "$RES/summary.txt"
import sys, statistics
rows = [l.split("\t") for l in open(f"{sys.argv[1]}/samples.tsv").read().splitlines()[1:]]
lags = sorted(float(r[1]) for r in rows if r[1] not in ("nan", "None"))
def pct(p): return lags[min(len(lags) - 1, int(p * len(lags)))]
print(f"samples {len(lags)} over {rows[-1][0]} s of pgbench")
print(f"secondary lag, s: min {lags[0]:.1f}, median {statistics.median(lags):.1f}, p95 {pct(0.95):.1f}, max {lags[-1]:.1f}; over 60 s: {sum(l > 60 for l in lags)}")
PY
