#!/usr/bin/env bash
# custos copy against rclone sync and restic copy, between two SeaweedFS servers on this
# host (issue 19). The repository: the peers' data set (the stopped PostgreSQL 15 cluster,
# pgbench scale 100 and the 200,000 x 384 vector table, 1.9 GB) backed up as files into
# s3://src on server A. Then, each into an empty bucket of server B, page cache dropped:
#   custos copy        every object, hash-named ones checked against their names, every
#                      write checked by the store's MD5 (8 at a time);
#   rclone sync        of the same bucket prefix (--transfers 8; rclone checks the MD5 of
#                      each upload against the ETag too);
#   restic copy        of a restic repository of the same files, A to B (restic decrypts
#                      and re-encrypts every blob).
# Reported: wall, MB/s of the source repository's bytes, CPU, peak RSS, ratios.
# Run as root:  ./bench/copy.sh     Not a test: nothing asserts a time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS:-$ROOT/../shared/bench/peers}"
export RES="${RES:-${BENCH:-/tmp/peerbench}/custos-copy}"
# shellcheck source=/dev/null
source "$PEERS/common.sh"
need_root
apt_need rclone restic time bc python3 curl
"$ROOT/scripts/setup.sh" >/dev/null
(cd "$ROOT" && cargo build --release --quiet)
[ -f "$PRISTINE/.complete" ] || "$PEERS/10-dataset.sh"
CUSTOS="$ROOT/target/release/custos"
WEED="$ROOT/.tools/seaweedfs/bin/weed"
KEY=copybench SECRET=copybench-secret-key
# The servers speak plain HTTP; rclone 1.60 fails on any AWS_CA_BUNDLE ("unsupported transport").
unset AWS_CA_BUNDLE
rm -rf "$RES" "$BENCH/s3-a" "$BENCH/s3-b" "$BENCH/copyconf"
mkdir -p "$RES" "$BENCH/copyconf"

# shellcheck source=/dev/null
source "$ROOT/bench/lib-s3.sh"

start_weed "$BENCH/s3-a"; A_S3=$S3 A_FILER=$FILER
start_weed "$BENCH/s3-b"; B_S3=$S3 B_FILER=$FILER
mkbucket "$A_FILER" src
RUNS=${RUNS:-3}
for i in $(seq "$RUNS"); do for b in custos rclone; do mkbucket "$B_FILER" "dst-$b-$i"; done; done
mkbucket "$B_FILER" dst-restic
log "servers: A :$A_S3, B :$B_S3"

echo "$SECRET" > "$BENCH/copyconf/s3.secret"; chmod 600 "$BENCH/copyconf/s3.secret"
head -c 24 /dev/urandom | base64 > "$BENCH/copyconf/pw"; chmod 600 "$BENCH/copyconf/pw"
cat > "$BENCH/copyconf/custos.toml" <<EOF
[repository]
url = "s3://src/custos"
password_file = "$BENCH/copyconf/pw"
cache_dir = "$BENCH/copyconf/cache"
[storage.s3]
endpoint = "http://127.0.0.1:$A_S3"
region = "us-east-1"
access_key_id = "$KEY"
secret_access_key_file = "$BENCH/copyconf/s3.secret"
[[secondary]]
name = "b"
url = "s3://dst-custos-1/custos"
[secondary.s3]
endpoint = "http://127.0.0.1:$B_S3"
access_key_id = "$KEY"
secret_access_key_file = "$BENCH/copyconf/s3.secret"
EOF
C() { "$CUSTOS" --config "$BENCH/copyconf/custos.toml" "$@"; }
C init -q
log "custos backup of the data set into A"
C backup files "$PRISTINE" -q
export AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET
RA="s3:http://127.0.0.1:$A_S3/src/restic"; RB="s3:http://127.0.0.1:$B_S3/dst-restic/restic"
log "restic backup of the data set into A"
restic -r "$RA" init -q
restic -r "$RA" backup -q "$PRISTINE"
RESTIC_FROM_PASSWORD=$RESTIC_PASSWORD restic -r "$RB" init -q --from-repo "$RA" --copy-chunker-params
export RESTIC_FROM_PASSWORD=$RESTIC_PASSWORD

