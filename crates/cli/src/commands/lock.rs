//! `custos lock status|refresh` (Object Lock dates from the retention policy) and
//! `custos bucket-policy` (the bucket settings custos expects, for the user to apply).

use clap::{Args, Subcommand};
use custos_model::{Error, Result};
use custos_ops::maintenance::lock;
use serde_json::json;

use crate::context::Ctx;

#[derive(Subcommand)]
pub(crate) enum LockCommand {
    /// Per snapshot: the date the retention policy asks its objects be kept until, and
    /// the dates the store holds (its own object, the latest of its packs): the earliest
    /// its data can be deleted
    #[command(
        after_help = "Example:\n  custos lock status --json | jq '.snapshots[] | select(.behind)'"
    )]
    Status,
    /// Extend the store's retain-until dates to what the policy now asks (a daily that
    /// became the month's monthly: 12 months); never shortens. The agent runs it daily
    #[command(after_help = "Example:\n  custos lock refresh")]
    Refresh,
}

#[derive(Args)]
pub(crate) struct BucketPolicyArgs {
    /// The bucket (default: the repository's, from custos.toml)
    #[arg(long)]
    pub(crate) bucket: Option<String>,
    /// The repository's prefix in the bucket (default: the repository's)
    #[arg(long)]
    pub(crate) prefix: Option<String>,
    /// The storage class of the cold tier (1 year on): GLACIER_IR reads at once;
    /// GLACIER and DEEP_ARCHIVE need a restore request first (`--request-cold`), hours
    #[arg(long, default_value = "GLACIER_IR", value_parser = ["GLACIER_IR", "GLACIER", "DEEP_ARCHIVE"])]
    pub(crate) cold_class: String,
}

fn plan(ctx: &Ctx, repo: &custos_repo::Repository) -> Result<lock::LockPlan> {
    let policy = ctx.settings.file.retention.clone().ok_or_else(|| {
        Error::config(
            "Object Lock dates come from the retention policy, and custos.toml has no [retention]",
        )
        .hint("add [retention] (`custos config init --profile healthcare` writes the seed's)")
    })?;
    let span = ctx
        .settings
        .storage
        .object_lock
        .as_ref()
        .and_then(|w| w.span_for(custos_repo::paths::DATA))
        .ok_or_else(|| {
            Error::config("custos.toml has no [object_lock]")
                .hint("add [object_lock] mode = \"governance\" (or \"compliance\") for a repository in an S3 bucket with Object Lock; `custos bucket-policy` prints the bucket's settings")
        })?;
    let floors = custos_ops::maintenance::forget::MinRetention {
        verified: None,
        ..ctx.settings.audit_log_min_retention()?
    };
    lock::plan(
        repo,
        &policy,
        &floors,
        chrono::Duration::from_std(span).unwrap_or(chrono::Duration::MAX),
        chrono::Utc::now(),
    )
}

fn day(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

pub(crate) fn cmd_lock(ctx: &Ctx, c: LockCommand) -> Result<i32> {
    let repo = ctx.open()?;
    let plan = plan(ctx, &repo)?;
    match c {
        LockCommand::Status => {
            let st = lock::status(&repo, &plan)?;
            let behind = st.iter().filter(|s| s.behind).count();
            if ctx.out.json {
                ctx.out.json(&json!({"snapshots": st, "behind": behind}));
                return Ok(0);
            }
            println!(
                "{:<10} {:<17} {:<28} {:<20} {:<20} data can go",
                "snapshot", "taken", "source", "policy keeps until", "object locked until"
            );
            let none = || "not locked".to_string();
            for s in &st {
                println!(
                    "{:<10} {:<17} {:<28} {:<20} {:<20} {}{}",
                    s.date.id.short(),
                    s.date.time.format("%Y-%m-%d %H:%M"),
                    custos_model::path::escape(&format!("{} {}", s.date.kind, s.date.source)),
                    day(&s.date.until),
                    s.object_until.as_ref().map_or_else(none, day),
                    s.data_until
                        .as_ref()
                        .map_or_else(none, |t| format!("after {}", day(t))),
                    if s.behind {
                        "  (short of the policy: run `custos lock refresh`)"
                    } else {
                        ""
                    }
                );
            }
            if behind > 0 {
                println!("{behind} snapshot(s) hold earlier dates than the policy asks: `custos lock refresh` extends them");
            }
            Ok(0)
        }
        LockCommand::Refresh => {
            let r = lock::refresh(&repo, &plan)?;
            ctx.touch(json!({
                "checked": r.checked,
                "extended": r.extended,
                "extended_by_kind": r.extended_by_kind,
                "snapshots": r.snapshots_extended.iter().map(|(id, t)| json!({"id": id.to_string(), "until": t})).collect::<Vec<_>>(),
            }));
            if ctx.out.json {
                ctx.out.json(&r);
            } else {
                let kinds: Vec<String> = r
                    .extended_by_kind
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                println!(
                    "checked {} object(s); extended {}{}",
                    r.checked,
                    r.extended,
                    if kinds.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", kinds.join(", "))
                    }
                );
                for (id, t) in &r.snapshots_extended {
                    println!("  snapshot {} now kept until {}", id.short(), day(t));
                }
            }
            Ok(0)
        }
    }
}

