#!/usr/bin/env bash
# How well `restore postgres --preview` predicts the RTO of the next restore (issue 20:
# within a factor of 2). The peers' PostgreSQL 15 cluster (1.9 GB) archives through
# custos into a local repository; a full backup; pgbench; `drill db` measures the rates
# the preview uses (restore bytes/s, recovery seconds per WAL file). Then ROUNDS times:
# more pgbench (a different length each round, so each restore replays a different amount
# of WAL), `--preview` (the estimate), and the real thing: `restore postgres` into a new
# folder and the restored server started until it accepts queries, timed together (what
# the drill's RTO measures). Reported per round: WAL files, predicted and measured seconds,
# measured / predicted.
# Run as root:  ./bench/preview.sh     Not a test: nothing asserts a time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS:-$ROOT/../shared/bench/peers}"
export RES="${RES:-${BENCH:-/tmp/peerbench}/custos-preview}"
LOADS="${LOADS:-20 60 120}"
# shellcheck source=/dev/null
source "$PEERS/common.sh"
need_root
apt_need postgresql-15 time bc python3
"$ROOT/scripts/setup.sh" >/dev/null
(cd "$ROOT" && cargo build --release --quiet)
[ -f "$PRISTINE/.complete" ] || "$PEERS/10-dataset.sh"
pg_stop || true
CONF="$BENCH/previewconf"
rm -rf "$RES" "$CONF" "$PGDATA" "$BENCH/preview-restore"
mkdir -p "$RES"
install -d -o "$PGUSER_OS" -m 755 "$CONF" "$BENCH/bin" "$RUNDIR" "$BENCH/preview-restore"
install -m 755 "$ROOT/target/release/custos" "$BENCH/bin/custos"
CUSTOS="$BENCH/bin/custos"
head -c 24 /dev/urandom | base64 > "$CONF/pw"
cat > "$CONF/custos.toml" <<TOML
[repository]
url = "$CONF/repo"
password_file = "$CONF/pw"
cache_dir = "$CONF/cache"
[postgres]
host = "$RUNDIR"
port = $PGPORT
user = "postgres"
pgdata = "$PGDATA"
[drill]
scratch = "$CONF/scratch"
bin = "$PGBIN"
TOML
install -d -o "$PGUSER_OS" "$CONF/scratch"
chown -R "$PGUSER_OS" "$CONF"; chmod 600 "$CONF/pw"
C() { runuser -u "$PGUSER_OS" -- "$CUSTOS" --config "$CONF/custos.toml" "$@"; }
C init -q
log "reset PGDATA from pristine"; cp -a "$PRISTINE" "$PGDATA"; rm -f "$PGDATA/.complete"
pg_set "archive_mode = on" "archive_command = '$CUSTOS --config $CONF/custos.toml wal-push %p'" "archive_timeout = 10"
pg_start
C backup postgres --type full -q
load() { as_pg "$PGBIN/pgbench" -h "$RUNDIR" -p "$PGPORT" -U postgres -c 4 -j 2 -T "$1" postgres >> "$RES/pgbench.log" 2>&1; psqlc -c "SELECT pg_switch_wal()" >/dev/null; sleep 3; }
load 30
log "drill db: the rates the preview uses"
C drill db --json > "$RES/drill.json"
printf 'round\tload_s\twal_files\tbytes\tpredicted_s\tmeasured_s\n' > "$RES/rounds.tsv"
round=0
for secs in $LOADS; do
    round=$((round + 1))
    load "$secs"
    C restore postgres --preview --json > "$RES/preview-$round.json"
    dir="$BENCH/preview-restore/r$round"
    port=$((PGPORT + 100 + round))
    dropcache
    t0=$(date +%s.%N)
    C restore postgres --to "$dir" --port "$port" --no-archiving -q > "$RES/restore-$round.log" 2>&1
    as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$dir.log" -o "-k $RUNDIR" -w -t 900 start >/dev/null
    until [ "$(as_pg "$PGBIN/psql" -X -At -h "$RUNDIR" -p "$port" -U postgres -d postgres -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = "f" ]; do sleep 0.1; done
    t1=$(date +%s.%N)
    as_pg "$PGBIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    rm -rf "$dir" "$dir.log"
    python3 - "$RES/preview-$round.json" "$round" "$secs" "$(echo "$t1 - $t0" | bc)" >> "$RES/rounds.tsv" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
print("\t".join([sys.argv[2], sys.argv[3], str(p["preview"]["wal_files"]), str(p["preview"]["bytes"]),
                 f'{p["rto_estimate_seconds"]:.1f}', f'{float(sys.argv[4]):.1f}']))
PY
    log "round $round: $(tail -1 "$RES/rounds.tsv")"
done
pg_stop
python3 - "$RES" <<'PY' | tee "$RES/summary.txt"
import csv, json, sys
res = sys.argv[1]
d = json.load(open(f"{res}/drill.json"))
ph = {p["name"]: p["seconds"] for p in d["phases"]}
print(f'drill: {d["bytes"]/1e9:.2f} GB restored in {ph["restore files"]:.1f} s, {d["wal_files"]} WAL file(s) recovered in {ph["start and recover"]:.1f} s')
print("| round | pgbench, s | WAL files | predicted RTO, s | measured, s | measured / predicted |")
print("|---|---|---|---|---|---|")
worst = 1.0
for r in csv.DictReader(open(f"{res}/rounds.tsv"), delimiter="\t"):
    ratio = float(r["measured_s"]) / float(r["predicted_s"])
    worst = max(worst, ratio, 1 / ratio)
    print(f'| {r["round"]} | {r["load_s"]} | {r["wal_files"]} | {r["predicted_s"]} | {r["measured_s"]} | {ratio:.2f} |')
print(f"worst factor: {worst:.2f} (target: within 2)")
PY
