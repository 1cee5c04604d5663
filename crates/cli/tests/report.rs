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
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        t.path("restored").to_str().unwrap(),
    ]);
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
