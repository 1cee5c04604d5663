//! `custos key ...` and `custos iam-policy`: the keys that open the repository, their
//! roles, rotation and shares, and the storage policy that enforces the same split.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use custos_crypto::kdf::KdfParams;
use custos_crypto::Role;
use custos_model::path::escape as esc;
use custos_model::{Error, Kind, Result};
use custos_repo::Repository;

use crate::context::Ctx;

/// The flags of `custos iam-policy`.
#[derive(Args)]
pub(crate) struct IamPolicyArgs {
    /// The role the policy is for
    #[arg(long, value_parser = ["backup", "restore", "audit"])]
    pub(crate) role: String,
    /// The repository's bucket
    #[arg(long)]
    pub(crate) bucket: String,
    /// The repository's prefix in the bucket
    #[arg(long, default_value = "")]
    pub(crate) prefix: String,
    /// Restore role only: also allow forget and prune to delete
    #[arg(long)]
    pub(crate) allow_delete: bool,
}

#[derive(Args, Clone)]
pub(crate) struct KdfArgs {
    /// Argon2id memory in MiB for the new key (default 64). An archiver's backup key whose
    /// password is a long random string in a 0600 file can use 1: the KDF protects
    /// guessable passwords, and every wal-push pays it (8 MiB cost 23 ms per segment).
    /// At most 4096 (a reader refuses more: key files are hostile input)
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) kdf_memory_mib: Option<u32>,
    /// Argon2id iterations for the new key (default 3, at most 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) kdf_iterations: Option<u32>,
}

impl KdfArgs {
    pub(crate) fn params(&self) -> KdfParams {
        KdfParams::new(self.kdf_memory_mib, self.kdf_iterations)
    }
}

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// List keys (never secrets)
    #[command(after_help = "Example:\n  custos key list")]
    List,
    /// Add a key opened by a new password (CUSTOS_NEW_PASSWORD[_FILE] or a prompt)
    #[command(
        after_help = "Example:\n  CUSTOS_NEW_PASSWORD_FILE=/etc/custos/backup.pw custos key add --role backup --kdf-memory-mib 8"
    )]
    Add {
        /// backup: writes, cannot read back; restore: reads everything; audit: the trail only
        #[arg(long, value_parser = ["backup", "restore", "audit"])]
        role: String,
        /// Restore keys only: may also forget, prune and remove keys
        #[arg(long)]
        allow_delete: bool,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Remove a key by id (prefix)
    #[command(after_help = "Example:\n  custos key remove 3f2a9c01")]
    Remove {
        /// The key's id, or a unique prefix of it (`custos key list`)
        id: String,
    },
    /// Age of every key against the crypto-period ([keys] max_age, default 90d)
    #[command(after_help = "Example:\n  custos key status --json")]
    Status,
    /// New data key pair for new data; old data stays readable (old secrets are kept,
    /// sealed under the new chain). With --rewrap, every stored data key is re-wrapped to
    /// the new pair (packs are not rewritten) and new keys need no old secret
    #[command(after_help = "Example:\n  custos key rotate --rewrap")]
    Rotate {
        /// Also re-wrap every stored data key to the new pair (packs are not rewritten)
        #[arg(long)]
        rewrap: bool,
    },
    /// Split the restore key into N share files, any M of which rebuild it (Shamir)
    #[command(
        after_help = "Example:\n  custos key split --shares 5 --threshold 3 --out /secure/shares"
    )]
    Split {
        /// How many share files to make (one per holder)
        #[arg(long, value_parser = clap::value_parser!(u8).range(2..=255))]
        shares: u8,
        /// How many of them rebuild the key
        #[arg(long, value_parser = clap::value_parser!(u8).range(2..=255))]
        threshold: u8,
        /// Folder for the share files (created 0700; each file 0600: hand one to each holder)
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuild a restore key from share files and add it under a new password
    /// (CUSTOS_NEW_PASSWORD[_FILE] or a prompt); needs no other key
    #[command(
        after_help = "Example:\n  CUSTOS_NEW_PASSWORD_FILE=/root/new.pw custos key recover share-1.json share-4.json share-5.json"
    )]
    Recover {
        /// The share files (at least the threshold of them)
        #[arg(required = true)]
        share_files: Vec<PathBuf>,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Change the password of the key in use
    #[command(after_help = "Example:\n  CUSTOS_NEW_PASSWORD_FILE=/root/new.pw custos key passwd")]
    Passwd {
        #[command(flatten)]
        kdf: KdfArgs,
    },
}

