#!/usr/bin/env bash
# custos vs pgBackRest on the peers' PostgreSQL 15 data set (pgbench -s 100 plus 200,000
# rows of 384 float4: about 2 GB), in one run, side by side:
#   full backup, pgbench for $PGBENCH_T s, incremental backup (time and bytes added),
#   full restore ($ROUNDS rounds), delta restore (no change), synchronous wal-push latency
#   over $WAL_SEGS real segments, and the async drain of a $WAL_SEGS-segment backlog
#   ($ROUNDS rounds, with the machine's CPU per segment). Prints the figures and
#   custos/pgBackRest ratios (of medians where there are rounds).
# Reuses ../shared/bench/peers (data set, `measure` under /usr/bin/time -v with the page
# cache dropped). Run as root:  ./bench/postgres.sh   (PEERS=... to point elsewhere)
# Not a test: nothing here asserts a time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS:-$ROOT/../shared/bench/peers}"
export RES="${RES:-${BENCH:-/tmp/peerbench}/custos-pg}"
ROUNDS="${ROUNDS:-3}"   # rounds of the restore and of the async drain (their ratio is of medians)
# shellcheck source=/dev/null
source "$PEERS/common.sh"
need_root
apt_need postgresql-15 pgbackrest zstd time bc python3
"$ROOT/scripts/setup.sh" >/dev/null
(cd "$ROOT" && cargo build --release --quiet)
[ -f "$PRISTINE/.complete" ] || "$PEERS/10-dataset.sh"

pg_stop || true
rm -rf "$PGDATA" "$REPOS" "$RESTORE" "$CONF" "$RES"
mkdir -p "$RES"
log "reset PGDATA from pristine"; cp -a "$PRISTINE" "$PGDATA"; rm -f "$PGDATA/.complete"
rm -rf "$BENCH/custos-cache" "$BENCH/custos-async-cache"
install -d -o "$PGUSER_OS" -m 755 "$REPOS" "$RESTORE" "$CONF" "$RUNDIR" "$BENCH/bin"
install -d -o "$PGUSER_OS" -m 700 "$BENCH/custos-cache" "$BENCH/custos-async-cache"
install -d -o "$PGUSER_OS" -m 750 "$REPOS/pgbr" "$REPOS/pgbr-wal"
install -m 755 "$ROOT/target/release/custos" "$BENCH/bin/custos"
CUSTOS="$BENCH/bin/custos"

