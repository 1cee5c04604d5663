#!/usr/bin/env bash
# custos's main job on an embedded default: a local repository in a scratch folder, sample
# platform data (clinical documents, configuration, Terraform state), then the daily cycle:
# backup, change, incremental backup, verify every byte, restore and compare, retention
# dry run. Prints what it did and how long each step took.
#
# PostgreSQL (WAL archiving, base backups, point-in-time restore) joins this flow with
# issue 3; this script covers what custos does today.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
cargo build --release --quiet
CUSTOS="$PWD/target/release/custos"

WORK="${CUSTOS_DEMO_DIR:-$(mktemp -d /tmp/custos-demo.XXXXXX)}"
mkdir -p "$WORK"
export CUSTOS_REPO="$WORK/repo"
export CUSTOS_CACHE_DIR="$WORK/cache"
# The demo's password lives in a 0600 file, never in argv or the environment.
umask 077
head -c 24 /dev/urandom | base64 > "$WORK/password"
export CUSTOS_PASSWORD_FILE="$WORK/password"

step() {
    local name="$1"; shift
    local t0; t0=$(date +%s.%N)
    "$@"
    local t1; t1=$(date +%s.%N)
    printf '  -> %-34s %6.2f s\n' "$name" "$(echo "$t1 - $t0" | bc)"
}

echo "== sample data in $WORK/data"
python3 - "$WORK/data" <<'PY'
import os, random, sys, json
root = sys.argv[1]
rng = random.Random(42)
for d in range(40):
    p = os.path.join(root, "documents", f"patient-{d:04d}")
    os.makedirs(p, exist_ok=True)
    with open(os.path.join(p, "notes.txt"), "w") as f:
        for i in range(rng.randint(50, 400)):
            f.write(f"{i}: patient stable, BP {rng.randint(100,140)}/{rng.randint(60,90)}, reviewed\n")
    with open(os.path.join(p, "scan.dcm"), "wb") as f:
        f.write(os.urandom(rng.randint(200_000, 2_000_000)))
os.makedirs(os.path.join(root, "config"), exist_ok=True)
with open(os.path.join(root, "config", "app.json"), "w") as f:
    json.dump({"db": {"host": "db.internal", "password_ref": "vault://prod/db#password"}}, f)
with open(os.path.join(root, "terraform.tfstate"), "w") as f:
    json.dump({"version": 4, "resources": [{"type": "aws_s3_bucket", "name": f"b{i}"} for i in range(200)]}, f)
PY
du -sh "$WORK/data" | awk '{print "   " $1 " of documents, config and state"}'

echo "== repository"
step "init (local, AES-256-GCM, restore key)" "$CUSTOS" init -q
echo "== daily full"
step "backup files (documents + config)" "$CUSTOS" backup files "$WORK/data/documents" "$WORK/data/config" -q
step "backup stream (terraform state)" "$CUSTOS" backup stream --name terraform --command "cat '$WORK/data/terraform.tfstate'" -q
echo "== an hour later: 3 notes change, one scan is added"
for d in 1 2 3; do echo "follow-up $(date)" >> "$WORK/data/documents/patient-000$d/notes.txt"; done
head -c 1500000 /dev/urandom > "$WORK/data/documents/patient-0005/scan-2.dcm"
step "backup files (incremental)" "$CUSTOS" backup files "$WORK/data/documents" "$WORK/data/config"
echo "== verification"
step "verify --read-data (decrypt everything)" "$CUSTOS" verify --read-data -q
echo "== restore drill"
step "restore files latest" "$CUSTOS" restore files latest --to "$WORK/restored" -q
diff -r "$WORK/data/documents" "$WORK/restored/documents" && diff -r "$WORK/data/config" "$WORK/restored/config"
echo "   restored tree is identical to the source"
"$CUSTOS" restore stream latest --source terraform > "$WORK/restored.tfstate"
cmp "$WORK/data/terraform.tfstate" "$WORK/restored.tfstate"
echo "   restored Terraform state is identical"
echo "== snapshots"
"$CUSTOS" snapshots
echo "== retention (seed policy: 30 daily, 12 weekly, 12 monthly, 7 yearly), dry run"
"$CUSTOS" forget --dry-run --keep-daily 30 --keep-weekly 12 --keep-monthly 12 --keep-yearly 7
echo "== done: repository $CUSTOS_REPO, $(du -sh "$CUSTOS_REPO" | cut -f1)"
