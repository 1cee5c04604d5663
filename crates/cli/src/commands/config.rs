//! `custos backup config`: the configuration sources of custos.toml (`env`, `terraform`,
//! `logs`); `custos restore env`: an env file with the plain values and the secrets as
//! references.

use std::path::PathBuf;

use clap::Args;
use custos_model::{Error, Result};
use custos_ops::backup::{BackupOptions, BackupReport};
use custos_ops::config::{self, terraform};
use custos_repo::snapshot::SourceKind;

use crate::commands::backup::print_backup;
use crate::context::Ctx;
use crate::settings::SourceSection;

#[derive(Args)]
pub(crate) struct EnvRestoreArgs {
    /// The env snapshot: an id (prefix) or `latest`
    pub(crate) snapshot: String,
    /// The env file to write (must not exist; written 0600)
    #[arg(long)]
    pub(crate) to: PathBuf,
    /// With `latest`: the latest snapshot of this source
    #[arg(long)]
    pub(crate) source: Option<String>,
}

/// Whether a source kind is configuration (`backup config` runs these).
pub(crate) fn is_config(kind: &str) -> bool {
    matches!(kind, "env" | "terraform" | "logs")
}

/// Backs up one configuration source, printing what it found.
pub(crate) fn backup_source(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    s: &SourceSection,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    match s.kind.as_str() {
        "env" => {
            if s.allow.is_empty() {
                return Err(Error::config(format!(
                    "env source `{}` has no `allow` list: name the variables to keep (globs like APP_*)",
                    s.name
                )));
            }
            let r = config::backup_env(
                repo,
                &config::EnvOptions {
                    name: s.name.clone(),
                    allow: s.allow.clone(),
                    plain: s.plain.clone(),
                    env_file: s.env_file.clone(),
                    vars: std::env::vars().collect(),
                    secrets_ref: s.secrets_ref.clone(),
                    list_command: s.list_command.clone(),
                },
                opts,
            )?;
            if !ctx.out.json {
                print_backup(ctx, &r.backup);
                println!(
                    "  env        {} variables: {} values, {} secrets kept as references only ({})",
                    r.facts.variables,
                    r.facts.values,
                    r.facts.references,
                    r.references.join(", ")
                );
                if r.facts.secret_names > 0 {
                    println!(
                        "  secrets    {} names listed by the secrets manager",
                        r.facts.secret_names
                    );
                }
            }
            Ok(r.backup)
        }
        "terraform" => {
            let dir = s.dir.clone().ok_or_else(|| {
                Error::config(format!(
                    "terraform source `{}` needs `dir`, its configuration folder",
                    s.name
                ))
            })?;
            let r = terraform::backup_terraform(
                repo,
                &terraform::TerraformOptions {
                    name: s.name.clone(),
                    command: s
                        .command
                        .clone()
                        .unwrap_or_else(|| "terraform state pull".into()),
                    dir,
                },
                opts,
            )?;
            for w in &r.facts.warnings {
                eprintln!("custos: warning: terraform `{}`: {w}", s.name);
            }
            if !ctx.out.json {
                print_backup(ctx, &r.backup);
                println!(
                    "  terraform  state serial {}, lineage {}, Terraform {}, {} resources",
                    r.facts.serial, r.facts.lineage, r.facts.terraform_version, r.facts.resources
                );
            }
            Ok(r.backup)
        }
        "logs" => {
            let paths: Vec<PathBuf> = s.paths.iter().map(PathBuf::from).collect();
            let r = custos_ops::files::backup::backup_files(repo, &paths, opts)?;
            if !ctx.out.json {
                print_backup(ctx, &r);
            }
            Ok(r)
        }
        other => Err(Error::config(format!(
            "source `{}` has kind `{other}`, not a configuration source (env, terraform, logs)",
            s.name
        ))),
    }
}

pub(crate) fn backup_config(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    source: Option<&str>,
) -> Result<i32> {
    let sources: Vec<&SourceSection> = ctx
        .settings
        .file
        .sources
        .iter()
        .filter(|s| is_config(&s.kind) && source.is_none_or(|n| s.name == n))
        .collect();
    if sources.is_empty() {
        return Err(Error::config(match source {
            Some(n) => format!("custos.toml has no env, terraform or logs source named `{n}`"),
            None => "custos.toml defines no env, terraform or logs [[source]]".into(),
        })
        .hint("see docs/config.md"));
    }
    let progress = ctx.out.progress();
    let mut reports = vec![];
    for s in sources {
        let opts = BackupOptions {
            tags: vec![s.name.clone()],
            time: None,
            cache_dir: ctx.settings.cache_dir.clone(),
            progress: progress.as_ref(),
        };
        reports.push(
            backup_source(ctx, repo, s, &opts)
                .map_err(|e| e.context(format!("source `{}`", s.name)))?,
        );
    }
    if ctx.out.json {
        ctx.out.json(&reports);
    }
    Ok(0)
}

pub(crate) fn restore_env(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    a: EnvRestoreArgs,
) -> Result<i32> {
    let snap = repo.find_snapshot(&a.snapshot, |s| {
        s.kind == SourceKind::Env && a.source.as_deref().is_none_or(|n| s.source == n)
    })?;
    let text = config::env_file(repo, &snap)?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.to)
        .map_err(|e| {
            Error::config(format!("cannot create {}: {e}", a.to.display()))
                .hint("name a file that does not exist yet")
        })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::internal(format!("writing {}: {e}", a.to.display())))?;
    ctx.touch(serde_json::json!({"snapshot": snap.id, "to": a.to}));
    if ctx.out.json {
        ctx.out
            .json(&serde_json::json!({"snapshot": snap.id, "to": a.to}));
    } else {
        println!(
            "environment `{}` of snapshot {} written to {} (secrets as references, to set from the secrets manager)",
            snap.summary.source,
            snap.id.short(),
            a.to.display()
        );
    }
    Ok(0)
}
