//! Tables and the vector store, the application's audit log, and logical dumps, against
//! real PostgreSQL 18 with pgvector (and 15 for dumps): what was restored equals what was
//! there, proven by rows, digests and nearest neighbours; every audit row is exported
//! exactly once while transactions commit out of order; damage to the chain is named.

mod common;
use common::*;

use custos_testkit::{pg15_bin, pg18_bin, PgCluster};

fn connect(t: &mut T, pg: &PgCluster) {
    t.set("PGHOST", pg.dir.to_str().unwrap());
    t.set("PGPORT", &pg.port.to_string());
    t.set("PGUSER", "postgres");
    t.set("PGDATABASE", "postgres");
}

/// A content hash of a table's rows, in key order, as PostgreSQL prints them.
fn table_md5(pg: &PgCluster, table: &str, filter: &str) -> String {
    pg.psql(&format!(
        "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY id), '')) FROM {table} t {filter}"
    ))
}

/// An embedding: a random combination of eight fixed directions, plus a little noise;
/// `row` makes it one per row. Real embeddings lie near a space of low dimension like
/// this; uniform random vectors in 384 dimensions (no approximate index serves them
/// well) or islands of far-apart clusters (HNSW's graph does not connect them) do not.
fn embedding_sql(row: &str) -> String {
    format!(
        "((SELECT sum(d.v * array_fill((random() * 2 - 1)::real + 0 * {row}, ARRAY[384])::vector) FROM directions d) \
         + (SELECT array_agg((random()::real - 0.5) * 0.02) FROM generate_series(1, 384) WHERE {row} IS NOT NULL)::vector)"
    )
}

fn make_documents(pg: &PgCluster, rows: u64) {
    pg.psql("CREATE EXTENSION IF NOT EXISTS vector");
    pg.psql(
        "SELECT setseed(0.42); CREATE TABLE directions AS SELECT k, \
         (SELECT array_agg(random()::real - 0.5) FROM generate_series(1, 384) WHERE k >= 0)::vector v \
         FROM generate_series(1, 8) k",
    );
    pg.psql(
        "CREATE TABLE document_embeddings (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         patient_id int NOT NULL, chunk text NOT NULL, embedding vector(384) NOT NULL)",
    );
    pg.psql(&format!(
        "SELECT setseed(0.17); INSERT INTO document_embeddings (patient_id, chunk, embedding) \
         SELECT g % 997, 'note ' || g, {} FROM generate_series(1, {rows}) g",
        embedding_sql("g")
    ));
    pg.psql("SET maintenance_work_mem = '1GB'; CREATE INDEX document_embeddings_hnsw ON document_embeddings USING hnsw (embedding vector_cosine_ops)");
}