pub(crate) fn cmd_key_recover(ctx: &Ctx, files: &[PathBuf], kdf: &KdfArgs) -> Result<i32> {
    let storage = ctx.storage()?;
    let config = Repository::read_config(&storage)?;
    let mut shares = vec![];
    for f in files {
        let text =
            std::fs::read(f).map_err(|e| custos_model::error::io_error(Kind::Config, f, e))?;
        let share: custos_ops::keys::ShareFile = serde_json::from_slice(&text).map_err(|_| {
            Error::config(format!("{} is not a custos key share file", f.display()))
        })?;
        shares.push((f.display().to_string(), share));
    }
    let keys = custos_ops::keys::recover(config.id, &shares)?;
    let pw = ctx.settings.new_password(&ctx.env)?;
    let kf = Repository::add_recovered_key(
        &storage,
        &keys,
        pw.as_bytes(),
        kdf.params(),
        &ctx.open_opts(),
    )?;
    // The rebuilt key must open this repository's data, not merely parse: some snapshot
    // must decode when any exists (one damaged object among good ones is not the key's
    // fault, and must not stop a recovery).
    let repo = match Repository::open(storage.clone(), pw.as_bytes(), ctx.open_opts()).and_then(
        |r| match r.snapshots_checked()? {
            (good, damaged) if good.is_empty() && !damaged.is_empty() => {
                Err(damaged.into_iter().next().expect("not empty").1)
            }
            _ => Ok(r),
        },
    ) {
        Ok(r) => r,
        Err(e) => {
            let _ = storage.delete(&custos_repo::paths::key(&kf.id));
            return Err(Error::integrity(format!(
                "the rebuilt key does not open this repository: {}",
                e.message
            )));
        }
    };
    // No existing key can vouch for a key rebuilt from shares: the repository's authority
    // (part of the restore key material the shares carried) signs its entry.
    *ctx.trail.borrow_mut() = Some((repo.trail_writer_as_authority(), repo.role(), repo.key_id));
    introduce(ctx, &repo, kf.id)?;
    ctx.touch(serde_json::json!({"key": kf.id, "shares": shares.len()}));
    if ctx.out.json {
        ctx.out
            .json(&serde_json::json!({"key": kf.id, "role": kf.role}));
    } else {
        println!(
            "rebuilt the restore key from {} shares: added restore key {}",
            shares.len(),
            kf.id.short()
        );
    }
    Ok(0)
}

/// Names a key's trail signing key in the command's trail entry.
pub(crate) fn introduce(ctx: &Ctx, repo: &Repository, id: custos_model::KeyId) -> Result<()> {
    let kf = Repository::key_files(&repo.storage)?
        .into_iter()
        .find(|k| k.id == id);
    if let Some(k) = kf {
        if let Some(public) = k.sign_public {
            *ctx.introduces.borrow_mut() = Some((id, public, k.role));
        }
    }
    Ok(())
}

