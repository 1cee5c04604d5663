//! `custos drill db` on a real PostgreSQL 18 cluster under pgbench load: the backup is
//! restored into a scratch cluster custos starts and removes, proven (recovery, pg_amcheck,
//! smoke checks), timed (RTO per phase, RPO) and recorded; a passed drill counts as proof
//! for the retention interlock; a damaged pack fails the drill and names the pack.

mod common;
use common::*;

use custos_testkit::{pg18_bin, PgCluster};

/// A PostgreSQL 18 cluster archiving through custos into a repository whose custos.toml
/// holds `[drill]` (a scratch folder, the binaries, and `checks`): the repository's T,
/// the backup key's (its PGHOST/PGPORT set), the restore key's reading that custos.toml,
/// the cluster, the scratch folder, the config's path.
struct Setup {
    t: T,
    backup: T,
    restorer: T,
    pg: PgCluster,
    scratch: std::path::PathBuf,
    cfg: std::path::PathBuf,
    /// The cluster as initdb made it, when `pg` runs it from a configuration folder.
    _made: Option<PgCluster>,
}

fn setup(checks: &str) -> Setup {
    setup_with(checks, "", false)
}

/// `setup`, with more server settings, and the configuration outside the data
/// directory (Debian's layout) when `outside`.
fn setup_with(checks: &str, more_conf: &str, outside: bool) -> Setup {
    let (t, cbin, cfg) = pg_repo();
    let (mut backup, restorer, _out) = pg_roles(&t, &cfg);
    let bin = pg18_bin();
    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\nwal_level = replica\n\
         track_commit_timestamp = on\nmax_connections = 40\narchive_timeout = 1\n{more_conf}",
        cbin.display(),
        cfg.display()
    );
    let made = PgCluster::init(bin.clone(), &conf);
    let (pg, made) = if outside {
        (configured_outside(&made).0, Some(made))
    } else {
        (made, None)
    };
    pg.start();
    backup.set("PGHOST", pg.dir.to_str().unwrap());
    backup.set("PGPORT", &pg.port.to_string());
    let scratch = t.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    custos_testkit::give_to_postgres(&scratch);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[drill]\nscratch = \"{}\"\nbin = \"{}\"\n{checks}",
        scratch.display(),
        bin.display()
    ));
    std::fs::write(&cfg, text).unwrap();
    let mut r = restorer.with_password("unused");
    r.envs = restorer.envs.clone();
    r.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    r.run_as = Some("postgres".into());
    Setup {
        t,
        backup,
        restorer: r,
        pg,
        scratch,
        cfg,
        _made: made,
    }
}