#[test]
fn vector_store_round_trip_with_neighbour_proofs() {
    let pg = PgCluster::init(pg18_bin(), "max_parallel_maintenance_workers = 2\n");
    pg.start();
    make_documents(&pg, 100_000);
    let mut t = T::new();
    connect(&mut t, &pg);

    let first = t.json(&["backup", "table", "--table", "document_embeddings"]);
    let full_bytes = first["backup"]["stats"]["bytes"].as_u64().unwrap();
    let full_stored = first["backup"]["stats"]["bytes_stored"].as_u64().unwrap();
    assert_eq!(first["tables"][0]["rows"], 100_000);
    assert_eq!(first["tables"][0]["vector_dims"], 384);
    let before = table_md5(&pg, "document_embeddings", "");
    let before_42 = table_md5(&pg, "document_embeddings", "WHERE patient_id = 42");

    // 1% of rows change, as an hour of re-embedding would.
    pg.psql(&format!(
        "UPDATE document_embeddings e SET embedding = {}, chunk = chunk || ' (revised)' \
         WHERE e.id % 100 = 3",
        embedding_sql("e.id")
    ));
    let after = table_md5(&pg, "document_embeddings", "");
    assert_ne!(before, after);
    let second = t.json(&["backup", "table", "--table", "document_embeddings"]);
    let added = second["backup"]["stats"]["bytes_stored"].as_u64().unwrap();
    eprintln!(
        "full export {full_bytes} bytes ({full_stored} stored); the hourly export after 1% of rows changed stored {added} bytes ({:.1}% of the full export)",
        added as f64 * 100.0 / full_stored as f64
    );
    assert!(
        added * 100 <= full_stored * 5,
        "1% of rows changed but the export stored {added} of {full_stored} bytes"
    );

    let first_id = first["backup"]["snapshot"].as_str().unwrap();
    let second_id = second["backup"]["snapshot"].as_str().unwrap();
    for (snap, name, expect) in [
        (first_id, "restored_first", &before),
        (second_id, "restored_second", &after),
    ] {
        let r = t.json(&[
            "restore",
            "table",
            snap,
            "--table",
            "document_embeddings",
            "--as",
            name,
        ]);
        let p = &r["tables"][0];
        assert_eq!(p["rows_loaded"], 100_000, "{r}");
        assert_eq!(p["digest_matches"], true, "{r}");
        assert_eq!(p["samples"], 8, "{r}");
        assert_eq!(p["samples_exact"], 8, "{r}");
        let recall = p["recall_at_10"].as_f64().unwrap();
        eprintln!(
            "{name}: load {:.1} s, HNSW {:.1} s, recall@10 {recall}",
            p["load_seconds"].as_f64().unwrap(),
            p["indexes"][0]["seconds"].as_f64().unwrap()
        );
        assert!(recall >= 0.95, "recall@10 {recall}: {r}");
        assert_eq!(p["indexes"][0]["method"], "hnsw", "{r}");
        // Independently of custos's own proofs: the rows are the ones backed up.
        assert_eq!(&table_md5(&pg, name, ""), expect);
        assert_eq!(
            pg.psql(&format!("SELECT indexdef LIKE '%hnsw%vector_cosine_ops%' FROM pg_indexes WHERE tablename = '{name}' AND indexname LIKE '%hnsw'")),
            "t"
        );
    }
    // The live table was never touched.
    assert_eq!(table_md5(&pg, "document_embeddings", ""), after);

    // One patient's notes, as they were at the first export, beside the live table.
    let r = t.json(&[
        "restore",
        "table",
        first_id,
        "--table",
        "document_embeddings",
        "--as",
        "notes_42",
        "--where",
        "patient_id = 42",
    ]);
    assert_eq!(
        r["tables"][0]["rows_loaded"].as_u64().unwrap(),
        pg.psql("SELECT count(*) FROM document_embeddings WHERE patient_id = 42")
            .parse::<u64>()
            .unwrap()
    );
    assert_eq!(table_md5(&pg, "notes_42", ""), before_42);

    // A restore into an existing table is refused and changes nothing.
    let err = t.fails(
        &[
            "restore",
            "table",
            first_id,
            "--table",
            "document_embeddings",
        ],
        2,
    );
    assert!(
        err.contains("already exists") && err.contains("--as"),
        "{err}"
    );
    assert_eq!(table_md5(&pg, "document_embeddings", ""), after);
}