pub(crate) fn cmd_key(ctx: &Ctx, k: KeyCommand) -> Result<i32> {
    if let KeyCommand::Recover { share_files, kdf } = k {
        return cmd_key_recover(ctx, &share_files, &kdf);
    }
    let mut repo = ctx.open()?;
    match k {
        KeyCommand::List => {
            let keys = Repository::key_files(&repo.storage)?;
            if ctx.out.json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|k| serde_json::json!({"id": k.id, "role": k.role, "created": k.created, "host": k.host, "user": k.user, "current": k.id == repo.key_id}))
                    .collect();
                ctx.out.json(&v);
            } else {
                println!(
                    "{:<2}{:<10} {:<8} {:<20} {:<16} user",
                    "", "id", "role", "created", "host"
                );
                for k in keys {
                    let cur = if k.id == repo.key_id { "*" } else { "" };
                    println!(
                        "{:<2}{:<10} {:<8} {:<20} {:<16} {}",
                        cur,
                        k.id.short(),
                        k.role.as_str(),
                        k.created.format("%Y-%m-%d %H:%M:%S"),
                        esc(&k.host),
                        esc(&k.user)
                    );
                }
            }
        }
        KeyCommand::Add {
            role,
            allow_delete,
            kdf,
        } => {
            let role: Role = role.parse()?;
            let pw = ctx.settings.new_password(&ctx.env)?;
            let kf = repo.add_key(role, pw.as_bytes(), kdf.params(), allow_delete)?;
            ctx.touch(
                serde_json::json!({"key": kf.id, "role": kf.role, "can_delete": allow_delete}),
            );
            introduce(ctx, &repo, kf.id)?;
            if ctx.out.json {
                ctx.out
                    .json(&serde_json::json!({"id": kf.id, "role": kf.role}));
            } else {
                println!("added {} key {}", kf.role.as_str(), kf.id.short());
            }
        }
        KeyCommand::Recover { .. } => unreachable!("handled above"),
        KeyCommand::Rotate { rewrap } => {
            let r = custos_ops::keys::rotate(&mut repo, rewrap)?;
            ctx.touch(serde_json::to_value(&r).expect("serializable"));
            if ctx.out.json {
                ctx.out.json(&r);
            } else {
                println!(
                    "data key pair rotated: generation {}; new data is wrapped to it, older data stays readable",
                    r.generation
                );
                if rewrap {
                    println!(
                        "re-wrapped the data keys of {} packs, {} snapshots and {} WAL files: a key made from now on needs no older secret",
                        r.rewrapped_packs, r.rewrapped_snapshots, r.rewrapped_wal
                    );
                }
            }
        }
        KeyCommand::Split {
            shares,
            threshold,
            out,
        } => {
            if threshold > shares {
                return Err(Error::config(format!(
                    "--threshold {threshold} is more than --shares {shares}"
                )));
            }
            let files = custos_ops::keys::split(&repo, threshold, shares)?;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&out)
                .map_err(|e| custos_model::error::io_error(Kind::Config, &out, e))?;
            let mut written = vec![];
            for f in &files {
                let p = out.join(format!(
                    "custos-share-{}-{}-of-{}.json",
                    repo.config.id.short(),
                    f.index,
                    f.shares
                ));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                    .map_err(|e| {
                        custos_model::error::io_error(Kind::Config, &p, e)
                            .hint("choose an empty --out folder: shares are never overwritten")
                    })?;
                file.write_all(&serde_json::to_vec_pretty(f).expect("serializable"))
                    .and_then(|_| file.sync_all())
                    .map_err(|e| custos_model::error::io_error(Kind::Config, &p, e))?;
                written.push(p.display().to_string());
            }
            ctx.touch(serde_json::json!({"threshold": threshold, "shares": shares, "split": files[0].split}));
            if ctx.out.json {
                ctx.out
                    .json(&serde_json::json!({"threshold": threshold, "files": written}));
            } else {
                println!(
                    "split the restore key into {shares} shares; any {threshold} rebuild it (`custos key recover`):"
                );
                for w in &written {
                    println!("  {w}");
                }
                println!("give each file to one holder and delete it here: together, {threshold} holders can read every backup");
            }
        }
        KeyCommand::Status => {
            let max_age = ctx.settings.key_max_age()?;
            let ages = custos_ops::keys::ages(&repo, max_age, chrono::Utc::now())?;
            let overdue = ages.iter().filter(|k| k.overdue).count();
            ctx.touch(serde_json::json!({"keys": ages.len(), "overdue": overdue}));
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({
                    "max_age_days": max_age.as_secs() / 86400,
                    "keys": ages,
                    "generation": repo.keys.generation,
                    "in_use": {"key": repo.key_id, "older_secrets_held": repo.keys.previous.len()},
                }));
            } else {
                println!(
                    "{:<16} {:<10} {:<8} {:<20} {:>6}",
                    "what", "id", "role", "created (UTC)", "age"
                );
                for k in &ages {
                    println!(
                        "{:<16} {:<10} {:<8} {:<20} {:>5}d{}",
                        k.what,
                        k.id.map(|i| i.short()).unwrap_or_default(),
                        k.role.as_deref().unwrap_or("-"),
                        k.created.format("%Y-%m-%d %H:%M:%S"),
                        k.age_days,
                        if k.overdue { "  OVERDUE" } else { "" }
                    );
                }
                for k in &ages {
                    if let Some(f) = k.finding(max_age) {
                        eprintln!("custos: warning: {f}");
                    }
                }
                if overdue == 0 {
                    println!(
                        "every key is within the crypto-period of {} days",
                        max_age.as_secs() / 86400
                    );
                }
            }
        }
        KeyCommand::Remove { id } => {
            let kf = repo.remove_key(&id)?;
            ctx.touch(serde_json::json!({"key": kf.id, "role": kf.role}));
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({"removed": kf.id}));
            } else {
                println!("removed {} key {}", kf.role.as_str(), kf.id.short());
            }
        }
        KeyCommand::Passwd { kdf } => {
            let pw = ctx.settings.new_password(&ctx.env)?;
            let old = repo.key_id;
            let kf = repo.change_password(pw.as_bytes(), kdf.params())?;
            ctx.touch(serde_json::json!({"key": kf.id, "replaces": old}));
            // Signed by the key being replaced, which vouches for its successor and signs
            // nothing after (the signing key stays, under the new key file's id).
            introduce(ctx, &repo, kf.id)?;
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({"id": kf.id}));
            } else {
                println!("password changed; the key is now {}", kf.id.short());
            }
        }
    }
    Ok(0)
}

/// `custos iam-policy`: the storage policy enforcing a role.
pub(crate) fn iam_policy(
    role: &str,
    bucket: &str,
    prefix: &str,
    allow_delete: bool,
) -> Result<i32> {
    let v = custos_ops::keys::iam::policy(role, bucket, prefix, allow_delete);
    println!(
        "{}",
        serde_json::to_string_pretty(&v).expect("serializable")
    );
    Ok(0)
}
