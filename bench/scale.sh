#!/usr/bin/env bash
# Issue 21 §2: what commands cost as the chunk index and the operation trail grow. For each
# size in SIZES, a repository gets synthetic index objects naming that many chunks (written
# directly by the synth_index example, 100,000 blobs an object as prune writes them; the
# packs are not written); for each size in TRAILS, a repository gets that many trail
# entries (synth_trail: signed, chained, appended as commands append them, an entry every
# 6 minutes back from now). Then, timed with peak RSS:
#   snapshots                       lists snapshot summaries (never reads the index)
#   backup-first                    1 GiB of new files; builds the host's on-disk index
#                                   (anonymous and file-backed RSS sampled: rss-sample.sh)
#   backup-again                    the same with one file changed; reuses the build and
#                                   holds the previous backup's object in memory over it
#   backup-memory                   as backup-again on a host without a build, the whole index
#                                   held in memory (CUSTOS_INDEX_MEMORY_MB large: the old way;
#                                   up to 10M entries)
#   ls-cached                       lists the newest snapshot (reads the index) with the build
#   wal-push                        one 16 MiB segment of a real cluster
#   audit-since                     audit log --since 1d
#   prune                           after synth_snapshots wrote 10 file snapshots naming,
#                                   between them, every chunk of every other pack: marks
#                                   half the chunks used, deletes the other half's packs
#                                   (absent) and rewrites the index objects. With
#                                   PRUNE_BEFORE=<an older custos binary>, "prune-before"
#                                   runs that binary's prune on a copy made first.
# (the trail sizes: snapshots, backup-first, wal-push, audit-since).
# For each count in HISTORY, a repository gets that many small snapshot objects
# (synth_history: hourly stream backups going back in time), then:
#   history-snapshots-cold          lists them on a host that has no copies (every object
#                                   fetched)
#   history-snapshots-warm          again, from this host's copies (only the listing)
#   history-backup                  a backup of one small file (its parent looked up among
#                                   them all), warm
# With BEFORE=<an older custos binary>, the warm listing and the backup run with it too.
# For each count in WALS, a repository gets that many archived 16 MiB WAL segments
# (synth_wal: about 7x compressible), then:
#   wal-verify                      `verify` (structure: each WAL object's label and size;
#                                   the page cache dropped first locally); with BEFORE=
#                                   also that binary's (wal-verify-before).
# For each count in WAL_LIST, a repository gets that many empty objects named as archived
# segments of one cluster (the listing is what is measured), then `snapshots` (which lists
# the WAL archive for the restorable windows):
#   wal-list-first                  on a host that has not listed it before (one listing)
#   wal-list-split                  again: 16 ranges side by side, split where this host's
#                                   last listing had its quantiles (and BEFORE='s binary).
# MODE=s3: the repository, made locally as above, is copied (rclone) into a bucket of a
# SeaweedFS server on this host and every command runs against s3://.
# Results: $RES/measure.tsv; figures go to bench/RESULTS.md.
# Run as root:  SIZES="1000000 10000000" TRAILS="100000 1000000" ./bench/scale.sh
# Not a test. Needs about 17 GB of disk for 100M entries.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS:-$ROOT/../shared/bench/peers}"
export RES="${RES:-/tmp/custos-scale/results}"
SIZES="${SIZES-1000000 10000000}"
TRAILS="${TRAILS-}"
HISTORY="${HISTORY-}"
WALS="${WALS-}"
WAL_LIST="${WAL_LIST-}"
MODE="${MODE:-local}"
WORK="${WORK:-/tmp/custos-scale}"
# shellcheck source=/dev/null
source "$PEERS/common.sh"
need_root
apt_need time bc postgresql-15 eatmydata
"$ROOT/scripts/setup.sh" >/dev/null
(cd "$ROOT" && cargo build --release --quiet && cargo build --release --quiet -p custos-repo --example synth_index --example synth_trail --example synth_history --example synth_wal && cargo build --release --quiet -p custos-ops --example synth_snapshots)
CUSTOS="$ROOT/target/release/custos"
SYNTH="$ROOT/target/release/examples/synth_index"
SYNTH_TRAIL="$ROOT/target/release/examples/synth_trail"
SYNTH_SNAPSHOTS="$ROOT/target/release/examples/synth_snapshots"
SYNTH_HISTORY="$ROOT/target/release/examples/synth_history"
SYNTH_WAL="$ROOT/target/release/examples/synth_wal"
if [ "$MODE" = s3 ]; then
    apt_need rclone curl
    WEED="$ROOT/.tools/seaweedfs/bin/weed"
    KEY=scalebench SECRET=scalebench-secret-key
    unset AWS_CA_BUNDLE
    # shellcheck source=/dev/null
    source "$ROOT/bench/lib-s3.sh"
    one_server "$WORK/s3"
fi
# use LOCAL_REPO LABEL: where the commands run (the folder, or its copy in a bucket).
use() {
    if [ "$MODE" = s3 ]; then
        mkbucket "$FILER" "$2"
        rclone copy --transfers 32 --checkers 32 "$1" "W:$2/r"
        export CUSTOS_REPO="s3://$2/r"
    else
        export CUSTOS_REPO="$1"
    fi
}
rm -rf "$RES"
mkdir -p "$RES" "$WORK"

