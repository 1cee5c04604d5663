#!/usr/bin/env bash
# Files benchmark: custos vs restic (Debian package) on a generated 2 GiB tree, in one run.
#   first backup, second backup after changing 5% of the files, full restore.
# Prints MB/s, repository size, peak RSS and custos/restic ratios; appends the table to
# bench/results/files-<timestamp>.md. Not a test: run by hand on a quiet machine, as root
# (the shared harness drops the page cache before every measured command).
#
#   sudo bench/files.sh            # SIZE_MB=2048 by default
#   sudo MODE=s3 SIZE_MB=1024 bench/files.sh
#
# MODE=s3 (issue 21, part 4): one local SeaweedFS server (a bucket per tool) instead of local
# folders. Measures custos's first backup and restore to a local folder and to the bucket,
# restic's on the bucket, and the floor: `rclone copy --transfers 8` of the local repository's
# folder up to the bucket and back down (what moving the stored bytes alone costs on this
# server, which shares the two cores). Reports custos S3 / max(local, rclone) per step
# (target <= 1.2), peak RSS (target <= 200 MB) and custos speed / restic, and the CPU
# floor: all the machine's busy CPU during the step (custos's and the server's) over its
# cores, the time the step takes if both cores were used to the end.
#   SPLIT=1: the server on core 1, every client (custos, restic, rclone) on core 0, as if the
#   store were another machine: what is left of the ratio then is what pipelining does not hide.
#
# Reuses ../shared/bench/peers/common.sh (measure, dropcache, wait_quiet).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHARED="${SHARED:-$ROOT/../shared}"
export BENCH="${BENCH:-/tmp/custos-bench-files}"
export RES="$BENCH/results"
source "$SHARED/bench/peers/common.sh"
need_root
apt_need restic time bc python3
SIZE_MB="${SIZE_MB:-2048}"
MODE="${MODE:-local}"

cd "$ROOT" && cargo build --release --quiet
export CUSTOS="$ROOT/target/release/custos"
DATA="$BENCH/data"
rm -rf "$BENCH/repos" "$BENCH/restore" "$RES" "$BENCH/cache"
mkdir -p "$BENCH/repos" "$BENCH/restore" "$RES"

if [ ! -f "$DATA/.complete-$SIZE_MB" ]; then
    rm -rf "$DATA"
    log "generating a $SIZE_MB MiB tree in $DATA"
    python3 - "$DATA" "$SIZE_MB" <<'PY'
import os, random, sys
root, size_mb = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
words = [w.strip() for w in open("/usr/share/dict/words")] if os.path.exists("/usr/share/dict/words") else \
    "patient vitals stable reviewed dosage mg daily allergy none imaging normal follow up clinic note".split()
def text(n):
    out, size = [], 0
    while size < n:
        line = " ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 10**6)}\n"
        out.append(line); size += len(line)
    return "".join(out).encode()[:n]
def write(path, n, kind):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        left = n
        while left > 0:
            k = min(left, 8 << 20)
            f.write(os.urandom(k) if kind == "bin" else text(k))
            left -= k
