#!/usr/bin/env bash
# Files benchmark: custos vs restic (Debian package) on a generated 2 GiB tree, in one run.
#   first backup, second backup after changing 5% of the files, full restore.
# Prints MB/s, repository size, peak RSS and custos/restic ratios; appends the table to
# bench/results/files-<timestamp>.md. Not a test: run by hand on a quiet machine, as root
# (the shared harness drops the page cache before every measured command).
#
#   sudo bench/files.sh            # SIZE_MB=2048 by default
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
