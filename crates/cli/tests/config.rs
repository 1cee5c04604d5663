//! The platform's configuration: environment variables whose secrets never reach the
//! repository (checked on every object's bytes, decrypted too), output, logs or the trail;
//! Terraform state with its serial and lineage; system logs that rotate.

mod common;
use common::attack::Attacker;
use common::*;

const STRIPE: &str = "sk_live_51HxQ2eKZ8vR4mYtN0pLs7WcDa9UfGh3Jk";
const API_TOKEN: &str = "q8Zr3kLmP0xVb7NwT2yHs9DfGj4Ua6Ce1Ko5RiXe";
const DB_PASSWORD: &str = "Tr0ub4dor-and-3";

fn config_with(t: &T, sources: &str) -> String {
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"{}\"\ncache_dir = \"{}\"\n\n{sources}",
            t.repo,
            t.path("cache").display()
        ),
    )
    .unwrap();
    cfg.display().to_string()
}

/// Every byte custos stored, raw and decrypted with the restore key: snapshot summaries
/// and bodies, every blob of every pack, the trail.
fn everything_stored(t: &T) -> Vec<u8> {
    let mut all = vec![];
    for e in walkdir(std::path::Path::new(&t.repo)) {
        all.extend(std::fs::read(e).unwrap());
    }
    let a = Attacker::open(t, PW);
    for s in a.repo.snapshots().unwrap() {
        all.extend(serde_json::to_vec(&s.summary).unwrap());
        all.extend(serde_json::to_vec(&a.repo.snapshot_body(&s.id).unwrap()).unwrap());
    }
    let index = a.repo.load_index().unwrap();
    for (_, blobs) in index.by_pack() {
        for (id, _) in blobs {
            all.extend(a.repo.read_blob(&index, &id).unwrap());
        }
    }
    all.extend(t.ok(&["audit", "log", "--json"]).into_bytes());
    all
}

