//! `custos init`: a repository and its restore key (for another OS user with --owner).

use clap::Args;
use std::sync::Arc;

use custos_model::{Error, Kind, Result};
use custos_repo::Repository;

use crate::commands::key::{introduce, KdfArgs};
use crate::context::Ctx;

/// The flags of `custos init`.
#[derive(Args)]
pub(crate) struct InitArgs {
    #[command(flatten)]
    pub(crate) kdf: KdfArgs,
    /// Target size of pack objects in MiB (default 16; larger suits high-latency stores)
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=512))]
    pub(crate) pack_size_mib: Option<u64>,
    /// Block size for database files in KiB (default 128: compresses well, small index;
    /// 8 = one page, for databases whose writes touch few, scattered pages)
    #[arg(long, value_name = "KIB", value_parser = ["8", "16", "32", "64", "128"])]
    pub(crate) db_block_kib: Option<String>,
    /// A local repository for this OS user (run as root): the folder and everything in
    /// it belong to USER, e.g. postgres, whose archive_command writes to it
    #[arg(long, value_name = "USER")]
    pub(crate) owner: Option<String>,
}

pub(crate) fn cmd_init(
    ctx: &Ctx,
    kdf: &KdfArgs,
    pack_size_mib: Option<u64>,
    db_block: Option<u32>,
    owner: Option<&str>,
) -> Result<i32> {
    let storage = match owner {
        None => ctx.storage()?,
        Some(user) => {
            let custos_storage::url::Location::Local(path) = ctx.settings.location()? else {
                return Err(Error::config(
                    "--owner is for a local repository: an object store's access is its policy's (`custos iam-policy`)",
                ));
            };
            let (uid, gid) = user_ids(user)?;
            if unsafe { libc::geteuid() } != 0 && unsafe { libc::geteuid() } != uid {
                return Err(Error::config(format!(
                    "only root can make a repository for {user}"
                )));
            }
            Arc::new(custos_storage::local::LocalStorage::owned_by(
                path, uid, gid,
            ))
        }
    };
    let pw = ctx
        .settings
        .password(&ctx.env, "password for the new repository: ")?;
    if pw.is_empty() {
        return Err(Error::config("the password is empty"));
    }
    let repo = Repository::init(
        storage,
        pw.as_bytes(),
        kdf.params(),
        ctx.open_opts(),
        pack_size_mib.map(|m| m << 20),
        db_block,
    )?;
    if let (Some(user), custos_storage::url::Location::Local(path)) =
        (owner, ctx.settings.location()?)
    {
        let (uid, gid) = user_ids(user)?;
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .map_err(|e| custos_model::error::io_error(Kind::Config, &path, e))?;
    }
    ctx.opened(&repo)?;
    introduce(ctx, &repo, repo.key_id)?;
    *ctx.authority.borrow_mut() = repo.trail_authority();
    if ctx.out.json {
        ctx.out.json(&serde_json::json!({
            "repository": repo.config.id, "location": repo.storage.location(), "key": repo.key_id, "role": "restore",
        }));
    } else {
        println!(
            "created repository {} at {}",
            repo.config.id.short(),
            repo.storage.location()
        );
        println!(
            "restore key {} (keep its password safe: without it the backups cannot be read)",
            repo.key_id.short()
        );
    }
    Ok(0)
}

/// An OS user's uid and primary gid.
pub(crate) fn user_ids(user: &str) -> Result<(u32, u32)> {
    let c = std::ffi::CString::new(user)
        .map_err(|_| Error::config(format!("`{user}` is not a user name")))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: a zeroed passwd and a buffer we own; getpwnam_r fills both or leaves result null.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let r = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if r != 0 || result.is_null() {
        return Err(Error::config(format!(
            "there is no user `{user}` on this host"
        )));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}