#[test]
fn table_bad_input_is_refused_and_leaves_nothing_behind() {
    let pg = PgCluster::init(pg18_bin(), "");
    pg.start();
    make_documents(&pg, 2_000);
    pg.psql("CREATE TABLE events (at timestamptz, what text); INSERT INTO events SELECT now(), 'e' || g FROM generate_series(1, 100) g");
    let mut t = T::new();
    connect(&mut t, &pg);
    let state = t.repo_state();

    let err = t.fails(&["backup", "table", "--table", "no_such_table"], 17);
    assert!(err.contains("no table `no_such_table`"), "{err}");
    let err = t.fails(&["backup", "table", "--table", "events"], 2);
    assert!(
        err.contains("no primary key") && err.contains("--order-by"),
        "{err}"
    );
    let err = t.fails(
        &[
            "backup",
            "table",
            "--table",
            "document_embeddings",
            "--vector-column",
            "chunk",
        ],
        2,
    );
    assert!(err.contains("not pgvector's vector"), "{err}");
    let err = t.fails(
        &[
            "backup",
            "audit-log",
            "--table",
            "events",
            "--order-by",
            "what",
        ],
        2,
    );
    assert!(err.contains("not monotonic"), "{err}");
    assert_eq!(
        t.repo_state(),
        state,
        "a refused backup wrote to the repository"
    );

    // With --order-by a table without a key is exported, and restores.
    t.ok(&[
        "backup",
        "table",
        "--table",
        "events",
        "--order-by",
        "at",
        "--order-by",
        "what",
    ]);
    let r = t.json(&[
        "restore",
        "table",
        "latest",
        "--table",
        "events",
        "--as",
        "events_back",
    ]);
    assert_eq!(r["tables"][0]["rows_loaded"], 100);
    assert_eq!(r["tables"][0]["digest_matches"], true);

    t.ok(&["backup", "table", "--table", "document_embeddings"]);
    // A --where that does not parse: nothing is created.
    let err = t.fails(
        &[
            "restore",
            "table",
            "latest",
            "--table",
            "document_embeddings",
            "--as",
            "partial",
            "--where",
            "patient_id = = 3; DROP TABLE document_embeddings",
        ],
        2,
    );
    assert!(err.contains("--where"), "{err}");
    assert_eq!(pg.psql("SELECT to_regclass('partial') IS NULL"), "t");
    assert_eq!(pg.psql("SELECT count(*) FROM document_embeddings"), "2000");

    // A database without pgvector: one clear error naming the extension.
    pg.psql("CREATE DATABASE plain");
    let url = format!(
        "host={} port={} user=postgres dbname=plain",
        pg.dir.display(),
        pg.port
    );
    let err = t.fails(
        &[
            "restore",
            "table",
            "latest",
            "--table",
            "document_embeddings",
            "--db-url",
            &url,
        ],
        2,
    );
    assert!(err.contains("CREATE EXTENSION vector"), "{err}");

    // verify --table: the proofs in a scratch database, which is dropped afterwards.
    let v = t.json(&["verify", "--table", "latest"]);
    assert_eq!(v["tables"][0]["samples_exact"], 8, "{v}");
    assert_eq!(v["tables"][0]["digest_matches"], true, "{v}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_database WHERE datname LIKE 'custos_verify_%'"),
        "0"
    );
}