# 1 GiB of files that do not compress or deduplicate: 64 of 16 MiB.
DATA="$WORK/data"
if [ ! -f "$DATA/.complete" ]; then
    rm -rf "$DATA"; mkdir -p "$DATA"
    for i in $(seq 1 64); do head -c $((16 << 20)) /dev/urandom > "$DATA/f$i"; done
    touch "$DATA/.complete"
fi
# One real WAL segment and its cluster's pg_control (wal-push checks the system id).
PG15="$(dirname "$(dpkg -L postgresql-15 | grep '/bin/initdb$')")"
CL="$WORK/cluster"
if [ ! -f "$CL/PG_VERSION" ]; then
    rm -rf "$CL"; install -d -o postgres "$CL"
    runuser -u postgres -- "$PG15/initdb" -D "$CL" >/dev/null
fi
SEG="$(ls "$CL/pg_wal" | grep -E '^[0-9A-F]{24}$' | head -1)"

for n in $SIZES; do
    R="$WORK/repo-$n"
    export CUSTOS_REPO="$R" CUSTOS_PASSWORD="scale-bench" CUSTOS_CACHE_DIR="$WORK/cache-$n"
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    "$CUSTOS" --quiet init --kdf-memory-mib 8 --kdf-iterations 1
    log "writing $n synthetic chunk entries"
    t0=$(date +%s)
    "$SYNTH" "$R" "$n"
    note "synth-$n-seconds" "$(( $(date +%s) - t0 ))"
    note "index-objects-$n" "$(ls "$R/index" | wc -l)"
    note "index-bytes-$n" "$(du -sb "$R/index" | cut -f1)"
    use "$R" "index-$n"
    measure "snapshots-$n" "$CUSTOS" --quiet snapshots
    # Sampled too: how much of the peak is the process's own memory, how much mapped files.
    measure "backup-first-$n" "$ROOT/bench/rss-sample.sh" "$RES/backup-first-$n.rss" "$CUSTOS" --quiet backup files "$DATA"
    note "backup-first-$n-rss" "$(tail -1 "$RES/backup-first-$n.rss")"
    note "cache-bytes-$n" "$(du -sb "$CUSTOS_CACHE_DIR" | cut -f1)"
    head -c 1M /dev/urandom > "$DATA/f1"
    measure "backup-again-$n" "$CUSTOS" --quiet backup files "$DATA"
    head -c 1M /dev/urandom > "$DATA/f2"
    # The old way holds ~100 bytes a chunk: shown up to 10M entries (1 GB), not at 100M.
    if [ "$n" -le 10000000 ]; then
        measure "backup-memory-$n" env CUSTOS_INDEX_MEMORY_MB=1000000 CUSTOS_CACHE_DIR="$WORK/nocache-$n" "$CUSTOS" --quiet backup files "$DATA"
        rm -rf "$WORK/nocache-$n"
    fi
    measure "ls-cached-$n" "$CUSTOS" --quiet ls latest
    measure "wal-push-$n" "$CUSTOS" --quiet wal-push --pgdata "$CL" "$CL/pg_wal/$SEG"
    measure "audit-since-$n" "$CUSTOS" --quiet audit log --since 1d
    if [ "$MODE" = s3 ]; then rclone purge "W:index-$n"; fi
    log "writing synthetic snapshots over $n chunk entries"
    t0=$(date +%s)
    "$SYNTH_SNAPSHOTS" "$R" 10
    note "synth-snapshots-$n-seconds" "$(( $(date +%s) - t0 ))"
    if [ -n "${PRUNE_BEFORE:-}" ]; then
        rm -rf "$R-before"; cp -a "$R" "$R-before"
        use "$R-before" "prune-before-$n"
        # Its own cache folder: this host's record of the trail's head is per folder, and
        # the copy's trail goes on from here apart from the original's.
        measure "prune-before-$n" env CUSTOS_CACHE_DIR="$WORK/cache-before-$n" "$PRUNE_BEFORE" --quiet prune
        rm -rf "$R-before" "$WORK/cache-before-$n"
        if [ "$MODE" = s3 ]; then rclone purge "W:prune-before-$n"; fi
    fi
    use "$R" "prune-$n"
    measure "prune-$n" "$CUSTOS" --quiet prune
    note "index-objects-after-prune-$n" "$(if [ "$MODE" = s3 ]; then rclone lsf "W:prune-$n/r/index" | wc -l; else ls "$R/index" | wc -l; fi)"
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    if [ "$MODE" = s3 ]; then rclone purge "W:prune-$n"; fi
done
for n in $TRAILS; do
    R="$WORK/trail-$n"
    export CUSTOS_REPO="$R" CUSTOS_PASSWORD="scale-bench" CUSTOS_CACHE_DIR="$WORK/cache-trail-$n"
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    # The repository's first entry (init) dated before the synthetic ones: an entry is
    # never dated before the one it follows, so an init dated now would date them all now.
    CUSTOS_TEST_NOW="$(date -u -d "-$(( n * 6 + 60 )) minutes" +%Y-%m-%dT%H:%M:%SZ)" \
        "$CUSTOS" --quiet init --kdf-memory-mib 8 --kdf-iterations 1
    log "appending $n synthetic trail entries"
    t0=$(date +%s)
    # Without an fsync per entry (eatmydata): what is measured is reading the trail, and
    # a million synced appends take close to an hour on this disk; one sync at the end.
    eatmydata "$SYNTH_TRAIL" "$R" "$n"
    sync
    note "synth-trail-$n-seconds" "$(( $(date +%s) - t0 ))"
    note "trail-bytes-$n" "$(du -sb "$R/audit" | cut -f1)"
    use "$R" "trail-$n"
    measure "trail-snapshots-$n" "$CUSTOS" --quiet snapshots
    measure "trail-backup-first-$n" "$CUSTOS" --quiet backup files "$DATA"
    measure "trail-wal-push-$n" "$CUSTOS" --quiet wal-push --pgdata "$CL" "$CL/pg_wal/$SEG"
    measure "trail-audit-since-$n" "$CUSTOS" --quiet audit log --since 1d
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    if [ "$MODE" = s3 ]; then rclone purge "W:trail-$n"; fi
done
for n in $HISTORY; do
    R="$WORK/history-$n"
    export CUSTOS_REPO="$R" CUSTOS_PASSWORD="scale-bench" CUSTOS_CACHE_DIR="$WORK/cache-history-$n"
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    "$CUSTOS" --quiet init --kdf-memory-mib 8 --kdf-iterations 1
    "$SYNTH_HISTORY" "$R" "$n" >/dev/null
    note "history-bytes-$n" "$(du -sb "$R/snapshots" | cut -f1)"
    use "$R" "history-$n"
    measure "history-snapshots-cold-$n" "$CUSTOS" --quiet snapshots
    measure "history-snapshots-warm-$n" "$CUSTOS" --quiet snapshots
    if [ -n "${BEFORE:-}" ]; then
        measure "history-snapshots-warm-before-$n" "$BEFORE" --quiet snapshots
    fi
    mkdir -p "$WORK/small" && head -c 64K /dev/urandom > "$WORK/small/f"
    measure "history-backup-$n" "$CUSTOS" --quiet backup files "$WORK/small"
    if [ -n "${BEFORE:-}" ]; then
        measure "history-backup-before-$n" "$BEFORE" --quiet backup files "$WORK/small"
    fi
    note "history-copies-bytes-$n" "$(du -sb "$CUSTOS_CACHE_DIR" | cut -f1)"
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    if [ "$MODE" = s3 ]; then rclone purge "W:history-$n"; fi
done
for n in $WALS; do
    R="$WORK/wal-$n"
    export CUSTOS_REPO="$R" CUSTOS_PASSWORD="scale-bench" CUSTOS_CACHE_DIR="$WORK/cache-wal-$n"
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    "$CUSTOS" --quiet init --kdf-memory-mib 8 --kdf-iterations 1
    "$SYNTH_WAL" "$R" "$n" >/dev/null
    note "wal-bytes-$n" "$(du -sb "$R/wal" | cut -f1)"
    use "$R" "wal-$n"
    # Cold: what a daily verify on another host meets (locally, the page cache dropped).
    if [ "$MODE" = local ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
    measure "wal-verify-$n" "$CUSTOS" --quiet verify
    if [ -n "${BEFORE:-}" ]; then
        if [ "$MODE" = local ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
        measure "wal-verify-before-$n" "$BEFORE" --quiet verify
    fi
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    if [ "$MODE" = s3 ]; then rclone purge "W:wal-$n"; fi
done
for n in $WAL_LIST; do
    R="$WORK/wallist-$n"
    export CUSTOS_REPO="$R" CUSTOS_PASSWORD="scale-bench" CUSTOS_CACHE_DIR="$WORK/cache-wallist-$n"
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    "$CUSTOS" --quiet init --kdf-memory-mib 8 --kdf-iterations 1
    # Names only (the listing is what is measured): n segments of one cluster, 16 MiB each.
    python3 - "$R/wal/7000000000000001" "$n" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
for i in range(1, n + 1):
    open(os.path.join(d, "00000001%08X%08X" % (i // 256, i % 256)), "wb").close()
PY
    use "$R" "wallist-$n"
    measure "wal-list-first-$n" "$CUSTOS" --quiet snapshots
    measure "wal-list-split-$n" "$CUSTOS" --quiet snapshots
    if [ -n "${BEFORE:-}" ]; then
        measure "wal-list-before-$n" "$BEFORE" --quiet snapshots
    fi
    rm -rf "$R" "$CUSTOS_CACHE_DIR"
    if [ "$MODE" = s3 ]; then rclone purge "W:wallist-$n"; fi
done
rm -f "$DATA/.complete"
column -t "$RES/measure.tsv"
if [ -f "$RES/facts.tsv" ]; then column -t "$RES/facts.tsv"; fi