# rclone remotes from the environment (no config file).
export RCLONE_CONFIG_A_TYPE=s3 RCLONE_CONFIG_A_PROVIDER=Other RCLONE_CONFIG_A_ENDPOINT="http://127.0.0.1:$A_S3" RCLONE_CONFIG_A_ACCESS_KEY_ID=$KEY RCLONE_CONFIG_A_SECRET_ACCESS_KEY=$SECRET
export RCLONE_CONFIG_B_TYPE=s3 RCLONE_CONFIG_B_PROVIDER=Other RCLONE_CONFIG_B_ENDPOINT="http://127.0.0.1:$B_S3" RCLONE_CONFIG_B_ACCESS_KEY_ID=$KEY RCLONE_CONFIG_B_SECRET_ACCESS_KEY=$SECRET

CUSTOS_BYTES=$(rclone size --json A:src/custos | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])')
RESTIC_BYTES=$(rclone size --json A:src/restic | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])')
note custos_repo_bytes "$CUSTOS_BYTES"
note restic_repo_bytes "$RESTIC_BYTES"

# Each tool RUNS times into a fresh bucket, alternating (the machine is noisy: medians).
for i in $(seq "$RUNS"); do
    sed -i "s|s3://dst-custos-[0-9]*/custos|s3://dst-custos-$i/custos|" "$BENCH/copyconf/custos.toml"
    CUSTOS_LOG=info measure "custos-copy-$i" "$CUSTOS" --config "$BENCH/copyconf/custos.toml" copy --to b -q --threads "${COPY_THREADS:-8}"
    measure "rclone-sync-$i" rclone sync --transfers 8 --checkers 16 A:src/custos "B:dst-rclone-$i/custos"
done
rclone check A:src/custos "B:dst-rclone-$RUNS/custos" > "$RES/rclone-check.log" 2>&1 && note rclone_copy_matches yes
measure restic-copy restic -r "$RB" copy -q --from-repo "$RA"

# What arrived is whole: the secondary verifies, rclone's copy matches.
C --secondary b verify -q > "$RES/custos-verify.log" 2>&1 && note custos_secondary_verifies yes

python3 - "$RES" "$CUSTOS_BYTES" "$RESTIC_BYTES" <<'PY' | tee "$RES/summary.txt"
import csv, sys
res, cb, rb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = {r["label"]: r for r in csv.DictReader(open(f"{res}/measure.tsv"), delimiter="\t")}
import statistics
def fig(label, nbytes):
    # The median run by wall time (one run: that run).
    runs = [r for l, r in rows.items() if l == label or l.startswith(label + "-")]
    r = sorted(runs, key=lambda r: float(r["wall_s"]))[len(runs) // 2]
    w = float(r["wall_s"]); cpu = float(r["user_s"]) + float(r["sys_s"])
    return w, nbytes / w / 1e6, cpu, int(r["maxrss_kb"]) // 1024
def walls(label):
    return " ".join(f'{float(r["wall_s"]):.2f}' for l, r in rows.items() if l.startswith(label + "-"))
c = fig("custos-copy", cb); k = fig("rclone-sync", cb); s = fig("restic-copy", rb)
print(f"runs (wall, s): custos {walls('custos-copy')}; rclone {walls('rclone-sync')}; medians below")
print(f"repository: custos {cb/1e6:.0f} MB, restic {rb/1e6:.0f} MB (the same 1.9 GB data set)")
print("| | custos copy | rclone sync | restic copy | custos speed / rclone | custos speed / restic |")
print("|---|---|---|---|---|---|")
print(f"| wall, s | {c[0]:.1f} | {k[0]:.1f} | {s[0]:.1f} | **{k[0]/c[0]:.2f}x** | **{s[0]/c[0]:.2f}x** |")
print(f"| MB/s of the repository | {c[1]:.0f} | {k[1]:.0f} | {s[1]:.0f} | | |")
print(f"| CPU, s | {c[2]:.1f} | {k[2]:.1f} | {s[2]:.1f} | | |")
print(f"| peak RSS, MiB | {c[3]} | {k[3]} | {s[3]} | | |")
PY