fn walkdir(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walkdir(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn planted_secrets_never_reach_the_repository_output_or_trail() {
    let mut t = T::new();
    let cfg = config_with(
        &t,
        "[[source]]\nname = \"platform-env\"\nkind = \"env\"\nallow = [\"APP_*\", \"STRIPE_*\", \"API_TOKEN\", \"DATABASE_URL\", \"PUBLIC_URL\"]\n\
         secrets_ref = \"aws-secretsmanager:prod/healthcare\"\nlist_command = \"printf 'prod/stripe\\nprod/db\\n'\"\n",
    );
    t.set("CUSTOS_CONFIG", &cfg);
    t.set("STRIPE_SECRET_KEY", STRIPE);
    t.set("API_TOKEN", API_TOKEN);
    t.set(
        "DATABASE_URL",
        &format!("postgresql://app:{DB_PASSWORD}@db.internal:5432/clinical"),
    );
    t.set("APP_MODE", "production");
    t.set("APP_REGION", "eu-central-1");
    t.set("PUBLIC_URL", "https://care.example.org/app");
    t.set("UNLISTED", "not taken");

    let mut outputs = vec![];
    for args in [
        vec!["-vv", "backup", "config"],
        vec!["backup", "config", "--json"],
        vec!["snapshots", "--json"],
        vec!["snapshots"],
        vec!["-vv", "backup", "all"],
    ] {
        let o = t.run(&args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        outputs.extend(o.stdout);
        outputs.extend(o.stderr);
    }
    let text = String::from_utf8_lossy(&outputs).into_owned();
    assert!(text.contains("3 secrets kept as references only"), "{text}");
    assert!(
        text.contains("API_TOKEN, DATABASE_URL, STRIPE_SECRET_KEY"),
        "{text}"
    );

    let env_file = t.path("restored.env");
    t.ok(&[
        "restore",
        "env",
        "latest",
        "--to",
        env_file.to_str().unwrap(),
    ]);
    let restored = std::fs::read_to_string(&env_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(restored.contains("APP_MODE=production\n"), "{restored}");
    assert!(
        restored.contains("PUBLIC_URL=https://care.example.org/app\n"),
        "{restored}"
    );
    assert!(
        restored.contains("# STRIPE_SECRET_KEY: secret")
            && restored.contains("aws-secretsmanager:prod/healthcare#STRIPE_SECRET_KEY"),
        "{restored}"
    );
    assert!(restored.contains("prod/stripe, prod/db"), "{restored}");
    assert!(!restored.contains("UNLISTED"), "{restored}");

    let stored = everything_stored(&t);
    for secret in [STRIPE, API_TOKEN, DB_PASSWORD] {
        assert!(
            !contains(&stored, secret),
            "a secret reached the repository"
        );
        assert!(!contains(&outputs, secret), "a secret reached the output");
        assert!(!restored.contains(secret), "a secret reached the env file");
    }
    // What was stored of the plain values is there (the scan can find things).
    assert!(contains(&stored, "eu-central-1"));

    // A changed secret shows as a changed fingerprint, without the value.
    let fp = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("# API_TOKEN"))
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    t.set("API_TOKEN", "Zq9Xr2mLk4Pb8NvT1wHy7DsG3jUa5CeK0oR6iEx");
    t.ok(&["backup", "config"]);
    let again = t.path("again.env");
    t.ok(&["restore", "env", "latest", "--to", again.to_str().unwrap()]);
    assert_ne!(fp(&restored), fp(&std::fs::read_to_string(&again).unwrap()));

    // A name forced plain whose value looks secret: refused, naming the variable only,
    // and nothing written.
    let cfg = config_with(
        &t,
        "[[source]]\nname = \"platform-env\"\nkind = \"env\"\nallow = [\"API_TOKEN\"]\nplain = [\"API_TOKEN\"]\n",
    );
    t.set("CUSTOS_CONFIG", &cfg);
    let before = t.repo_state();
    let err = t.fails(&["backup", "config"], 2);
    assert!(err.contains("`API_TOKEN` is listed as plain"), "{err}");
    assert!(!err.contains("Zq9Xr2"), "{err}");
    assert_eq!(t.repo_state(), before);
}

#[test]
fn terraform_state_serial_and_lineage_are_recorded_and_a_step_back_warned() {
    let mut t = T::new();
    let infra = t.path("infra");
    std::fs::create_dir_all(&infra).unwrap();
    std::fs::write(
        infra.join("main.tf"),
        "resource \"aws_s3_bucket\" \"docs\" {}\n",
    )
    .unwrap();
    // The command is the interface: a stand-in `terraform` that serves a state file.
    let bin = t.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("terraform");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n[ \"$1 $2\" = \"state pull\" ] || exit 2\ncat {}\n",
            t.path("state.json").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let state_file = t.path("state.json");
    let state = |serial: u64, lineage: &str| {
        std::fs::write(
            &state_file,
            format!("{{\"version\": 4, \"terraform_version\": \"1.9.8\", \"serial\": {serial}, \"lineage\": \"{lineage}\", \"resources\": [{{\"type\": \"aws_s3_bucket\"}}]}}"),
        )
        .unwrap();
    };
    let cfg = config_with(
        &t,
        &format!(
            "[[source]]\nname = \"terraform-prod\"\nkind = \"terraform\"\ndir = \"{}\"\n",
            infra.display()
        ),
    );
    t.set("CUSTOS_CONFIG", &cfg);
    t.set(
        "PATH",
        &format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
    );

    state(41, "6f1c-aa");
    let out = t.run(&["backup", "config"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("state serial 41, lineage 6f1c-aa, Terraform 1.9.8"));
    assert!(
        String::from_utf8_lossy(&out.stderr).is_empty()
            || !String::from_utf8_lossy(&out.stderr).contains("warning")
    );

    state(40, "6f1c-aa");
    let out = t.run(&["backup", "config"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("serial went backwards, from 41 to 40"),
        "{err}"
    );

    state(1, "99ee-bb");
    let err = String::from_utf8_lossy(&t.run(&["backup", "config"]).stderr).into_owned();
    assert!(
        err.contains("lineage changed from 6f1c-aa to 99ee-bb"),
        "{err}"
    );

    let list = t.ok(&["snapshots"]);
    assert!(
        list.contains("serial 41") && list.contains("lineage 6f1c-aa"),
        "{list}"
    );
    let v = t.json(&["snapshots"]);
    let tf: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["summary"]["kind"] == "terraform")
        .collect();
    assert_eq!(tf.len(), 3);
    assert_eq!(tf[1]["summary"]["facts"]["serial"], 40);

    // The state and the configuration restore as files.
    let first = tf[0]["id"].as_str().unwrap();
    let to = t.path("restored");
    t.ok(&["restore", "files", first, "--to", to.to_str().unwrap()]);
    let pulled: serde_json::Value =
        serde_json::from_slice(&std::fs::read(to.join("terraform.tfstate")).unwrap()).unwrap();
    assert_eq!(pulled["serial"], 41);
    assert!(to.join("infra/main.tf").is_file());

    // A command that fails records nothing.
    std::fs::remove_file(t.path("state.json")).unwrap();
    let before = t.repo_state();
    t.fails(&["backup", "config"], 17);
    assert_eq!(t.repo_state(), before);
}

#[test]
fn rotated_logs_are_not_stored_twice_and_a_growing_log_stores_its_tail() {
    let mut t = T::new();
    let logs = t.path("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut line_no = 0;
    let mut lines = |n: usize| {
        let mut s = String::new();
        for _ in 0..n {
            line_no += 1;
            s.push_str(&format!(
                "2026-12-04T02:{:02}:{:02}Z host=db-1 level=info msg=\"checkpoint complete\" seq={line_no} wrote={} buffers\n",
                line_no / 60 % 60,
                line_no % 60,
                line_no * 7919 % 100_000
            ));
        }
        s
    };
    std::fs::write(logs.join("app.log"), lines(200_000)).unwrap();
    let cfg = config_with(
        &t,
        &format!(
            "[[source]]\nname = \"system-logs\"\nkind = \"logs\"\npaths = [\"{}\"]\n",
            logs.display()
        ),
    );
    t.set("CUSTOS_CONFIG", &cfg);
    let first = t.json(&["backup", "config"]);
    let full = first[0]["stats"]["bytes_stored"].as_u64().unwrap();

    // Rotation: app.log becomes app.log.1, a new app.log starts.
    std::fs::rename(logs.join("app.log"), logs.join("app.log.1")).unwrap();
    std::fs::write(logs.join("app.log"), lines(100)).unwrap();
    let rotated = t.json(&["backup", "config"]);
    let added = rotated[0]["stats"]["bytes_stored"].as_u64().unwrap();
    assert!(
        added * 20 < full,
        "a renamed log was stored again: {added} of {full}"
    );

    // Growth: only the new tail.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(logs.join("app.log.1"))
        .unwrap();
    use std::io::Write;
    f.write_all(lines(500).as_bytes()).unwrap();
    drop(f);
    let grown = t.json(&["backup", "config"]);
    // New data: the tail, and the one chunk (8 MiB at most) the old end shared with it.
    let tail = 500 * 110;
    let new = grown[0]["stats"]["bytes_new"].as_u64().unwrap();
    let size = std::fs::metadata(logs.join("app.log.1")).unwrap().len();
    assert!(size > 16 << 20, "{size}");
    assert!(
        new <= tail + (8 << 20),
        "a grown log of {size} bytes stored {new} new bytes"
    );
    let to = t.path("back");
    let id = grown[0]["snapshot"].as_str().unwrap();
    t.ok(&["restore", "files", id, "--to", to.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(to.join("app.log.1")).unwrap(),
        std::fs::read(logs.join("app.log.1")).unwrap()
    );
}

#[test]
fn the_healthcare_profile_holds_the_seed_matrix_and_bad_jobs_are_named() {
    let mut t = T::bare();
    let cfg = t.path("custos.toml");
    let p = cfg.to_str().unwrap().to_string();
    t.ok(&["config", "init", "--profile", "healthcare", "--to", &p]);
    // Not over an existing file.
    t.fails(
        &["config", "init", "--profile", "healthcare", "--to", &p],
        2,
    );
    t.set("CUSTOS_CONFIG", &p);
    let v = t.json(&["config", "check"]);
    let jobs = v["jobs"].as_array().unwrap();
    let sched = |name: &str| {
        jobs.iter()
            .find(|j| j["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {v}"))["schedule"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The seed: incrementals hourly at :00, fulls daily at 02:00 UTC, vector store and
    // files and audit logs hourly, configuration and system logs daily.
    assert_eq!(sched("db-incremental"), "0 * * * *");
    assert_eq!(sched("db-full"), "0 2 * * *");
    for hourly in [
        "vector-store-hourly",
        "documents-hourly",
        "audit-log-hourly",
    ] {
        assert!(sched(hourly).ends_with(" * * * *"), "{hourly}");
    }
    assert!(jobs.iter().all(|j| j["next"].is_string()), "{v}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    for line in [
        "keep_daily = 30",
        "keep_weekly = 12",
        "keep_monthly = 12",
        "keep_yearly = 7",
        "min_retention = \"6y\"",
        "[retention_incremental]",
        "keep_within = \"7d\"",
        "wal_lag_alert = \"15m\"",
    ] {
        assert!(text.contains(line), "{line}");
    }

    // A bad schedule, a job that runs nothing known, a bad timeout: each named.
    for (bad, expect) in [
        (
            "schedule = \"0 25 * * *\"",
            "`0 25 * * *` is not a cron expression",
        ),
        (
            "run = \"no-such-source\"",
            "names neither a [[source]] nor an action",
        ),
        ("timeout = \"soon\"", "timeout = \"soon\""),
    ] {
        let key = bad.split(" = ").next().unwrap();
        let broken = text.replacen(
            &text[text.find("name = \"db-full\"").unwrap()..]
                .lines()
                .find(|l| l.starts_with(key))
                .unwrap()
                .to_string(),
            bad,
            1,
        );
        std::fs::write(t.path("broken.toml"), broken).unwrap();
        t.set("CUSTOS_CONFIG", t.path("broken.toml").to_str().unwrap());
        let err = t.fails(&["config", "check"], 2);
        assert!(
            err.contains("job `db-full`") && err.contains(expect),
            "{bad}: {err}"
        );
    }
}