#[test]
fn audit_log_rows_are_exported_exactly_once_and_the_chain_names_damage() {
    let pg = PgCluster::init(pg18_bin(), "max_connections = 50\n");
    pg.start();
    pg.psql(
        "CREATE TABLE audit_log (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(), \
         actor text NOT NULL, action text NOT NULL)",
    );
    let mut t = T::new();
    connect(&mut t, &pg);

    // Four writers whose transactions take their id at insert and commit up to 400 ms
    // later, so smaller ids keep becoming visible after larger ones were exported.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let stop = stop.clone();
            let psql = pg.bin.join("psql");
            let host = pg.dir.clone();
            let port = pg.port;
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let sleep = (w * 97 + n * 61) % 400;
                    let sql = format!(
                        "BEGIN; INSERT INTO audit_log (actor, action) VALUES ('writer{w}', 'read {n}'); \
                         SELECT pg_sleep({sleep} / 1000.0); \
                         INSERT INTO audit_log (actor, action) VALUES ('writer{w}', 'write {n}'); COMMIT;"
                    );
                    let out = custos_testkit::as_postgres(&psql)
                        .args(["-X", "-q", "-h"])
                        .arg(&host)
                        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-c", &sql])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut exports = vec![];
    for _ in 0..20 {
        sleep_ms(150);
        exports.push(t.json(&[
            "backup",
            "audit-log",
            "--table",
            "audit_log",
            "--order-by",
            "id",
        ]));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written: u64 = writers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(written > 20, "the writers wrote {written} transactions");
    // Everything committed now: one more export takes the rest.
    exports.push(t.json(&[
        "backup",
        "audit-log",
        "--table",
        "audit_log",
        "--order-by",
        "id",
    ]));

    // The hazard happened: an export took a row whose id is below what an earlier one took.
    let mut max_seen = 0i64;
    let mut late = 0;
    for e in &exports {
        let f = &e["facts"];
        if let Some(first) = f["first"].as_str() {
            if first.parse::<i64>().unwrap() < max_seen {
                late += 1;
            }
            max_seen = max_seen.max(f["last"].as_str().unwrap().parse().unwrap());
        }
    }
    let carried: u64 = exports
        .iter()
        .map(|e| e["facts"]["carried"].as_u64().unwrap())
        .sum();
    eprintln!(
        "{late} export(s) took rows with ids below an earlier export's; {carried} row(s) carried"
    );
    assert!(
        late + carried > 0,
        "no export saw an out-of-order commit: the test did not exercise the hazard"
    );

    let live: u64 = pg.psql("SELECT count(*) FROM audit_log").parse().unwrap();
    let exported: u64 = exports
        .iter()
        .map(|e| e["facts"]["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(
        exported, live,
        "rows exported {exported}, rows in the table {live}"
    );
    let v = t.json(&["audit-log", "verify", "--read-data"]);
    assert_eq!(v[0]["exports"], 21, "{v}");
    assert_eq!(v[0]["problems"].as_array().unwrap().len(), 0, "{v}");

    // Restored beside the live table: every row exactly once.
    let r = t.json(&["restore", "audit-log", "--as", "audit_restored"]);
    assert_eq!(r["rows"].as_u64().unwrap(), live);
    assert_eq!(
        pg.psql("SELECT count(*) FROM (SELECT id FROM audit_log EXCEPT SELECT id FROM audit_restored) x"),
        "0"
    );
    assert_eq!(
        pg.psql("SELECT count(DISTINCT id) = count(*) FROM audit_restored"),
        "t"
    );
    assert_eq!(
        table_md5(&pg, "audit_log", ""),
        table_md5(&pg, "audit_restored", "")
    );
    // Never into the live table.
    let err = t.fails(&["restore", "audit-log", "--as", "audit_log"], 2);
    assert!(err.contains("new table"), "{err}");

    // forget keeps every export younger than the minimum retention, whatever it is told.
    let f = t.json(&["forget", "--keep-last", "1", "--dry-run"]);
    let decisions = f["plan"]["groups"]
        .as_array()
        .or_else(|| f["groups"].as_array())
        .unwrap()
        .iter()
        .find(|g| g["kind"] == "audit-log")
        .unwrap()["decisions"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(decisions.len(), 21);
    assert!(decisions.iter().all(|d| d["keep"] == true), "{f}");
    assert!(
        decisions.iter().any(|d| d["reasons"][0]
            .as_str()
            .unwrap()
            .contains("audit-log minimum retention until")),
        "{f}"
    );

    // Damage: an export's object altered, then another deleted; each is named.
    let snap_path = |id: &str| {
        let dir = std::path::Path::new(&t.repo).join("snapshots");
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(id))
            .unwrap()
    };
    let seventh = exports[6]["backup"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let p7 = snap_path(&seventh);
    let original = std::fs::read(&p7).unwrap();
    let mut altered = original.clone();
    let mid = altered.len() / 2;
    altered[mid] ^= 1;
    std::fs::write(&p7, &altered).unwrap();
    let out = t.run(&["audit-log", "verify"]);
    assert_eq!(out.status.code(), Some(14));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&seventh[..8]) && text.contains("altered"),
        "{text}"
    );
    assert!(text.contains("exports 7 to 7 are missing"), "{text}");
    std::fs::write(&p7, &original).unwrap();
    t.ok(&["audit-log", "verify"]);

    let twelfth = exports[11]["backup"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(snap_path(&twelfth)).unwrap();
    let out = t.run(&["audit-log", "verify"]);
    assert_eq!(out.status.code(), Some(14));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("exports 12 to 12 are missing"), "{text}");
    // `verify` checks the chains too.
    let out = t.run(&["verify"]);
    assert_ne!(out.status.code(), Some(0));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("exports 12 to 12 are missing"), "{text}");
    // A new export still links to the newest one, and the gap stays reported.
    t.ok(&[
        "backup",
        "audit-log",
        "--table",
        "audit_log",
        "--order-by",
        "id",
    ]);
    let out = t.run(&["audit-log", "verify", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["problems"].as_array().unwrap().len(), 1, "{v}");

    // Reordering: a key holder writes a copy of export 15 dated before export 14, claiming
    // its place.
    let a = common::attack::Attacker::open(&t, PW);
    let snaps = a.repo.snapshots().unwrap();
    let of = |id: &str| snaps.iter().find(|s| s.id.to_hex() == id).unwrap().clone();
    let s14 = of(exports[13]["backup"]["snapshot"].as_str().unwrap());
    let s15 = of(exports[14]["backup"]["snapshot"].as_str().unwrap());
    let mut moved = s15.summary.clone();
    moved.time = s14.summary.time - chrono::Duration::seconds(1);
    moved.host = "elsewhere".into();
    let body = a.repo.snapshot_body(&s15.id).unwrap();
    let planted = a.repo.save_snapshot(&moved, &body).unwrap();
    let out = t.run(&["audit-log", "verify"]);
    assert_eq!(out.status.code(), Some(14));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("both claim place 15") && text.contains(&planted.to_hex()[..8]),
        "{text}"
    );
    // A new export refuses to extend a chain that forks.
    let err = t.fails(
        &[
            "backup",
            "audit-log",
            "--table",
            "audit_log",
            "--order-by",
            "id",
        ],
        14,
    );
    assert!(err.contains("forks"), "{err}");
}