#[test]
fn a_db_drill_restores_proves_times_and_records_and_a_damaged_pack_fails_it() {
    // The drill's smoke checks.
    let Setup {
        t,
        backup,
        restorer: drill,
        pg,
        scratch,
        cfg,
        ..
    } = setup(
        "[[drill.check]]\nname = \"the ledger has rows\"\nsql = \"SELECT count(*) > 0 FROM ledger\"\nexpect = \"t\"\n\
         [[drill.check]]\nname = \"pgbench's accounts are whole\"\nsql = \"SELECT count(*) FROM pgbench_accounts\"\nexpect = \"300000\"\n",
    );
    let mut load = start_ledger_load(&t, &pg, 3, 150, 12);
    sleep_ms(1500);
    let full = backup.json(&["backup", "postgres", "--type", "full"]);
    let full_id = full["snapshot"].as_str().unwrap().to_string();
    sleep_ms(3000);

    let r = drill.json(&["drill", "db"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["snapshot"], full_id.as_str());
    let phases: Vec<&str> = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["restore files", "start and recover", "checks"],
        "{r}"
    );
    for p in r["phases"].as_array().unwrap() {
        assert!(p["seconds"].as_f64().unwrap() > 0.0, "{r}");
    }
    let rto = r["rto_seconds"].as_f64().unwrap();
    let sum: f64 = r["phases"].as_array().unwrap()[..2]
        .iter()
        .map(|p| p["seconds"].as_f64().unwrap())
        .sum();
    assert!(rto >= sum * 0.99, "RTO {rto} < restore + recovery {sum}");
    // The archive was seconds behind the load (archive_timeout = 1): so is the copy.
    let rpo = r["rpo_seconds"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&rpo), "RPO {rpo}: {r}");
    let checks = r["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 3, "{r}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{r}");
    assert!(checks
        .iter()
        .any(|c| c["name"] == "pg_amcheck --heapallindexed"));
    // The scratch folder is gone, and no server runs from it.
    assert!(
        std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "scratch left behind"
    );

    // --preview writes nothing and estimates the next restore's RTO from what this drill
    // measured (how close it comes is measured in bench/, not asserted on a noisy machine).
    let p = drill.json(&["restore", "postgres", "--preview"]);
    assert_eq!(p["preview"]["snapshot"], full_id.as_str(), "{p}");
    assert!(p["preview"]["bytes"].as_u64().unwrap() > 0);
    assert!(p["preview"]["wal_files"].as_u64().unwrap() >= 1, "{p}");
    let phase = |n: &str| {
        r["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()["seconds"]
            .as_f64()
            .unwrap()
    };
    let bps = r["bytes"].as_f64().unwrap() / phase("restore files");
    let per_wal = phase("start and recover") / r["wal_files"].as_f64().unwrap().max(1.0);
    let want = p["preview"]["bytes"].as_f64().unwrap() / bps
        + p["preview"]["wal_files"].as_f64().unwrap() * per_wal;
    let got = p["rto_estimate_seconds"].as_f64().expect("an estimate");
    assert!(
        (got - want).abs() < 1e-6 * want.max(1.0),
        "{got} vs {want}: {p}"
    );
    assert!(std::fs::read_dir(&scratch).unwrap().next().is_none());

    // A failing smoke check fails the drill (exit 20) and says which.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("expect = \"300000\"", "expect = \"1\"")).unwrap();
    let e = drill.fails(&["drill", "db"], 20);
    assert!(
        e.contains("pgbench's accounts are whole") && e.contains("expected"),
        "{e}"
    );
    std::fs::write(&cfg, text).unwrap();

    let list = drill.json(&["drill", "list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["drill"]["ok"], true);
    assert_eq!(list[1]["drill"]["ok"], false);
    assert!(list[0]["drill"]["verified"][0] == full_id.as_str());

    assert!(load.wait().unwrap().success());
    // One damaged pack: the drill fails and names it; nothing is left in the scratch folder.
    let packs = t.packs();
    let victim = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(victim).unwrap().len() as usize;
    flip_byte(victim, len / 2);
    let o = drill.run(&["drill", "db"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains(&name[..8]),
        "the damaged pack is not named: {err}"
    );
    assert!(
        std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "scratch left behind"
    );
    pg.stop();
}

/// A files drill restores into a scratch folder, counts what landed, removes it; `drill
/// full` runs every drill there is something for; a damaged pack fails it with the pack
/// named, and the failure is recorded.
#[test]
fn a_files_drill_and_a_full_drill_prove_files_and_name_a_damaged_pack() {
    let mut t = T::new();
    let src = t.path("src");
    make_tree(&src, 21, 40, 200_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let scratch = t.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let r = t.json(&["drill", "files", "--scratch", scratch.to_str().unwrap()]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["kind"], "files");
    assert!(
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ok"] == true),
        "{r}"
    );
    assert!(r["rto_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "scratch left behind"
    );

    t.set("TMPDIR", scratch.to_str().unwrap());
    let f = t.json(&["drill", "full"]);
    assert_eq!(f["ok"], true, "{f}");
    let parts: Vec<&str> = f["parts"].as_array().map_or_else(
        || vec![f["kind"].as_str().unwrap()],
        |p| p.iter().map(|x| x["kind"].as_str().unwrap()).collect(),
    );
    assert_eq!(parts, ["files"], "{f}");

    let victim = t
        .packs()
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(&victim).unwrap().len() as usize;
    flip_byte(&victim, len / 3);
    let o = t.run(&["drill", "files", "--scratch", scratch.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains(&name[..12]),
        "the damaged pack is not named: {err}"
    );
    assert!(
        std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "scratch left behind"
    );
    let list = t.json(&["drill", "list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(
        list[2]["result"].as_str().map(|r| r != "ok"),
        Some(true),
        "{list:?}"
    );
}

/// "One patient's records were deleted at 3 a.m.": the table as it was a moment before,
/// recovered in a scratch cluster and copied beside the live one under a new name, exact
/// to the commit; a name that is taken or not a plain name is refused before anything.
#[test]
fn extract_table_brings_back_the_rows_as_they_were_beside_the_live_table() {
    // `_t` holds the repository's folder until the test ends.
    let Setup {
        t: _t,
        backup,
        restorer: r,
        pg,
        scratch,
        ..
    } = setup("");
    pg.psql(
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, patient int NOT NULL, note text NOT NULL)",
    );
    pg.psql("INSERT INTO ledger (patient, note) SELECT g % 50, 'visit ' || g FROM generate_series(1, 2000) g");
    backup.json(&["backup", "postgres", "--type", "full"]);
    pg.psql("INSERT INTO ledger (patient, note) SELECT g % 50, 'later visit ' || g FROM generate_series(1, 300) g");
    sleep_ms(1200);
    let before = pg.psql("SELECT clock_timestamp()");
    sleep_ms(1200);
    let digest =
        "SELECT count(*) || ' ' || md5(coalesce(string_agg(id::text, ',' ORDER BY id), ''))";
    let want = pg.psql(&format!(
        "{digest} FROM ledger WHERE pg_xact_commit_timestamp(xmin) <= '{before}'"
    ));
    // The accident: one patient's records deleted.
    pg.psql("DELETE FROM ledger WHERE patient = 7");
    pg.psql("SELECT pg_switch_wal()");
    sleep_ms(2500);
    let live_want = pg.psql("SELECT count(*) FROM ledger");

    let into = format!(
        "host={} port={} dbname=postgres user=postgres",
        pg.dir.display(),
        pg.port
    );
    // Refused before anything: a name that is not a plain name, a name that is taken.
    let e = r.fails(
        &[
            "restore",
            "postgres",
            "--target-time",
            &before,
            "--extract-table",
            "ledger",
            "--into",
            &into,
            "--as",
            "x; DROP TABLE ledger",
        ],
        2,
    );
    assert!(e.contains("not a table name"), "{e}");
    let e = r.fails(
        &[
            "restore",
            "postgres",
            "--target-time",
            &before,
            "--extract-table",
            "ledger",
            "--into",
            &into,
            "--as",
            "ledger",
        ],
        2,
    );
    assert!(
        e.contains("already exists") && e.contains("nothing was written"),
        "{e}"
    );
    assert!(
        std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "scratch left behind"
    );

    let out = r.json(&[
        "restore",
        "postgres",
        "--target-time",
        &before,
        "--extract-table",
        "ledger",
        "--into",
        &into,
        "--as",
        "ledger_before_accident",
    ]);
    assert_eq!(
        out["tables"][0]["restored_as"], "public.ledger_before_accident",
        "{out}"
    );
    let got = pg.psql(&format!("{digest} FROM ledger_before_accident"));
    assert_eq!(
        got, want,
        "the extracted rows are not those committed by the target"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM ledger_before_accident WHERE patient = 7"),
        "46"
    );
    // The live table is untouched; the deleted rows can be put back from the copy.
    assert_eq!(pg.psql("SELECT count(*) FROM ledger"), live_want);
    pg.psql("INSERT INTO ledger SELECT * FROM ledger_before_accident WHERE patient = 7");
    assert_eq!(
        pg.psql("SELECT count(*) FROM ledger WHERE patient = 7"),
        "46"
    );
    assert!(
        std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "scratch left behind"
    );
    pg.stop();
}

/// `restore all --point` on a point of `backup all` that holds the database (its WAL
/// position), a pgvector table export, documents and Terraform state: the database comes
/// back replayed to the point (the ledger and the embeddings as they were, nothing
/// written after), the documents by hash, the state's serial; the hooks ran in order.
#[test]
fn restore_all_brings_back_the_database_vectors_files_and_state_of_a_point() {
    let Setup {
        t,
        backup,
        restorer,
        pg,
        cfg,
        ..
    } = setup("");
    pg.psql(
        "CREATE EXTENSION vector; CREATE TABLE embeddings (id int PRIMARY KEY, v vector(8)); \
         INSERT INTO embeddings SELECT g, ('[' || array_to_string(ARRAY(SELECT ((g * 7 + k) % 97)::float4 / 97 FROM generate_series(1, 8) k), ',') || ']')::vector FROM generate_series(1, 400) g",
    );
    let docs = t.path("documents");
    make_tree(&docs, 4, 10, 30_000);
    let state = t.path("terraform.tfstate");
    std::fs::write(&state, r#"{"version": 4, "serial": 41}"#).unwrap();
    custos_testkit::give_to_postgres(&docs);
    custos_testkit::give_to_postgres(&state);
    let out = t.path("restores");
    let log = out.join("hooks.log");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[postgres]\nhost = \"{sock}\"\nport = {port}\nuser = \"postgres\"\n\
         [[source]]\nname = \"documents\"\nkind = \"files\"\npaths = [\"{docs}\"]\n\
         [[source]]\nname = \"embeddings\"\nkind = \"table\"\ntables = [\"embeddings\"]\n\
         [[source]]\nname = \"terraform-state\"\nkind = \"stream\"\ncommand = \"cat {state}\"\n\
         [restore_all]\npre = [\"echo stop-app $CUSTOS_POINT >> {log}\"]\npost = [\"echo start-app >> {log}\"]\n",
        sock = pg.dir.display(),
        port = pg.port,
        docs = docs.display(),
        state = state.display(),
        log = log.display(),
    ));
    std::fs::write(&cfg, text).unwrap();

    let mut load = start_ledger_load(&t, &pg, 2, 150, 6);
    sleep_ms(1000);
    backup.json(&["backup", "postgres", "--type", "full"]);
    assert!(load.wait().unwrap().success(), "pgbench failed");
    let b = backup.json(&["backup", "all"]);
    let point = b["point"]["id"].as_str().unwrap().to_string();
    assert!(b["point"]["database"]["lsn"].is_string(), "{b}");
    let ledger = pg.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM ledger");
    let digest = "SELECT md5(string_agg(id || ':' || v::text, ',' ORDER BY id)) FROM embeddings";
    let vectors = pg.psql(digest);
    let want_docs = describe(&docs);
    // A row after the point, then a time T, then more rows, changed vectors, documents
    // and state; all archived.
    pg.psql("INSERT INTO ledger (note) VALUES ('between the point and T')");
    let ledger_at_t =
        pg.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM ledger");
    assert_ne!(ledger_at_t, ledger);
    sleep_ms(1100);
    let at_t = chrono::Utc::now().to_rfc3339();
    sleep_ms(1100);
    pg.psql("INSERT INTO ledger (note) VALUES ('after the point'); UPDATE embeddings SET v = '[1,1,1,1,1,1,1,1]' WHERE id <= 50");
    std::fs::write(docs.join("later.txt"), "after the point").unwrap();
    std::fs::write(&state, r#"{"version": 4, "serial": 42}"#).unwrap();
    pg.switch_and_archive();
    assert_ne!(pg.psql(digest), vectors);

    let all = out.join("all");
    // The source still runs here: the restored database gets a port of its own.
    let port = custos_testkit::free_port();
    let r = restorer.json(&[
        "restore",
        "all",
        "--point",
        &point[..8],
        "--to",
        all.to_str().unwrap(),
        "--port",
        &port.to_string(),
    ]);
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(steps[0].starts_with("pre-hook"), "{steps:?}");
    assert!(
        steps.iter().any(|s| s.starts_with("database to WAL")),
        "{steps:?}"
    );
    assert!(steps.last().unwrap().starts_with("post-hook"), "{steps:?}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("stop-app {point}\nstart-app\n")
    );
    assert_eq!(describe(&all.join("documents")), want_docs);
    assert_eq!(
        std::fs::read_to_string(all.join("terraform-state")).unwrap(),
        r#"{"version": 4, "serial": 41}"#
    );
    // The database, started, replays to the point: exactly the rows and vectors then.
    let got = start_and_read(&pg.bin, &all.join("postgres"), port, &pg.dir);
    assert_eq!(got, ledger, "the ledger differs from the point's");
    let c = PgCluster::existing(pg.bin.clone(), all.join("postgres"), port, pg.dir.clone());
    let (ok, text) = c.try_start(&all.join("postgres-2.log"));
    assert!(ok, "{text}");
    assert_eq!(
        c.psql(digest),
        vectors,
        "the embeddings differ from the point's"
    );
    c.stop();

    // At a time: the files of the newest point before it, the database at the time itself.
    let before = restorer.fails(
        &[
            "restore",
            "all",
            "--target-time",
            "2020-01-01 00:00:00+00",
            "--to",
            out.join("none").to_str().unwrap(),
        ],
        16,
    );
    assert!(
        before.contains("no recovery point was taken at or before"),
        "{before}"
    );
    assert!(
        !out.join("none").exists(),
        "a refused restore wrote its folder"
    );
    let at = out.join("at-time");
    let r = restorer.json(&[
        "restore",
        "all",
        "--target-time",
        &at_t,
        "--to",
        at.to_str().unwrap(),
        "--port",
        &port.to_string(),
    ]);
    assert_eq!(r["point"].as_str(), Some(point.as_str()), "{r}");
    assert_eq!(describe(&at.join("documents")), want_docs);
    assert_eq!(
        std::fs::read_to_string(at.join("terraform-state")).unwrap(),
        r#"{"version": 4, "serial": 41}"#
    );
    let got = start_and_read(&pg.bin, &at.join("postgres"), port, &pg.dir);
    assert_eq!(got, ledger_at_t, "the ledger differs from the one at T");
}

/// The seed's weekly drill of a cluster installed as Debian installs it: its
/// configuration (and the larger max_connections in it) outside the data directory, so
/// the backup holds none. The drill's scratch copy still starts, recovers and passes.
#[test]
fn a_db_drill_of_a_cluster_configured_outside_its_data_directory() {
    let Setup {
        backup,
        restorer: drill,
        pg,
        scratch,
        t: _t,
        _made,
        ..
    } = setup_with(
        "[[drill.check]]\nname = \"the ledger has rows\"\nsql = \"SELECT count(*) FROM ledger\"\nexpect = \"500\"\n",
        "max_connections = 150\nmax_worker_processes = 12\n",
        true,
    );
    assert_eq!(pg.psql("SHOW max_connections"), "150");
    pg.psql("CREATE TABLE ledger (id int PRIMARY KEY); INSERT INTO ledger SELECT generate_series(1, 500)");
    backup.json(&["backup", "postgres", "--type", "full"]);
    pg.switch_and_archive();
    let r = drill.json(&["drill", "db"]);
    assert_eq!(r["ok"], true, "{r}");
    let checks = r["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["ok"] == true), "{r}");
    assert!(
        checks.iter().any(|c| c["name"] == "the ledger has rows"),
        "{r}"
    );
    assert!(std::fs::read_dir(&scratch).unwrap().next().is_none());
}