/// The bucket settings custos expects: Object Lock with a default mode, versioning, and
/// lifecycle rules for the seed's tiers. Printed for the user to apply.
pub(crate) fn bucket_policy(ctx: &Ctx, a: &BucketPolicyArgs) -> Result<i32> {
    let (bucket, prefix) = match (&a.bucket, ctx.settings.location()) {
        (Some(b), _) => (b.clone(), a.prefix.clone().unwrap_or_default()),
        (None, Ok(custos_storage::url::Location::S3 { bucket, prefix })) => {
            (bucket, a.prefix.clone().unwrap_or(prefix))
        }
        _ => {
            return Err(Error::config("no S3 bucket to describe").hint(
                "pass --bucket NAME (and --prefix), or set an s3:// repository in custos.toml",
            ))
        }
    };
    let mode = ctx
        .settings
        .storage
        .object_lock
        .as_ref()
        .map_or("GOVERNANCE", |w| w.mode.as_s3());
    let days = ctx
        .settings
        .storage
        .object_lock
        .as_ref()
        .and_then(|w| w.span_for(custos_repo::paths::DATA))
        .map_or(1, |d| d.as_secs().div_ceil(86_400).max(1));
    let p = prefix.trim_matches('/');
    let under = |d: &str| {
        if p.is_empty() {
            format!("{d}/")
        } else {
            format!("{p}/{d}/")
        }
    };
    let tiers = |id: &str, dir: &str, tagged: bool| {
        let (k, v) = custos_storage::ARCHIVAL_TAG
            .split_once('=')
            .expect("key=value");
        json!({
            "ID": id,
            "Status": "Enabled",
            "Filter": if tagged {
                json!({"And": {"Prefix": under(dir), "Tags": [{"Key": k, "Value": v}]}})
            } else {
                json!({"Prefix": under(dir)})
            },
            "Transitions": [
                {"Days": 91, "StorageClass": "STANDARD_IA"},
                {"Days": 366, "StorageClass": a.cold_class},
            ],
        })
    };
    let v = json!({
        "bucket": bucket,
        "versioning": {"Status": "Enabled"},
        "object_lock": {
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": mode, "Days": days}},
        },
        "lifecycle": {"Rules": [
            tiers("custos-packs-hot-warm-cold", "data", true),
            tiers("custos-wal-hot-warm-cold", "wal", false),
            {
                "ID": "custos-old-versions",
                "Status": "Enabled",
                "Filter": {"Prefix": if p.is_empty() { String::new() } else { format!("{p}/") }},
                "NoncurrentVersionExpiration": {"NoncurrentDays": 7},
                "Expiration": {"ExpiredObjectDeleteMarker": true},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
            },
        ]},
        "notes": [
            "Object Lock can only be turned on when the bucket is created: aws s3api create-bucket --bucket BUCKET --object-lock-enabled-for-bucket",
            format!("custos writes every pack, index, snapshot and WAL object with its own retain-until date ([object_lock] mode {mode}, from [retention]) and the trail for the longest retention; the default rule ({days} days) only covers what custos does not date (locks, keys), whose deletes then leave a delete marker"),
            format!("hot 0-90 days STANDARD, warm 91-365 days STANDARD_IA, cold from day 366 in the cold class: data packs (tagged {}) and WAL; packs holding manifests (untagged), snapshots, index, keys, config and the trail stay STANDARD: every command reads them", custos_storage::ARCHIVAL_TAG),
            "with GLACIER or DEEP_ARCHIVE, a restore of archived data runs with --request-cold: it asks every archived object it needs back at once and says when to run again".to_string(),
            "apply with: aws s3api put-object-lock-configuration, put-bucket-versioning and put-bucket-lifecycle-configuration (each takes its part of this document as JSON)",
            "no IAM policy of custos grants s3:BypassGovernanceRetention; with COMPLIANCE nobody, the account's root user included, can delete early",
        ],
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&v).expect("serializable")
    );
    Ok(0)
}