fn dump_round_trip(bin: std::path::PathBuf) {
    let pg = PgCluster::init(bin.clone(), "");
    pg.start();
    pg.psql("CREATE TABLE patients (id int PRIMARY KEY, name text); INSERT INTO patients SELECT g, 'p' || g FROM generate_series(1, 3000) g");
    pg.psql("CREATE TABLE visits (id bigserial PRIMARY KEY, patient int REFERENCES patients, at date); INSERT INTO visits (patient, at) SELECT 1 + g % 3000, date '2026-01-01' + g % 300 FROM generate_series(1, 20000) g");
    let mut t = T::new();
    connect(&mut t, &pg);
    let bin_s = bin.display().to_string();
    let d = t.json(&["backup", "dump", "--pg-bin", &bin_s]);
    let counts = d["facts"]["tables"].as_array().unwrap();
    assert!(
        counts
            .iter()
            .any(|c| c["table"] == "public.visits" && c["rows"] == 20000),
        "{d}"
    );
    assert!(
        counts
            .iter()
            .any(|c| c["table"] == "public.patients" && c["rows"] == 3000),
        "{d}"
    );
    let list = t.json(&["snapshots"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|s| s["summary"]["kind"] == "dump"),
        "{list}"
    );

    // The whole database into an empty one, then one table into another.
    pg.psql("CREATE DATABASE whole");
    pg.psql("CREATE DATABASE one");
    let url = |db: &str| {
        format!(
            "host={} port={} user=postgres dbname={db}",
            pg.dir.display(),
            pg.port
        )
    };
    let r = t.json(&[
        "restore",
        "dump",
        "latest",
        "--db-url",
        &url("whole"),
        "--pg-bin",
        &bin_s,
    ]);
    assert_eq!(r["counts"].as_array().unwrap().len(), 2, "{r}");
    let r = t.json(&[
        "restore",
        "dump",
        "latest",
        "--db-url",
        &url("one"),
        "--table",
        "patients",
        "--pg-bin",
        &bin_s,
    ]);
    assert_eq!(r["counts"][0]["restored"], 3000, "{r}");
    let sum = |db: &str, q: &str| {
        let out = custos_testkit::as_postgres(&bin.join("psql"))
            .args(["-X", "-A", "-t", "-h"])
            .arg(&pg.dir)
            .args([
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                q,
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let q = "SELECT md5(string_agg(v::text, ',' ORDER BY id)) FROM visits v";
    assert_eq!(sum("whole", q), sum("postgres", q));
    assert_eq!(sum("one", "SELECT to_regclass('visits') IS NULL"), "t");
    // Restoring over tables that exist needs --clean.
    let err = t.fails(
        &[
            "restore",
            "dump",
            "latest",
            "--db-url",
            &url("one"),
            "--table",
            "patients",
            "--pg-bin",
            &bin_s,
        ],
        2,
    );
    assert!(err.contains("--clean"), "{err}");
}

#[test]
fn dump_round_trip_postgres_15() {
    dump_round_trip(pg15_bin());
}

#[test]
fn dump_round_trip_postgres_18_and_an_older_pg_dump_is_refused() {
    dump_round_trip(pg18_bin());
    let pg = PgCluster::init(pg18_bin(), "");
    pg.start();
    let mut t = T::new();
    connect(&mut t, &pg);
    let state = t.repo_state();
    let err = t.fails(
        &["backup", "dump", "--pg-bin", "/usr/lib/postgresql/15/bin"],
        2,
    );
    assert!(
        err.contains("older than the server") && err.contains("postgresql-client-18"),
        "{err}"
    );
    assert_eq!(t.repo_state(), state);
}

/// A table snapshot's record becomes SQL on restore, and a backup key may have written
/// it: a type that smuggles a statement, an index definition with a second statement, or
/// a CHECK that calls a volatile function (run on every row loaded) are refused before
/// any row is loaded, and nothing is left in the database.
#[test]
fn a_planted_table_record_cannot_run_sql_on_restore() {
    let pg = PgCluster::init(pg18_bin(), "");
    pg.start();
    pg.psql("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL CHECK (length(body) > 0)); INSERT INTO notes SELECT g, 'n' || g FROM generate_series(1, 500) g");
    pg.psql("CREATE TABLE victims (id int); INSERT INTO victims VALUES (1)");
    let mut t = T::new();
    connect(&mut t, &pg);
    let real = t.json(&["backup", "table", "--table", "notes"]);
    let real_id = real["backup"]["snapshot"].as_str().unwrap().to_string();

    let a = common::attack::Attacker::open(&t, PW);
    let snap = a
        .repo
        .snapshots()
        .unwrap()
        .into_iter()
        .find(|s| s.id.to_hex() == real_id)
        .unwrap();
    let body = a.repo.snapshot_body(&snap.id).unwrap();
    let plant = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut b = body.clone();
        let mut rec = b.record.clone().unwrap();
        edit(&mut rec["tables"][0]["meta"]);
        b.record = Some(rec);
        let mut summary = snap.summary.clone();
        summary.time = chrono::Utc::now();
        a.repo.save_snapshot(&summary, &b).unwrap().to_hex()
    };
    let attempts: Vec<(String, &str)> = vec![
        (
            plant(&|m| m["columns"][1]["type_sql"] = "text); DROP TABLE victims; --".into()),
            "not a type name",
        ),
        (
            plant(&|m| {
                m["indexes"] = serde_json::json!([{"name": "x", "unique": false, "method": "btree",
                    "tail": " USING btree (id); DROP TABLE victims"}])
            }),
            "cannot insert multiple commands",
        ),
        (
            plant(&|m| {
                m["constraints"][0]["def"] = "CHECK ((random() >= 0::double precision))".into();
                m["constraints"][0]["kind"] = "c".into();
                m["constraints"][0]["name"] = "sneaky".into();
            }),
            "not immutable",
        ),
    ];
    for (id, why) in attempts {
        let out = t.run(&[
            "restore",
            "table",
            &id,
            "--table",
            "notes",
            "--as",
            "notes_back",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{id}: the planted record was restored"
        );
        assert!(err.contains(why), "{id}: {err}");
        assert_eq!(pg.psql("SELECT count(*) FROM victims"), "1");
        assert_eq!(pg.psql("SELECT to_regclass('notes_back') IS NULL"), "t");
    }
    // The real snapshot still restores.
    let r = t.json(&[
        "restore",
        "table",
        &real_id,
        "--table",
        "notes",
        "--as",
        "notes_back",
    ]);
    assert_eq!(r["tables"][0]["digest_matches"], true);
}

/// PostgreSQL over TLS, verified (Debian's PostgreSQL 15: the embedded 18 is built
/// without SSL): a server that takes only TLS connections on 127.0.0.1
/// (`hostssl`, plain refused), with a certificate a test CA signed. A table export with
/// `sslmode=verify-full` (in the URL, and from PGSSLMODE/PGSSLROOTCERT) and a dump through
/// pg_dump (libpq, handed the same settings) work; another CA's certificate is refused
/// with one clear error, as are a plain connection and sslmode=require (custos verifies).
#[test]
fn postgres_over_tls_is_verified_and_another_ca_refused() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = custos_testkit::tls_files(certs.path(), "pg");
    let (other_ca, _, _) = custos_testkit::tls_files(certs.path(), "other");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    custos_testkit::give_to_postgres(&key);
    let pg = PgCluster::init(
        pg15_bin(),
        &format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nlisten_addresses = '127.0.0.1'\n",
            cert.display(),
            key.display()
        ),
    );
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    pg.start();
    pg.psql("CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 500) g");
    let mut t = T::new();
    let url = |ca: &std::path::Path, mode: &str| {
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?sslmode={mode}&sslrootcert={}",
            pg.port,
            ca.display()
        )
    };
    let r = t.json(&[
        "backup",
        "table",
        "--table",
        "notes",
        "--db-url",
        &url(&ca, "verify-full"),
    ]);
    assert_eq!(r["tables"][0]["rows"], 500, "{r}");
    // The libpq environment, and pg_dump handed the same verification.
    t.set("PGHOST", "127.0.0.1");
    t.set("PGPORT", &pg.port.to_string());
    t.set("PGUSER", "postgres");
    t.set("PGDATABASE", "postgres");
    t.set("PGSSLMODE", "verify-full");
    t.set("PGSSLROOTCERT", ca.to_str().unwrap());
    t.ok(&["backup", "table", "--table", "notes"]);
    let dump_bin = pg15_bin();
    let o = t.run(&["backup", "dump", "--pg-bin", dump_bin.to_str().unwrap()]);
    let dumped = o.status.success();
    let dump_err = String::from_utf8_lossy(&o.stderr).into_owned();
    t.unset("PGSSLMODE");
    t.unset("PGSSLROOTCERT");

    // Refused: another CA's certificate; no TLS (the server says so); require.
    let e = t.fails(
        &[
            "backup",
            "table",
            "--table",
            "notes",
            "--db-url",
            &url(&other_ca, "verify-full"),
        ],
        17,
    );
    assert!(
        e.contains("TLS certificate is not trusted") && e.contains("sslrootcert"),
        "{e}"
    );
    assert_eq!(e.matches("custos: error").count(), 1, "{e}");
    let plain = format!(
        "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port
    );
    let e = t.fails(
        &["backup", "table", "--table", "notes", "--db-url", &plain],
        17,
    );
    assert!(e.contains("no encryption") || e.contains("reject"), "{e}");
    let e = t.fails(
        &[
            "backup",
            "table",
            "--table",
            "notes",
            "--db-url",
            &url(&ca, "require"),
        ],
        2,
    );
    assert!(e.contains("verify-full"), "{e}");
    assert!(dumped, "pg_dump over TLS failed: {dump_err}");
}
