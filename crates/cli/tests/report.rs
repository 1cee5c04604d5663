//! The auditor's report: counts that match what happened in the period, a self-contained
//! HTML page rendered by headless Chromium with every section, a PDF whose pages render,
//! and `report verify` that accepts the issued file and refuses an edited copy.

mod common;
use common::*;
use std::path::PathBuf;

fn chromium(url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--window-size=1200,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium (scripts/setup.sh installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_report_counts_the_period_renders_in_chromium_prints_and_detects_an_edit() {
    let mut t = T::new();
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"{}\"\n[retention]\nkeep_daily = 7\nkeep_monthly = 12\n\
             [[job]]\nname = \"documents-hourly\"\nrun = \"verify\"\nschedule = \"0 * * * *\"\n",
            t.repo
        ),
    )
    .unwrap();
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    let src = t.path("src");
    make_tree(&src, 3, 20, 50_000);
    for i in 0..3 {
        std::fs::write(src.join(format!("new-{i}.txt")), format!("note {i}")).unwrap();
        t.ok(&["backup", "files", src.to_str().unwrap()]);
    }
    t.ok(&["verify", "--read-data"]);
    // A failure, then the success that resolves it.
    let o = t.run(&[
        "restore",
        "files",
        "no-such-snapshot",
        "--to",
        t.path("x").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    t.restore_latest("restored");
    let scratch = t.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    t.ok(&["drill", "files", "--scratch", scratch.to_str().unwrap()]);
    t.ok(&["drill", "files", "--scratch", scratch.to_str().unwrap()]);

    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::days(1))
        .format("%Y-%m-%dT%H:00:00Z")
        .to_string();
    let to = (now + chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:00:00Z")
        .to_string();
    let j = t.ok(&["report", "--from", &from, "--to", &to, "--format", "json"]);
    let r: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(r["backups"]["backup files"][0], 3, "{r}");
    assert_eq!(r["backups"]["backup files"][1], 0);
    assert_eq!(r["verifies"].as_array().unwrap().len(), 1);
    assert_eq!(r["verifies"][0]["ok"], true);
    let drills = r["drills"].as_array().unwrap();
    assert_eq!(drills.len(), 2);
    assert!(drills
        .iter()
        .all(|d| d["ok"] == true && d["rto_seconds"].as_f64().unwrap() > 0.0));
    // The hourly job was due at every hour from this hour yesterday to this hour today,
    // 25 times, and never ran (no agent here).
    assert_eq!(r["jobs"][0]["job"], "documents-hourly");
    assert_eq!(r["jobs"][0]["due"], 25, "{r}");
    assert_eq!(r["jobs"][0]["ok"], 0);
    let fails = r["failures"].as_array().unwrap();
    assert_eq!(fails.len(), 1, "{r}");
    assert_eq!(fails[0]["command"], "restore files");
    assert!(fails[0]["resolved_at"].is_string(), "{r}");
    assert_eq!(r["trail"]["intact"], true);
    assert!(r["trail"]["first_hash"].as_str().unwrap().len() == 64);
    assert!(r["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["role"] == "restore"));
    assert!(r["kept_by_rule"]["daily"].as_u64().unwrap() >= 1, "{r}");
    // Nothing from inside a backup: no file name, no content.
    assert!(!j.contains("new-0.txt") && !j.contains("note 0"), "{j}");

    // HTML: self-contained, every section, rendered by Chromium; a screenshot is kept.
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report");
    std::fs::create_dir_all(&out).unwrap();
    let html = out.join("report.html");
    t.ok(&[
        "report",
        "--from",
        &from,
        "--to",
        &to,
        "--out",
        html.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&html).unwrap();
    assert!(
        !text.contains("<script") && !text.contains("http://") && !text.contains("https://"),
        "not self-contained"
    );
    let url = format!("file://{}", html.display());
    let dom = chromium(&url, &["--dump-dom"]);
    for id in [
        "summary",
        "schedule",
        "encryption",
        "verification",
        "retention",
        "secondary",
        "trail",
        "failures",
        "rto-chart",
        "rpo-chart",
    ] {
        assert!(
            dom.contains(&format!("id=\"{id}\"")),
            "section {id} missing:\n{dom}"
        );
    }
    assert!(dom.contains("<polyline") && dom.contains("data-job=\"documents-hourly\""));
    let shot = out.join("report.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&url, &[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 30_000,
        "screenshot {}",
        shot.display()
    );

    // PDF: its pages render.
    let pdf = out.join("report.pdf");
    t.ok(&[
        "report",
        "--from",
        &from,
        "--to",
        &to,
        "--format",
        "pdf",
        "--out",
        pdf.to_str().unwrap(),
    ]);
    let pages = out.join("page");
    let o = std::process::Command::new("pdftoppm")
        .args(["-png", "-r", "40"])
        .arg(&pdf)
        .arg(&pages)
        .output()
        .expect("pdftoppm (poppler-utils; scripts/setup.sh installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rendered = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("page"))
        .count();
    assert!(rendered >= 1, "no page rendered");

    // report verify: the issued files pass, an edited copy does not.
    for f in [&html, &pdf] {
        let v = t.ok(&["report", "verify", f.to_str().unwrap()]);
        assert!(
            v.contains("issued by custos") && v.contains("unchanged"),
            "{v}"
        );
    }
    let edited = out.join("edited.html");
    std::fs::write(&edited, text.replacen("failed", "passed", 1)).unwrap();
    let e = t.fails(&["report", "verify", edited.to_str().unwrap()], 14);
    assert!(e.contains("no report with this content"), "{e}");
}

/// A month of the agent on its test clock (`CUSTOS_TEST_CLOCK`): every command it starts
/// lives at its job's slot (`CUSTOS_TEST_NOW`), so the trail holds a month of dated
/// records, and the report for that month counts them: each job's due runs against what
/// ran, the backups, verifies and drills, and the failures of a job that never worked.
#[test]
fn the_report_for_a_simulated_month_counts_what_the_agent_ran() {
    let mut t = T::bare();
    let docs = t.path("documents");
    make_tree(&docs, 5, 6, 20_000);
    let state = t.path("agent-state");
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[repository]
url = "{repo}"
[retention]
keep_daily = 30
[agent]
state_dir = "{state}"
probe_interval = "24h"
repository_interval = "24h"
[drill]
scratch = "{scratch}"
[[source]]
name = "documents"
kind = "files"
paths = ["{docs}"]
[[source]]
name = "scans"
kind = "files"
paths = ["{missing}"]
[[job]]
name = "documents-daily"
run = "documents"
schedule = "0 2 * * *"
[[job]]
name = "verify-weekly"
run = "verify"
schedule = "0 5 * * SUN"
[[job]]
name = "drill-weekly"
run = "drill-files"
schedule = "0 6 * * MON"
[[job]]
name = "scans-weekly"
run = "scans"
schedule = "0 4 * * WED"
retries = 0
"#,
            repo = t.repo,
            state = state.display(),
            scratch = t.path("scratch").display(),
            docs = docs.display(),
            missing = t.path("no-such-folder").display(),
        ),
    )
    .unwrap();
    std::fs::create_dir_all(t.path("scratch")).unwrap();
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    t.unset("CUSTOS_REPO");
    // The repository is made at the start of the simulated month.
    let mut then = t.with_password(PW);
    then.set("CUSTOS_TEST_NOW", "2026-10-31T23:00:00Z");
    then.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    let o = t
        .command(&["agent", "--listen", "127.0.0.1:0"])
        .env(
            "CUSTOS_TEST_CLOCK",
            "2026-10-31T23:59:00Z..2026-11-30T23:59:00Z",
        )
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the simulated agent failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let j = t.ok(&[
        "report",
        "--from",
        "2026-11-01T00:00:00Z",
        "--to",
        "2026-12-01T00:00:00Z",
        "--format",
        "json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&j).unwrap();
    // November 2026: 30 days, 5 Sundays, 5 Mondays, 4 Wednesdays.
    let job = |name: &str| {
        r["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["job"] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {r}"))
            .clone()
    };
    for (name, due, ok) in [
        ("documents-daily", 30, 30),
        ("verify-weekly", 5, 5),
        ("drill-weekly", 5, 5),
        ("scans-weekly", 4, 0),
    ] {
        let row = job(name);
        assert_eq!(
            (row["due"].as_u64(), row["ok"].as_u64()),
            (Some(due), Some(ok)),
            "{name}: {row}"
        );
    }
    // The agent backs a source up with `backup all --source`.
    assert_eq!(r["backups"]["backup all"][0], 30, "{r}");
    assert_eq!(r["backups"]["backup all"][1], 4, "{r}");
    let verifies = r["verifies"].as_array().unwrap();
    assert_eq!(verifies.len(), 5, "{r}");
    assert!(verifies.iter().all(|v| v["ok"] == true));
    let drills = r["drills"].as_array().unwrap();
    assert_eq!(drills.len(), 5, "{r}");
    assert!(drills.iter().all(|d| d["ok"] == true));
    // Every drill and verify lies in the month, on its weekday.
    for d in drills {
        let time = chrono::DateTime::parse_from_rfc3339(d["time"].as_str().unwrap()).unwrap();
        assert_eq!(
            chrono::Datelike::weekday(&time),
            chrono::Weekday::Mon,
            "{d}"
        );
    }
    // The job that never worked: each of its runs is one failure, with the command's
    // reason, none resolved (the other jobs' successes resolve nothing of it).
    let fails = r["failures"].as_array().unwrap();
    assert_eq!(fails.len(), 4, "{r}");
    for f in fails {
        assert_eq!(f["job"], "scans-weekly", "{f}");
        assert!(
            f["result"].as_str().unwrap().contains("no-such-folder"),
            "{f}"
        );
        assert!(f["resolved_at"].is_null(), "{f}");
    }
    // Kept by the policy: 30 daily document backups and the agent's 30 daily reports.
    assert_eq!(r["snapshots"], 60, "{r}");
    assert_eq!(r["trail"]["intact"], true, "{r}");
    // A month outside the simulated one holds none of it.
    let j = t.ok(&[
        "report",
        "--from",
        "2026-09-01T00:00:00Z",
        "--to",
        "2026-10-01T00:00:00Z",
        "--format",
        "json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(r["verifies"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["drills"].as_array().unwrap().len(), 0, "{r}");
}
