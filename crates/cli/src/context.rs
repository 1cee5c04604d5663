//! What every command works with: the environment and settings, the output, and the
//! repository once opened, with what its operation-trail entry will say.

use std::sync::Arc;

use custos_crypto::Role;
use custos_model::{Error, Result};
use custos_repo::{OpenOptions, Repository};
use custos_storage::guard::{Access, Secondary};
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
    /// What the command may do to a secondary it runs against (`--secondary`).
    pub(crate) secondary_access: std::cell::Cell<Access>,
    /// The repository opened is a secondary reached by its location (`--repo`), not by
    /// `--secondary NAME`: its operations cannot be recorded in the primary's trail.
    pub(crate) unnamed_secondary: std::cell::RefCell<Option<String>>,
    /// `--request-cold`: a restore first asks archived objects back (custos_ops::cold).
    pub(crate) request_cold: bool,
    /// Refuse (exit 14) when the trail no longer holds the entry this host last wrote.
    pub(crate) check_trail: bool,
    /// The key a maintained secondary's tombstones are written with, set when the
    /// repository is opened (its keys derive it).
    pub(crate) tombstone_key:
        std::sync::Arc<std::sync::OnceLock<custos_storage::guard::TombstoneKey>>,
}

impl Ctx {
    /// With `--request-cold`: the archived objects restoring `snap` reads are asked back
    /// and the restore waits (exit 21) until all are readable. Else nothing.
    pub(crate) fn cold_gate(
        &self,
        repo: &custos_repo::Repository,
        snap: &custos_repo::Snapshot,
    ) -> Result<()> {
        if self.request_cold {
            let r = custos_ops::cold::gate(repo, snap)?;
            if r.ready > 0 && !self.out.quiet {
                eprintln!(
                    "custos: {} archived object(s) restored by the store are readable",
                    r.ready
                );
            }
        }
        Ok(())
    }

    /// The storage the command works on: the primary's, or with `--secondary NAME` that
    /// secondary's, seen through its guard. A repository that turns out to be a secondary
    /// (its marker), reached by its location, is guarded the same way.
    pub(crate) fn storage(&self) -> Result<DynStorage> {
        let s = match &self.settings.secondary {
            Some(name) => {
                let raw = self.secondary_raw(name)?;
                Arc::new(
                    Secondary::new(raw, name, self.secondary_access.get(), "")
                        .with_key(self.tombstone_key.clone()),
                ) as DynStorage
            }
            None => {
                let s = self.primary_storage()?;
                // A marker that cannot be read (a repository of another OS user, a store
                // that does not answer) is left to the command's own first access to
                // report; one that is there but malformed is an error.
                let marker = match custos_storage::guard::marker(s.as_ref()) {
                    Err(e) if e.kind == custos_model::Kind::Integrity => return Err(e),
                    Err(_) => None,
                    Ok(m) => m,
                };
                match marker {
                    Some(m) => {
                        *self.unnamed_secondary.borrow_mut() = Some(m.name.clone());
                        Arc::new(Secondary::new(s, &m.name, Access::ReadOnly, "")) as DynStorage
                    }
                    None => s,
                }
            }
        };
        Ok(self.with_faults(s))
    }

    /// Whether the repository opened is a secondary (by name or by location).
    pub(crate) fn on_secondary(&self) -> bool {
        self.settings.secondary.is_some() || self.unnamed_secondary.borrow().is_some()
    }

    fn with_faults(&self, s: DynStorage) -> DynStorage {
        match self.settings.kill_before_write {
            Some(n) => Arc::new(custos_storage::fault::KillBeforeWrite::new(s, n)),
            None => s,
        }
    }

    /// The primary repository's storage, as configured.
    pub(crate) fn primary_storage(&self) -> Result<DynStorage> {
        let loc = self.settings.location()?;
        custos_storage::url::open(&loc, &self.settings.storage)
    }

    /// A secondary's storage, unguarded (for `copy` and `wal-push --secondary`).
    pub(crate) fn secondary_raw(&self, name: &str) -> Result<DynStorage> {
        let sec = self.settings.secondary_section(name)?;
        let (loc, opts) = self.settings.secondary_storage(sec)?;
        custos_storage::url::open(&loc, &opts)
    }

    /// [`Ctx::secondary_raw`] with the test hook that kills before the N-th write.
    pub(crate) fn secondary_for_copy(&self, name: &str) -> Result<DynStorage> {
        Ok(self.with_faults(self.secondary_raw(name)?))
    }

