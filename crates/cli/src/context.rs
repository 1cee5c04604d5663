//! What every command works with: the environment and settings, the output, and the
//! repository once opened, with what its operation-trail entry will say.

use std::sync::Arc;

use custos_crypto::Role;
use custos_model::{Error, Result};
use custos_repo::{OpenOptions, Repository};
use custos_storage::DynStorage;

use crate::output::Out;
use crate::settings::{Env, Settings};

pub(crate) struct Ctx {
    pub(crate) env: Env,
    pub(crate) settings: Settings,
    pub(crate) out: Out,
    /// Set when the repository is opened: what appending to the trail needs.
    pub(crate) trail:
        std::cell::RefCell<Option<(custos_repo::trail::TrailWriter, Role, custos_model::KeyId)>>,
    /// What the command touched, for its trail entry.
    pub(crate) touched: std::cell::RefCell<serde_json::Value>,
    /// A key the command created, with its signing key, for its trail entry.
    pub(crate) introduces: std::cell::RefCell<Option<(custos_model::KeyId, String, Role)>>,
    /// `init`: the repository's trail authority, named in its entry.
    pub(crate) authority: std::cell::RefCell<Option<String>>,
}

impl Ctx {
    pub(crate) fn storage(&self) -> Result<DynStorage> {
        let loc = self.settings.location()?;
        let s = custos_storage::url::open(&loc, &self.settings.storage)?;
        Ok(match self.settings.kill_before_write {
            Some(n) => Arc::new(custos_storage::fault::KillBeforeWrite::new(s, n)),
            None => s,
        })
    }

    pub(crate) fn open_opts(&self) -> OpenOptions {
        OpenOptions {
            host: self.settings.host.clone(),
            user: self.settings.user.clone(),
            threads: 0,
        }
    }

    pub(crate) fn open(&self) -> Result<Repository> {
        self.open_with(|_| {})
    }

    /// [`Ctx::open`] for a restore: the packs start to be read ahead while the key is
    /// derived (the restore stops that once it is planned).
    pub(crate) fn open_to_restore(&self) -> Result<Repository> {
        self.open_with(|s| s.warm(custos_repo::paths::DATA))
    }

    pub(crate) fn open_with(&self, before_key: impl FnOnce(&DynStorage)) -> Result<Repository> {
        let storage = self.storage()?;
        // Fail on a missing repository, or one this user cannot write to (every command
        // appends to its trail), before asking for a password.
        storage.check_writable()?;
        Repository::read_config(&storage)?;
        before_key(&storage);
        let pw = self.settings.password(&self.env, "repository password: ")?;
        let repo = Repository::open(storage, pw.as_bytes(), self.open_opts())?;
        tracing::debug!("opened the repository with key {}", repo.key_id.short());
        self.opened(&repo);
        Ok(repo)
    }

    pub(crate) fn opened(&self, repo: &Repository) {
        let mut writer = repo.trail_writer();
        if let Some(dir) = &self.settings.cache_dir {
            writer = writer.with_hint(dir.join(repo.config.id.to_hex()).join("trail-last"));
        }
        *self.trail.borrow_mut() = Some((writer, repo.role(), repo.key_id));
    }

    pub(crate) fn touch(&self, v: serde_json::Value) {
        *self.touched.borrow_mut() = v;
    }

    /// Appends the command's trail entry. A trail that cannot be written does not undo
    /// what the command did, but is an error of its own: an operation the trail does not
    /// show must not pass for recorded (nor a trail for complete).
    pub(crate) fn record(&self, command: &str, result: &Result<i32>) -> Result<()> {
        let Some((writer, role, key)) = self.trail.borrow_mut().take() else {
            return Ok(());
        };
        let intro = self.introduces.take();
        let entry = custos_repo::trail::Entry {
            time: chrono::Utc::now(),
            role: role.as_str().into(),
            key,
            host: self.settings.host.clone(),
            user: self.settings.user.clone(),
            command: command.into(),
            touched: self.touched.take(),
            result: match result {
                Ok(0) => "ok".into(),
                Ok(c) => format!("exit {c}"),
                Err(e) => format!("error E{:02}: {}", e.kind.code(), e.message),
            },
            introduces: intro.as_ref().map(|(id, public, _)| (*id, public.clone())),
            introduces_role: intro.map(|(_, _, role)| role.as_str().to_string()),
            authority: self.authority.take(),
        };
        writer.append(&entry).map(|_| ()).map_err(|e| {
            Error::new(
                e.kind,
                format!(
                    "`{command}` {} but its entry in the operation trail could not be written: {}",
                    if result.is_ok() { "finished" } else { "failed" },
                    e.message
                ),
            )
            .hint("the operation is not recorded: run custos as the OS user that owns the repository, check the storage is writable, and run the command again")
        })
    }
}