# custos: restore key (default KDF) for restores, backup key (cheap KDF: its password is
# a random string in a 0600 file) for the archiver and the backups, as on a database host.
umask 022
head -c 24 /dev/urandom | base64 > "$CONF/restore.pw"; head -c 24 /dev/urandom | base64 > "$CONF/backup.pw"
chown "$PGUSER_OS" "$CONF"/*.pw; chmod 600 "$CONF"/*.pw
C() { runuser -u "$PGUSER_OS" -- env CUSTOS_REPO="$REPOS/custos" CUSTOS_CACHE_DIR="$BENCH/custos-cache" "$@"; }
C env CUSTOS_PASSWORD_FILE="$CONF/restore.pw" "$CUSTOS" init -q
C env CUSTOS_PASSWORD_FILE="$CONF/restore.pw" CUSTOS_NEW_PASSWORD_FILE="$CONF/backup.pw" \
    "$CUSTOS" key add --role backup --kdf-memory-mib 1 --kdf-iterations 1 -q
CB="runuser -u $PGUSER_OS -- env CUSTOS_REPO=$REPOS/custos CUSTOS_CACHE_DIR=$BENCH/custos-cache CUSTOS_PASSWORD_FILE=$CONF/backup.pw PGHOST=$RUNDIR PGPORT=$PGPORT $CUSTOS"
CR="runuser -u $PGUSER_OS -- env CUSTOS_REPO=$REPOS/custos CUSTOS_PASSWORD_FILE=$CONF/restore.pw $CUSTOS"

for name in pgbr pgbr-wal; do
cat > "$CONF/$name.conf" <<EOC
[global]
repo1-path=$REPOS/$name
repo1-retention-full=10
process-max=2
compress-type=zst
compress-level=3
start-fast=y
log-level-console=warn
log-level-file=off
lock-path=$RUNDIR/lock-$name
spool-path=$RUNDIR/spool-$name

[bench]
pg1-path=$PGDATA
pg1-port=$PGPORT
pg1-socket-path=$RUNDIR
pg1-user=postgres
EOC
done
chmod 644 "$CONF"/*.conf
cat > "$CONF/pgbackrest-push-both.sh" <<EOC
#!/bin/sh
pgbackrest --config=$CONF/pgbr.conf --stanza=bench archive-push "\$1" && \
CUSTOS_REPO=$REPOS/custos CUSTOS_PASSWORD_FILE=$CONF/backup.pw $CUSTOS --quiet wal-push "\$1"
EOC
chmod 755 "$CONF/pgbackrest-push-both.sh"
pg_set "archive_command = '$CONF/pgbackrest-push-both.sh %p'"
pg_start
PGBR="runuser -u $PGUSER_OS -- pgbackrest --config=$CONF/pgbr.conf --stanza=bench"
$PGBR stanza-create >/dev/null
note src_bytes_excl_pg_wal "$(( $(bytes "$PGDATA") - $(bytes "$PGDATA/pg_wal") ))"

log "=== full backups ==="
measure pgbr-full $PGBR --type=full backup
note pgbr_repo_after_full "$(bytes "$REPOS/pgbr/backup")"
measure custos-full $CB backup postgres --type full
note custos_repo_after_full "$(bytes "$REPOS/custos")"

log "=== pgbench -T $PGBENCH_T -c 4 ==="
as_pg "$PGBIN/pgbench" -h "$RUNDIR" -p "$PGPORT" -U postgres -T "$PGBENCH_T" -c 4 -j 2 postgres > "$RES/pgbench.log" 2>&1
psqlc -c CHECKPOINT
note pgbench_tps "$(awk '/^tps/{print $3; exit}' "$RES/pgbench.log")"
# Keep real WAL segments for the wal-push test before the cluster recycles them.
mkdir -p "$BENCH/walcopies"; rm -f "$BENCH/walcopies"/*
ls "$PGDATA/pg_wal" | grep -E '^[0-9A-F]{24}$' | head -n "$WAL_SEGS" | while read -r s; do cp "$PGDATA/pg_wal/$s" "$BENCH/walcopies/"; done
chown -R "$PGUSER_OS" "$BENCH/walcopies"

log "=== incremental backups ==="
P0=$(bytes "$REPOS/pgbr/backup"); C0=$(bytes "$REPOS/custos/data")
measure pgbr-incr $PGBR --type=incr backup
measure custos-incr $CB backup postgres --type incremental
note pgbr_incr_added_bytes "$(( $(bytes "$REPOS/pgbr/backup") - P0 ))"
note custos_incr_added_bytes "$(( $(bytes "$REPOS/custos/data") - C0 ))"
note pgbr_repo_total "$(( $(bytes "$REPOS/pgbr/backup") + $(bytes "$REPOS/pgbr/archive") ))"
note custos_repo_total "$(bytes "$REPOS/custos")"

log "=== wal-push latency (synchronous, $WAL_SEGS real segments, one process each) ==="
runuser -u "$PGUSER_OS" -- pgbackrest --config="$CONF/pgbr-wal.conf" --stanza=bench stanza-create >/dev/null
C env CUSTOS_REPO="$REPOS/custos-wal" CUSTOS_PASSWORD_FILE="$CONF/restore.pw" "$CUSTOS" init -q
C env CUSTOS_REPO="$REPOS/custos-wal" CUSTOS_PASSWORD_FILE="$CONF/restore.pw" CUSTOS_NEW_PASSWORD_FILE="$CONF/backup.pw" \
    "$CUSTOS" key add --role backup --kdf-memory-mib 1 --kdf-iterations 1 -q
C env CUSTOS_REPO="$REPOS/custos-async" CUSTOS_PASSWORD_FILE="$CONF/restore.pw" "$CUSTOS" init -q
C env CUSTOS_REPO="$REPOS/custos-async" CUSTOS_PASSWORD_FILE="$CONF/restore.pw" CUSTOS_NEW_PASSWORD_FILE="$CONF/backup.pw" \
    "$CUSTOS" key add --role backup --kdf-memory-mib 1 --kdf-iterations 1 -q
printf 'tool\tsegment\tms\n' > "$RES/walpush.tsv"
for f in "$BENCH/walcopies"/*; do
    s=$(date +%s%N)
    runuser -u "$PGUSER_OS" -- pgbackrest --config="$CONF/pgbr-wal.conf" --stanza=bench archive-push "$f"
    m=$(date +%s%N)
    runuser -u "$PGUSER_OS" -- env CUSTOS_REPO="$REPOS/custos-wal" CUSTOS_PASSWORD_FILE="$CONF/backup.pw" \
        "$CUSTOS" --quiet wal-push --pgdata "$PGDATA" "$f"
    e=$(date +%s%N)
    printf 'pgbr\t%s\t%s\n' "$(basename "$f")" "$(( (m - s) / 1000000 ))" >> "$RES/walpush.tsv"
    printf 'custos\t%s\t%s\n' "$(basename "$f")" "$(( (e - m) / 1000000 ))" >> "$RES/walpush.tsv"
done
# Asynchronous: as the peers' harness does, let $WAL_SEGS segments pile up (.ready), then
# point archive_command at each tool's async mode through a timing wrapper and time the
# archiver's drain. Both acknowledge only what their repository holds.
cat > "$CONF/pgbackrest-async.conf" <<EOC
[global]
repo1-path=$REPOS/pgbr-async
archive-async=y
process-max=2
compress-type=zst
compress-level=3
spool-path=$RUNDIR/spool-pgbr-async
lock-path=$RUNDIR/lock-pgbr-async
log-level-console=warn
log-level-file=off
archive-timeout=120

[bench]
pg1-path=$PGDATA
pg1-port=$PGPORT
pg1-socket-path=$RUNDIR
pg1-user=postgres
EOC
chmod 644 "$CONF/pgbackrest-async.conf"; install -d -o "$PGUSER_OS" -m 750 "$REPOS/pgbr-async"
runuser -u "$PGUSER_OS" -- pgbackrest --config="$CONF/pgbackrest-async.conf" --stanza=bench stanza-create >/dev/null
cat > "$CONF/timed-pgbackrest-async.sh" <<EOC
#!/bin/sh
# timing wrapper for archive_command: <mode> %p %f then the command
mode="\$1"; p="\$2"; f="\$3"; shift 3
s=\$(date +%s%N); "\$@" "\$p"; rc=\$?; e=\$(date +%s%N)
printf '%s\t%s\t%s\n' "\$mode" "\$f" "\$(( (e - s) / 1000000 ))" >> $RUNDIR/async-latency.tsv
exit \$rc
EOC
chmod 755 "$CONF/timed-pgbackrest-async.sh"; : > "$RUNDIR/async-latency.tsv"; chmod 666 "$RUNDIR/async-latency.tsv"
nready() { ls "$PGDATA/pg_wal/archive_status/" 2>/dev/null | grep -c '\.ready$' || true; }
set_archive() { psqlc -c "ALTER SYSTEM SET archive_command = '$1'" -c "SELECT pg_reload_conf()" >/dev/null; }
in_turns() {  # in_turns A B: $ROUNDS rounds of A and B, given the round; B goes first in even rounds
  local r
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then "$1" "$r"; "$2" "$r"; else "$2" "$r"; "$1" "$r"; fi
  done
}
drain() {  # drain MODE ROUND COMMAND...: backlog of $WAL_SEGS, then time the archiver through COMMAND
  local mode="$1" round="$2"; shift 2
  set_archive ""
  # A background pusher still running from the previous round would store the new backlog
  # while it piles up, before the clock starts: wait until neither tool's is left.
  while pgrep -u "$PGUSER_OS" -f 'wal-push --drain|archive-push:async' >/dev/null; do sleep 0.2; done
  while [ "$(nready)" -lt "$WAL_SEGS" ]; do
    psqlc -c CHECKPOINT >/dev/null
    as_pg "$PGBIN/pgbench" -h "$RUNDIR" -p "$PGPORT" -U postgres -T 5 -c 4 -j 2 postgres >/dev/null 2>&1
  done
  local n; n=$(nready); wait_quiet
  local t0 b0 t1 b1; b0=$(busy_jiffies); t0=$(date +%s%N)
  set_archive "$CONF/timed-pgbackrest-async.sh $mode %p %f $*"
  while [ "$(nready)" -gt 0 ]; do sleep 0.02; done
  t1=$(date +%s%N); b1=$(busy_jiffies)
  # The whole machine's CPU (archiver, shells, the tool's processes) per segment drained.
  printf '%s\t%s\t%s\t%s\t%s\n' "$mode" "$round" "$n" "$(( (t1 - t0) / 1000000 ))" \
    "$(( (b1 - b0) * 1000 / $(getconf CLK_TCK) ))" >> "$RES/drains.tsv"
}
# pgBackRest's drain alone swings 3.5x between runs on unchanged code: $ROUNDS rounds,
# the two tools taking turns to go first, and the ratio of medians.
printf 'mode\tround\tsegments\tms\tmachine_cpu_ms\n' > "$RES/drains.tsv"
drain_pgbr() { drain pgbr-async "$1" pgbackrest --config=$CONF/pgbackrest-async.conf --stanza=bench archive-push; }
drain_custos() { drain custos-async "$1" env CUSTOS_REPO=$REPOS/custos-async CUSTOS_PASSWORD_FILE=$CONF/backup.pw CUSTOS_CACHE_DIR=$BENCH/custos-async-cache $CUSTOS --quiet wal-push --async; }
in_turns drain_pgbr drain_custos
awk -F'\t' '{print $1 "\t" $2 "\t" $3}' "$RUNDIR/async-latency.tsv" >> "$RES/walpush.tsv"
set_archive "$CONF/pgbackrest-push-both.sh %p"
pg_stop

log "=== restores ==="
# Restores swing with the disk: $ROUNDS rounds, taking turns to go first, each into an
# empty folder; the ratio of medians. The delta restores then run over the last round's.
restore_pgbr() { rm -rf "$RESTORE/pgbr"; install -d -o "$PGUSER_OS" -m 700 "$RESTORE/pgbr"; measure "pgbr-restore-$1" $PGBR --pg1-path="$RESTORE/pgbr" restore; }
restore_custos() { rm -rf "$RESTORE/custos"; measure "custos-restore-$1" $CR restore postgres --to "$RESTORE/custos" --target immediate; }
in_turns restore_pgbr restore_custos
measure pgbr-delta $PGBR --pg1-path="$RESTORE/pgbr" --delta restore
measure custos-delta $CR restore postgres --to "$RESTORE/custos" --target immediate --delta
rm -rf "$RESTORE"

python3 - "$RES" <<'PY'
import sys, statistics
res = sys.argv[1]
m = {}
for line in open(f"{res}/measure.tsv").read().splitlines()[1:]:
    f = line.split("\t")
    m[f[0]] = (float(f[1]), int(f[4]) // 1024)
facts = dict(l.split("\t")[:2] for l in open(f"{res}/facts.tsv").read().splitlines())
print("| step | pgBackRest | custos | custos / pgBackRest |")
print("|---|---|---|---|")
rounds = sorted({int(k.rsplit("-", 1)[1]) for k in m if k.startswith("custos-restore-")})
for tool in ["pgbr", "custos"]:
    runs = [m[f"{tool}-restore-{r}"] for r in rounds]
    m[f"{tool}-restore"] = (statistics.median(t for t, _ in runs), max(k for _, k in runs))
for step in ["full", "incr", "restore", "delta"]:
    p, c = m[f"pgbr-{step}"], m[f"custos-{step}"]
    what = f"{step} time" if step != "restore" else f"restore time (median of {len(rounds)})"
    print(f"| {what} | {p[0]:.1f} s | {c[0]:.1f} s | {c[0]/p[0]:.2f} (speed {p[0]/c[0]:.2f}x) |")
for step in ["full", "incr", "restore", "delta"]:
    p, c = m[f"pgbr-{step}"], m[f"custos-{step}"]
    print(f"| {step} peak RSS | {p[1]} MB | {c[1]} MB | {c[1]/max(p[1],1):.2f} |")
mb = lambda k: int(facts[k]) / 2**20
print(f"| repository after full | {mb('pgbr_repo_after_full'):.0f} MiB | {mb('custos_repo_after_full'):.0f} MiB | {mb('custos_repo_after_full')/mb('pgbr_repo_after_full'):.2f} |")
print(f"| incremental adds | {mb('pgbr_incr_added_bytes'):.1f} MiB | {mb('custos_incr_added_bytes'):.1f} MiB | {mb('custos_incr_added_bytes')/mb('pgbr_incr_added_bytes'):.2f} |")
print(f"| repository total (with WAL) | {mb('pgbr_repo_total'):.0f} MiB | {mb('custos_repo_total'):.0f} MiB | {mb('custos_repo_total')/mb('pgbr_repo_total'):.2f} |")
lat = {"pgbr": [], "custos": [], "custos-async": [], "pgbr-async": []}
for line in open(f"{res}/walpush.tsv").read().splitlines()[1:]:
    t, _, ms = line.split("\t")
    lat[t].append(float(ms))
def pct(v, q):
    v = sorted(v); return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]
for q, name in [(0.5, "p50"), (0.95, "p95")]:
    p, c = pct(lat["pgbr"], q), pct(lat["custos"], q)
    print(f"| wal-push {name} (sync, {len(lat['custos'])} segments) | {p:.0f} ms | {c:.0f} ms | {c/p:.2f} |")
for q, name in [(0.5, "p50"), (0.95, "p95")]:
    p, c = pct(lat["pgbr-async"], q), pct(lat["custos-async"], q)
    print(f"| archive_command {name} (async, draining a backlog) | {p:.0f} ms | {c:.0f} ms | {c/max(p, 1):.2f} |")
drains = {"pgbr-async": [], "custos-async": []}
for line in open(f"{res}/drains.tsv").read().splitlines()[1:]:
    mode, rnd, n, ms, cpu = line.split("\t")
    drains[mode].append((int(rnd), int(n) * 16.777216 / (int(ms) / 1000), int(cpu) / int(n)))
tp = {k: statistics.median(t for _, t, _ in v) for k, v in drains.items()}
cpu = {k: statistics.median(c for _, _, c in v) for k, v in drains.items()}
print(f"| async drain throughput (median of {len(drains['custos-async'])}) | {tp['pgbr-async']:.0f} MB/s | {tp['custos-async']:.0f} MB/s | {tp['custos-async']/tp['pgbr-async']:.2f} |")
print(f"| async drain, machine CPU per segment (median) | {cpu['pgbr-async']:.0f} ms | {cpu['custos-async']:.0f} ms | {cpu['custos-async']/cpu['pgbr-async']:.2f} |")
print()
print("| round | restore pgBackRest | restore custos | speed | drain pgBackRest | drain custos | ratio |")
print("|---|---|---|---|---|---|---|")
for r in rounds:
    p, c = m[f"pgbr-restore-{r}"][0], m[f"custos-restore-{r}"][0]
    dp = next(t for k, t, _ in drains["pgbr-async"] if k == r)
    dc = next(t for k, t, _ in drains["custos-async"] if k == r)
    print(f"| {r} | {p:.2f} s | {c:.2f} s | {p/c:.2f}x | {dp:.0f} MB/s | {dc:.0f} MB/s | {dc/dp:.2f} |")
print(f"\npgbench tps {facts.get('pgbench_tps')}; source {int(facts['src_bytes_excl_pg_wal'])/2**30:.2f} GiB without pg_wal")
PY
