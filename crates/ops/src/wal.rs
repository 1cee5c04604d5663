//! `wal-push` (PostgreSQL's archive_command) and `wal-fetch` (restore_command).
//!
//! wal-push acknowledges a file only once it is durably stored, succeeds again for a file
//! already archived with the same content, and refuses a different file under an existing
//! name and a segment whose header names another cluster.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use custos_model::{Error, Kind, Result};
use custos_repo::wal::PushOutcome;
use custos_repo::Repository;
use custos_sources::postgres::wal::{self, WalFileKind};

pub fn push(repo: &Repository, path: &Path, pgdata: &Path) -> Result<(String, PushOutcome)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("{} names no WAL file", path.display())))?
        .to_string();
    let kind = wal::classify(&name)?;
    let data = std::fs::read(path)
        .map_err(|e| Error::new(Kind::Source, format!("cannot read {}: {e}", path.display())))?;
    let system_id = wal::system_id(pgdata)?;
    if let WalFileKind::Segment { .. } = kind {
        let h = wal::parse_header(&data, &name)?;
        if h.system_id != system_id {
            return Err(Error::new(
                Kind::Conflict,
                format!(
                    "{name} belongs to another cluster (system identifier {}, this cluster {system_id}); refusing to archive it",
                    h.system_id
                ),
            )
            .hint("archive_command must run for the cluster whose data directory is given by --pgdata / PGDATA"));
        }
    }
    let outcome = repo.wal_push(system_id, &name, &data)?;
    Ok((name, outcome))
}

/// Restores one archived file to `dest`; `Ok(false)` if it was never archived.
pub fn fetch(repo: &Repository, name: &str, dest: &Path, pgdata: &Path) -> Result<bool> {
    wal::classify(name)?;
    let system_id = wal::system_id(pgdata)?;
    let Some(data) = repo.wal_fetch(system_id, name)? else {
        return Ok(false);
    };
    // Whole or nothing at `dest`: temp file in the same folder, fsync, rename.
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{name}.custos-tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::new(
            Kind::Internal,
            format!("cannot write {}: {e}", dest.display()),
        )
    })?;
    Ok(true)
}