    pub(crate) fn open_opts(&self) -> OpenOptions {
        OpenOptions {
            host: self.settings.host.clone(),
            user: self.settings.user.clone(),
            threads: 0,
            cache_dir: self.settings.cache_dir.clone(),
            index_memory: self.settings.index_memory,
            lock_wait: self.settings.lock_wait,
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
        let _ = self.tombstone_key.set(repo.tombstone_key());
        tracing::debug!("opened the repository with key {}", repo.key_id.short());
        self.opened(&repo)?;
        Ok(repo)
    }

    pub(crate) fn opened(&self, repo: &Repository) -> Result<()> {
        if let Some(name) = self.unnamed_secondary.borrow().as_ref() {
            eprintln!(
                "custos: warning: {} is the secondary `{name}`: this operation is not recorded in the operation trail; name it with --secondary {name} (custos.toml [[secondary]]) to record it in the primary's",
                repo.storage.location()
            );
            return Ok(());
        }
        let mut writer = repo.trail_writer();
        if self.settings.secondary.is_some() {
            match self.primary_storage() {
                Ok(p) => writer = writer.on(p),
                Err(e) => {
                    eprintln!("custos: warning: this operation on a secondary cannot be recorded in the primary's trail: {}", e.message);
                    return Ok(());
                }
            }
        }
        if let Some(dir) = &self.settings.cache_dir {
            writer = writer.with_hint(dir.join(repo.config.id.to_hex()).join("trail-last"));
        }
        // Nothing runs, nor is appended, on a trail cut short behind this host's back.
        if self.check_trail {
            match writer.check_anchor() {
                Ok(_) => {}
                // A primary that cannot be reached while working on a secondary (it may
                // be what was lost): as above, said and not recorded.
                Err(e)
                    if self.settings.secondary.is_some()
                        && e.kind != custos_model::Kind::Integrity =>
                {
                    eprintln!("custos: warning: this operation on a secondary is not recorded in the operation trail: the primary's cannot be read: {}", e.message);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        *self.trail.borrow_mut() = Some((writer, repo.role(), repo.key_id));
        Ok(())
    }

    /// The last trail entry this host wrote, from its cache (format.md 11.1): what
    /// wal-push records in each WAL object's label without reading the trail.
    pub(crate) fn host_anchor(&self) -> Option<custos_repo::trail::Anchor> {
        self.trail
            .borrow()
            .as_ref()
            .and_then(|(w, _, _)| w.remembered())
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
            time: custos_model::clock::now(),
            role: role.as_str().into(),
            key,
            host: self.settings.host.clone(),
            user: self.settings.user.clone(),
            command: command.into(),
            touched: with_job(self.touched.take()),
            result: match result {
                Ok(0) => "ok".into(),
                Ok(c) => format!("exit {c}"),
                Err(e) => format!("error E{:02}: {}", e.kind.code(), e.message),
            },
            introduces: intro.as_ref().map(|(id, public, _)| (*id, public.clone())),
            introduces_role: intro.map(|(_, _, role)| role.as_str().to_string()),
            authority: self.authority.take(),
        };
        if let Some(name) = &self.settings.secondary {
            // The primary may be what is lost: an operation on the secondary then goes
            // on, and says it is unrecorded.
            let mut entry = entry;
            if let Some(o) = entry.touched.as_object_mut() {
                o.insert("secondary".into(), name.clone().into());
            } else {
                entry.touched = serde_json::json!({"secondary": name});
            }
            if let Err(e) = writer.append(&entry) {
                eprintln!(
                    "custos: warning: `{command}` on the secondary `{name}` is not recorded in the operation trail: the primary's trail could not be written: {}",
                    e.message
                );
            }
            return Ok(());
        }
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

/// What a command touched, with the agent's job that started it (`CUSTOS_AGENT_JOB`, set
/// by the agent for each run): the report ties a run's failure to its job.
fn with_job(touched: serde_json::Value) -> serde_json::Value {
    let Ok(job) = std::env::var("CUSTOS_AGENT_JOB") else {
        return touched;
    };
    match touched {
        serde_json::Value::Null => serde_json::json!({ "job": job }),
        serde_json::Value::Object(mut m) => {
            m.entry("job").or_insert(serde_json::Value::String(job));
            serde_json::Value::Object(m)
        }
        other => other,
    }
}