MB = 1 << 20
budget = size_mb * MB
large = budget // 2        # a few large files: half random (scans), half text (exports, logs)
for i in range(4):
    write(f"{root}/large/file-{i}.{'bin' if i % 2 else 'csv'}", large // 4, "bin" if i % 2 else "text")
medium = budget * 3 // 10  # 1-8 MiB files, mixed
n = 0
while medium > 0:
    s = min(medium, rng.randint(1, 8) * MB)
    write(f"{root}/medium/d{n % 10}/m{n:04d}.{'pdf' if n % 2 else 'txt'}", s, "bin" if n % 2 else "text")
    medium -= s; n += 1
small = budget - budget // 2 - budget * 3 // 10  # many small files, 1-20 KiB
n = 0
while small > 0:
    s = min(small, rng.randint(1024, 20 * 1024))
    write(f"{root}/small/d{n % 100:02d}/s{n:06d}.{'bin' if n % 3 == 0 else 'json'}", s, "bin" if n % 3 == 0 else "text")
    small -= s; n += 1
PY
    touch "$DATA/.complete-$SIZE_MB"
fi
DATA_BYTES=$(du -sb --exclude='.complete*' "$DATA" | cut -f1)
NFILES=$(find "$DATA" -type f ! -name '.complete*' | wc -l)
log "data: $DATA_BYTES bytes in $NFILES files"
# Work on a copy so that the 5% change does not alter the generated set.
rm -rf "$BENCH/src"; cp -a "$DATA" "$BENCH/src"; rm -f "$BENCH/src"/.complete*
SRC="$BENCH/src"

if [ "$MODE" = s3 ]; then
    apt_need rclone curl
    WEED="$ROOT/.tools/seaweedfs/bin/weed"
    KEY=filesbench SECRET=filesbench-secret-key
    unset AWS_CA_BUNDLE
    # shellcheck source=/dev/null
    source "$ROOT/bench/lib-s3.sh"
    if [ "${SPLIT:-0}" = 1 ]; then
        export WEED_PREFIX="taskset -c 1"
        PRIO="taskset -c 0 $PRIO"
    fi
    one_server "$BENCH/s3"
    for b in custos restic floor; do mkbucket "$FILER" "$b"; done
    export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$BENCH/cache/restic"
    export RESTIC_REPOSITORY="s3:http://127.0.0.1:$S3/restic/r"
    echo bench > "$BENCH/pw"; chmod 600 "$BENCH/pw"; export CUSTOS_PASSWORD_FILE="$BENCH/pw"
    LOCAL="$BENCH/repos/custos" S3REPO="s3://custos/r"
    export CUSTOS_CACHE_DIR="$BENCH/cache/custos"
    restic init -q
    "$CUSTOS" --repo "$LOCAL" init -q >/dev/null
    "$CUSTOS" --repo "$S3REPO" init -q >/dev/null
    # The server's own CPU (user + sys) during each step, from its /proc stat: with the
    # clients' CPU from time(1) it says what each side costs for the same stored bytes.
    WEED_PID=${PIDS[-1]}
    server_jiffies() { awk '{print $14 + $15}' "/proc/$WEED_PID/stat"; }
    printf 'label\tserver_cpu_s\n' > "$RES/server.tsv"
    smeasure() {
        local a b; a=$(server_jiffies)
        measure "$@"
        b=$(server_jiffies)
        printf '%s\t%s\n' "$1" "$(echo "($b - $a) / $(getconf CLK_TCK)" | bc -l)" >> "$RES/server.tsv"
    }
    smeasure custos-local-backup1 "$CUSTOS" --repo "$LOCAL" backup files "$SRC" --json
    smeasure custos-s3-backup1 "$CUSTOS" --repo "$S3REPO" backup files "$SRC" --json
    smeasure restic-s3-backup1 restic backup -q "$SRC"
    smeasure rclone-up rclone copy --transfers 8 --checkers 16 "$LOCAL" W:floor/r
    smeasure custos-local-restore "$CUSTOS" --repo "$LOCAL" restore files latest --to "$BENCH/restore/custos-local"
    smeasure custos-s3-restore "$CUSTOS" --repo "$S3REPO" restore files latest --to "$BENCH/restore/custos-s3"
    smeasure restic-s3-restore restic restore latest -q --target "$BENCH/restore/restic"
    smeasure rclone-down rclone copy --transfers 8 --checkers 16 W:floor/r "$BENCH/restore/rclone"
    diff -rq "$SRC" "$BENCH/restore/custos-s3" >/dev/null && log "custos S3 restore identical to source"
    python3 - "$RES/measure.tsv" "$DATA_BYTES" "$NFILES" "$ROOT/bench/results" "${SPLIT:-0}" "$(nproc)" <<'PY'
import csv, sys, os, datetime
tsv, data, nfiles, outdir, split, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1", int(sys.argv[6])
rows = {r["label"]: r for r in csv.DictReader(open(tsv), delimiter="\t")}
server = {r["label"]: float(r["server_cpu_s"]) for r in csv.DictReader(open(os.path.join(os.path.dirname(tsv), "server.tsv")), delimiter="\t")}
def own(l): return float(rows[l]["user_s"]) + float(rows[l]["sys_s"])
def wall(l): return float(rows[l]["wall_s"])
def rss(l): return int(rows[l]["maxrss_kb"]) / 1024
lines = []
p = lines.append
def busy(l): return float(rows[l]["machine_busy_cpu_s"])
p(f"Data: {data/1e9:.2f} GB in {nfiles} files; one SeaweedFS server on this host"
  + (" on core 1, every client on core 0 (SPLIT=1)." if split else f", sharing its {cores} cores."))
p("")
p("| step | custos local s | custos S3 s | rclone floor s | custos S3 / max(local, floor) | machine CPU s during custos S3 | CPU floor s | custos S3 / CPU floor | custos S3 RSS MB | custos local RSS MB | restic S3 s | restic RSS MB | custos speed / restic |")
p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
res = {}
for step, floor in [("backup1", "rclone-up"), ("restore", "rclone-down")]:
    cl, cs, fl, rs = wall(f"custos-local-{step}"), wall(f"custos-s3-{step}"), wall(floor), wall(f"restic-s3-{step}")
    ratio = cs / max(cl, fl)
    cpu = busy(f"custos-s3-{step}")
    cfloor = cpu / cores
    res[step] = (ratio, rss(f"custos-s3-{step}"))
    p(f"| {step} | {cl:.2f} | {cs:.2f} | {fl:.2f} | {ratio:.2f} | {cpu:.2f} | {cfloor:.2f} | {cs/cfloor:.2f} | {rss('custos-s3-'+step):.0f} | {rss('custos-local-'+step):.0f} | {rs:.2f} | {rss('restic-s3-'+step):.0f} | {rs/cs:.2f}x |")
p("")
p("Who spends the CPU (core-seconds; client from time(1), server from its /proc stat):")
p("")
p("| step | custos local | custos S3 | server during custos S3 | rclone | server during rclone | best on this box s | best / max(local, floor) |")
p("|---|---:|---:|---:|---:|---:|---:|---:|")
for step, floor in [("backup1", "rclone-up"), ("restore", "rclone-down")]:
    cl, fl = wall(f"custos-local-{step}"), wall(floor)
    # custos's local work and the server's work for the same bytes, perfectly overlapped
    # on the machine's cores: no S3 run on this box can be faster.
    best = (own(f"custos-local-{step}") + server[floor]) / cores
    p(f"| {step} | {own('custos-local-'+step):.2f} | {own('custos-s3-'+step):.2f} | {server['custos-s3-'+step]:.2f} | {own(floor):.2f} | {server[floor]:.2f} | {best:.2f} | {best / max(cl, fl):.2f} |")
p("")
for step in ["backup1", "restore"]:
    ratio, r = res[step]
    p(f"- {'met' if ratio <= 1.2 else 'NOT met'}: S3 {step} within 1.2x of max(local, rclone floor) ({ratio:.2f})")
    p(f"- {'met' if r <= 200 else 'NOT met'}: S3 {step} peak RSS <= 200 MB ({r:.0f})")
text = "\n".join(lines)
print(text)
os.makedirs(outdir, exist_ok=True)
stamp = datetime.datetime.utcnow().strftime("%Y%m%dT%H%M%SZ")
open(os.path.join(outdir, f"files-s3{'-split' if split else ''}-{stamp}.md"), "w").write(text + "\n")
PY
    exit 0
fi

export RESTIC_REPOSITORY="$BENCH/repos/restic" RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$BENCH/cache/restic"
export CUSTOS_REPO="$BENCH/repos/custos" CUSTOS_CACHE_DIR="$BENCH/cache/custos"
echo bench > "$BENCH/pw"; chmod 600 "$BENCH/pw"; export CUSTOS_PASSWORD_FILE="$BENCH/pw"
restic init -q
"$CUSTOS" init -q >/dev/null

measure custos-backup1 "$CUSTOS" backup files "$SRC" --json
measure restic-backup1 restic backup -q "$SRC"

log "changing 5% of the files"
python3 - "$SRC" <<'PY'
import os, random, sys
rng = random.Random(11)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(sys.argv[1]) for f in fs)
for p in rng.sample(files, max(1, len(files) * 5 // 100)):
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        off = rng.randint(0, max(0, size - 4096))
        f.seek(off); f.write(os.urandom(min(4096, size)))
PY
measure custos-backup2 "$CUSTOS" backup files "$SRC" --json
measure restic-backup2 restic backup -q "$SRC"
measure custos-restore "$CUSTOS" restore files latest --to "$BENCH/restore/custos"
measure restic-restore restic restore latest -q --target "$BENCH/restore/restic"
diff -rq "$SRC" "$BENCH/restore/custos" >/dev/null && log "custos restore identical to source"
CUSTOS_REPO_BYTES=$(du -sb "$BENCH/repos/custos" | cut -f1)
RESTIC_REPO_BYTES=$(du -sb "$BENCH/repos/restic" | cut -f1)

python3 - "$RES/measure.tsv" "$DATA_BYTES" "$NFILES" "$CUSTOS_REPO_BYTES" "$RESTIC_REPO_BYTES" "$ROOT/bench/results" <<'PY'
import csv, sys, os, datetime, subprocess
tsv, data, nfiles, crepo, rrepo, outdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rows = {r["label"]: r for r in csv.DictReader(open(tsv), delimiter="\t")}
def wall(l): return float(rows[l]["wall_s"])
def rss(l): return int(rows[l]["maxrss_kb"]) / 1024
lines = []
p = lines.append
p(f"Data: {data/1e9:.2f} GB in {nfiles} files; second backup after rewriting 4 KiB in 5% of the files.")
p(f"Versions: {subprocess.run(['restic','version'],capture_output=True,text=True).stdout.strip()}; custos {subprocess.run([os.environ['CUSTOS'] if 'CUSTOS' in os.environ else 'true','--version'],capture_output=True,text=True).stdout.strip()}")
p("")
p("| step | custos s | custos MB/s | custos RSS MB | restic s | restic MB/s | restic RSS MB | custos speed / restic |")
p("|---|---:|---:|---:|---:|---:|---:|---:|")
for step in ["backup1", "backup2", "restore"]:
    c, r = wall(f"custos-{step}"), wall(f"restic-{step}")
    p(f"| {step} | {c:.2f} | {data/1e6/c:.0f} | {rss('custos-'+step):.0f} | {r:.2f} | {data/1e6/r:.0f} | {rss('restic-'+step):.0f} | {r/c:.2f}x |")
p("")
p(f"Repository size: custos {crepo/1e6:.0f} MB, restic {rrepo/1e6:.0f} MB (custos/restic {crepo/rrepo:.3f}).")
p(f"Second backup vs first: custos {wall('custos-backup1')/wall('custos-backup2'):.1f}x faster, restic {wall('restic-backup1')/wall('restic-backup2'):.1f}x faster.")
targets = [
    ("first backup >= 1.5x restic", wall("restic-backup1") / wall("custos-backup1") >= 1.5),
    ("restore >= 2x restic", wall("restic-restore") / wall("custos-restore") >= 2),
    ("repository <= restic", crepo <= rrepo),
    ("peak RSS < 300 MB", max(rss(f"custos-{s}") for s in ["backup1", "backup2", "restore"]) < 300),
    ("second backup >= 5x faster than first", wall("custos-backup1") / wall("custos-backup2") >= 5),
]
p("")
for name, ok in targets:
    p(f"- {'met' if ok else 'NOT met'}: {name}")
text = "\n".join(lines)
print(text)
os.makedirs(outdir, exist_ok=True)
stamp = datetime.datetime.utcnow().strftime("%Y%m%dT%H%M%SZ")
open(os.path.join(outdir, f"files-{stamp}.md"), "w").write(text + "\n")
PY
