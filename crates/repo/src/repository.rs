//! Opening, creating and reading a repository.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use custos_chunk::ChunkerParams;
use custos_crypto::kdf::KdfParams;
use custos_crypto::{aead, MasterKeys, Role};
use custos_model::{ChunkId, Error, Id, IndexId, KeyId, Kind, PackId, RepoId, Result, SnapshotId};
use custos_storage::{DynStorage, PutMode, PutOutcome};
use zeroize::Zeroizing;

use crate::format::{
    from_zjson, to_zjson, RepoConfig, DEFAULT_PACK_SIZE, FORMAT_NAME, FORMAT_VERSION,
};
use crate::index::disk::{Builder, DiskIndex};
use crate::index::{Attribution, Index, IndexFile, IndexPack, PackMeta};
use crate::keyfile::{KeyFile, Origin};
use crate::lock::{self, LockGuard};
use crate::snapshot::{self, Snapshot, SnapshotBody, SnapshotSummary};
use crate::writer::{BlobWriter, WriterOptions};
use crate::{pack, paths};

const INDEX_AAD: &[u8] = b"custos index v1";

/// Snapshots that could not be read, each with why.
pub type DamagedSnapshots = Vec<(SnapshotId, Error)>;

/// The largest snapshot object read: a body decompresses to at most 256 MiB (format.rs),
/// and sits base64 in JSON.
pub const SNAPSHOT_MAX: u64 = 1 << 30;

const SUMMARIES_AAD: &[u8] = b"custos summary cache v1";

/// The largest index object read: custos writes at most 100,000 blobs and one pack's more
/// in one (~15 MB of JSON before zstd).
const INDEX_OBJECT_MAX: u64 = 256 << 20;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub host: String,
    pub user: String,
    /// Threads for compression/encryption; 0 means one per core.
    pub threads: usize,
    /// The host's cache folder: the on-disk index is kept there between commands.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Stored bytes of index objects read into memory rather than into the on-disk index
    /// (None: [`INDEX_MEMORY`]).
    pub index_memory: Option<u64>,
    /// How long taking a lock waits for a conflicting holder to finish (zero: fail at
    /// once with `Locked`).
    pub lock_wait: std::time::Duration,
}

/// The most blobs an index object written by prune, compaction or a re-wrap lists (about
/// 10 MB of JSON): a reader holds one object in memory at a time.
pub const INDEX_OBJECT_BLOBS: usize = 100_000;

/// Default of [`OpenOptions::index_memory`]: about 200,000 chunks' entries.
pub const INDEX_MEMORY: u64 = 16 << 20;

pub struct Repository {
    pub storage: DynStorage,
    pub config: RepoConfig,
    pub keys: MasterKeys,
    pub key_id: KeyId,
    pub opts: OpenOptions,
    pack_keys: Mutex<HashMap<PackId, Arc<Zeroizing<[u8; 32]>>>>,
    /// When the current data key pair was made (`init` or the newest rotation).
    pub pair_created: chrono::DateTime<chrono::Utc>,
    /// Data keys of snapshots and WAL re-wrapped to the current pair (`key rotate
    /// --rewrap`), read the first time an object's own wrapping does not open: the table
    /// names every snapshot and WAL object (millions after years of archiving), and most
    /// commands (wal-push, backup) never need it.
    /// A table that does not verify is held as why, and set aside.
    rewrap: std::sync::OnceLock<std::result::Result<Option<crate::keyring::Rewrap>, String>>,
    /// The key files as listed when the repository was opened, oldest first (their ages
    /// are reported without reading them again).
    pub key_files: Vec<KeyFile>,
    /// Key generations this (restore) key set aside because they did not verify
    /// (`keyring_problems` adds the re-wrap table's).
    generation_problems: Vec<String>,
}

/// A key file that cannot be used: its path and why.
pub type DamagedKeyFile = (String, String);

fn not_found(storage: &DynStorage) -> Error {
    Error::new(
        Kind::RepoNotFound,
        format!("there is no custos repository at {}", storage.location()),
    )
    .hint("check --repo / CUSTOS_REPO, or create one with `custos init`")
}

impl Repository {
    pub fn read_config(storage: &DynStorage) -> Result<RepoConfig> {
        // A config is a few hundred bytes; storage can serve any size.
        match custos_storage::get_bounded(&**storage, paths::CONFIG, 1 << 20, "the config") {
            Ok(b) => RepoConfig::parse(&b),
            Err(e) if e.kind == Kind::NotFound => Err(not_found(storage)),
            Err(e) => Err(e),
        }
    }

    pub fn init(
        storage: DynStorage,
        password: &[u8],
        kdf: KdfParams,
        opts: OpenOptions,
        pack_size: Option<u64>,
        db_block: Option<u32>,
    ) -> Result<Repository> {
        if storage.size(paths::CONFIG)?.is_some() {
            return Err(Error::new(
                Kind::RepoExists,
                format!("a repository already exists at {}", storage.location()),
            )
            .hint("use it as it is, or choose another location"));
        }
        let keys = MasterKeys::generate();
        let mut idb = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut idb);
        let config = RepoConfig {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            id: RepoId(Id(idb)),
            created: Utc::now(),
            chunker: ChunkerParams::DEFAULT_CDC,
            block_chunker: match db_block {
                Some(size) => ChunkerParams::Fixed { size },
                None => ChunkerParams::DEFAULT_FIXED,
            },
            pack_size: pack_size.unwrap_or(DEFAULT_PACK_SIZE),
        };
        // The first key signs the trail from its first entry on.
        let mut keys = keys;
        keys.sign_seed = Some(custos_crypto::sign::generate());
        // Key first, then config: a repository without config is "not found", never half-made.
        let kf = store_key_file(&storage, &keys, config.id, password, kdf, &opts)?;
        let cfg = serde_json::to_vec_pretty(&config).expect("serializable");
        if storage.create(paths::CONFIG, &cfg)? == PutOutcome::AlreadyExists {
            storage.delete(&paths::key(&kf.id))?;
            return Err(Error::new(
                Kind::RepoExists,
                "another process created the repository at the same time",
            ));
        }
        let listed = vec![kf.clone()];
        Self::assemble(storage, config, keys, kf.id, opts, listed)
    }

    /// Brings the opened keys up to the newest generation of the data key pair.
    fn assemble(
        storage: DynStorage,
        config: RepoConfig,
        mut keys: MasterKeys,
        key_id: KeyId,
        opts: OpenOptions,
        key_files: Vec<KeyFile>,
    ) -> Result<Repository> {
        let loaded = crate::keyring::load(&storage, &keys.meta_key)?;
        // A generation that does not verify, or does not even load (missing, damaged,
        // malformed: anyone who can write `keyring/` can make one), stops a key that
        // would write with what follows it (new data must never be wrapped to a key an
        // attacker chose, nor to an older pair than the newest). A restore key sets it
        // aside, loudly, and goes on with the pair before it: it can still read
        // everything up to there, and a restore at 3 a.m. must not depend on the keyring
        // being clean. One this key file already holds is only reported. `verify`
        // reports them all.
        let mut keyring_problems = vec![];
        let tolerate = keys.role == Role::Restore;
        let sealed_at = keys.generation;
        let mut applied = sealed_at;
        let mut links = vec![];
        for (g, l) in loaded {
            if g <= sealed_at {
                match l {
                    Ok(l) => links.push(l),
                    Err(e) => {
                        tracing::warn!("{} (not needed by this key)", e.message);
                        keyring_problems.push(e.message);
                    }
                }
                continue;
            }
            // Not a link at all: what to do, as a link that does not verify says it.
            let step = l
                .map_err(|e| e.hint("do not back up with this repository until it is investigated: the newest key pair cannot be read, and new data must not be wrapped to an older one; a restore key still reads everything before it"))
                .and_then(|l| crate::keyring::apply(&mut keys, std::slice::from_ref(&l)).map(|()| l));
            match step {
                Ok(l) => {
                    applied = g;
                    links.push(l);
                }
                Err(e) if tolerate && matches!(e.kind, Kind::Integrity | Kind::NotFound) => {
                    tracing::warn!(
                        "{} (set aside: this restore key keeps generation {applied})",
                        e.message
                    );
                    keyring_problems.push(e.message);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let pair_created = links
            .iter()
            .find(|l| l.generation == keys.generation)
            .map(|l| l.created)
            .unwrap_or(config.created);
        Ok(Repository {
            storage,
            config,
            keys,
            key_id,
            opts,
            pack_keys: Mutex::new(HashMap::new()),
            pair_created,
            rewrap: Default::default(),
            key_files,
            generation_problems: keyring_problems,
        })
    }

    /// The data key of `path` (a snapshot or WAL object) re-wrapped to the current pair.
    pub fn rewrapped_key(&self, path: &str) -> Option<Vec<u8>> {
        use base64::Engine;
        let k = self.rewrap_table()?.keys.get(path)?;
        base64::engine::general_purpose::STANDARD.decode(k).ok()
    }

    /// The re-wrap table of the current generation, read on first use. One that does not
    /// verify (or cannot be read) is set aside, loudly: each object's own data key is used
    /// (a restore must not depend on a clean keyring), and `verify` reports it.
    pub fn rewrap_table(&self) -> Option<&crate::keyring::Rewrap> {
        self.rewrap_read().as_ref().ok()?.as_ref()
    }

    fn rewrap_read(&self) -> &std::result::Result<Option<crate::keyring::Rewrap>, String> {
        self.rewrap.get_or_init(|| {
            if self.keys.generation == 0 {
                return Ok(None);
            }
            crate::keyring::load_rewrap(&self.storage, &self.keys, self.keys.generation).map_err(
                |e| {
                    tracing::warn!(
                        "{} (set aside: each object's own data key is used)",
                        e.message
                    );
                    e.message
                },
            )
        })
    }

    /// The re-wrap table `key rotate --rewrap` just wrote.
    pub fn set_rewrap_table(&mut self, r: crate::keyring::Rewrap) {
        self.rewrap = std::sync::OnceLock::from(Ok(Some(r)));
    }

    /// Key generations and re-wrap tables this key set aside because they did not verify
    /// (`verify` reports them; the re-wrap table is read for this).
    pub fn keyring_problems(&self) -> Vec<String> {
        let mut all = self.generation_problems.clone();
        all.extend(self.rewrap_read().as_ref().err().cloned());
        all
    }

    pub fn open(storage: DynStorage, password: &[u8], opts: OpenOptions) -> Result<Repository> {
        let config = Self::read_config(&storage)?;
        let (listed, damaged) = Self::key_files_and_damage(&storage)?;
        // A damaged key file is not tried: no password opens it.
        let files: Vec<KeyFile> = listed
            .iter()
            .filter(|k| k.damage().is_none())
            .cloned()
            .collect();
        if files.is_empty() {
            let mut e = Error::integrity(format!(
                "the repository at {} has no usable key files",
                storage.location()
            ));
            if let Some((p, why)) = damaged.first() {
                e = e.context(format!("key file {p} is damaged ({why})"));
            }
            return Err(e);
        }
        let wrong_password = move || -> Error {
            match damaged.first() {
                Some((p, why)) => Error::integrity(format!(
                    "the password opens none of the intact keys, and key file {p} is damaged ({why})"
                ))
                .hint("if the password is that key's, its key file is broken: open the repository with another key, or rebuild the restore key from shares (`custos key recover`); then `custos key remove` the damaged one"),
                None => Error::new(Kind::Authentication, "the password does not open any key of this repository")
                    .hint("check CUSTOS_PASSWORD, CUSTOS_PASSWORD_FILE or CUSTOS_PASSWORD_COMMAND; `custos key list` (with a working password) shows the keys"),
            }
        };
        // Argon2id is deliberately slow. The cheapest key is tried alone first: archive_command
        // runs custos for every WAL segment with a backup key whose KDF is cheap (its password
        // is a random string in a file), and it must not compete with the restore key's 64 MiB
        // derivation. Then the others in parallel, taking the first that opens; threads still
        // deriving finish on their own with a password copy zeroized when they end.
        let mut files = files;
        files.sort_by_key(|k| u64::from(k.kdf.memory_kib) * u64::from(k.kdf.iterations));
        let cheapest = files.remove(0);
        if let Some(keys) = cheapest.open(password, config.id)? {
            return Self::assemble(storage, config, keys, cheapest.id, opts, listed);
        }
        let password = std::sync::Arc::new(Zeroizing::new(password.to_vec()));
        let (tx, rx) = std::sync::mpsc::channel();
        let n = files.len();
        for kf in files {
            let tx = tx.clone();
            let pw = password.clone();
            let repo_id = config.id;
            std::thread::spawn(move || {
                let r = kf.open(&pw, repo_id).map(|o| o.map(|k| (kf.id, k)));
                let _ = tx.send(r);
            });
        }
        drop(tx);
        let mut err = None;
        for r in rx.iter().take(n) {
            match r {
                Ok(Some((id, keys))) => {
                    return Self::assemble(storage, config, keys, id, opts, listed)
                }
                Ok(None) => {}
                Err(e) => err = Some(e),
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        Err(wrong_password())
    }

    /// The key files that parse, oldest first (one that does not is left out, with a
    /// warning: see [`Repository::key_files_checked`]).
    pub fn key_files(storage: &DynStorage) -> Result<Vec<KeyFile>> {
        let (files, damaged) = Self::key_files_checked(storage)?;
        for (p, why) in damaged {
            tracing::warn!("key file {p} is damaged ({why}); it is left out");
        }
        Ok(files)
    }

    /// The key files that parse, oldest first, and every one no password can open, with
    /// why: those that do not parse, and those that parse but are damaged
    /// ([`KeyFile::damage`]).
    pub fn key_files_and_damage(
        storage: &DynStorage,
    ) -> Result<(Vec<KeyFile>, Vec<DamagedKeyFile>)> {
        let (files, mut damaged) = Self::key_files_checked(storage)?;
        damaged.extend(
            files
                .iter()
                .filter_map(|k| k.damage().map(|why| (paths::key(&k.id), why.to_string()))),
        );
        Ok((files, damaged))
    }

    /// The key files that parse, oldest first, and the paths of those that do not, with
    /// why: one damaged key file must not stop the others from opening the repository.
    pub fn key_files_checked(storage: &DynStorage) -> Result<(Vec<KeyFile>, Vec<DamagedKeyFile>)> {
        let mut out = vec![];
        let mut damaged = vec![];
        for e in storage.list(paths::KEYS)? {
            // Key files are a few hundred bytes.
            let b = match custos_storage::get_listed(&**storage, &e, 1 << 20, "key file") {
                Ok(b) => b,
                Err(err) if err.kind == Kind::Integrity => {
                    damaged.push((e.path.clone(), err.message));
                    continue;
                }
                Err(err) => return Err(err),
            };
            match serde_json::from_slice::<KeyFile>(&b) {
                Ok(kf) if paths::key(&kf.id) == e.path => out.push(kf),
                Ok(kf) => damaged.push((
                    e.path.clone(),
                    format!("it holds key {} under another name", kf.id.short()),
                )),
                Err(err) => damaged.push((e.path.clone(), format!("malformed: {err}"))),
            }
        }
        out.sort_by_key(|k| k.created);
        Ok((out, damaged))
    }

    pub fn role(&self) -> Role {
        self.keys.role
    }

    pub fn require_restore(&self, action: &str) -> Result<()> {
        if self.keys.secret.is_none() {
            return Err(if self.keys.role == Role::Audit {
                Error::new(
                    Kind::Permission,
                    format!("this key has the audit role and cannot {action}"),
                )
                .hint("audit keys read the operation trail and the snapshot listing only")
            } else {
                snapshot::restore_key_required(action)
            });
        }
        Ok(())
    }

    /// Forget, prune and key removal: a restore key granted deletion.
    pub fn require_delete(&self, action: &str) -> Result<()> {
        self.require_restore(action)?;
        if !self.keys.can_delete {
            return Err(Error::new(
                Kind::Permission,
                format!("this restore key may not delete, so it cannot {action}"),
            )
            .hint("use a key granted deletion: the key made by `init`, or one added with `key add --role restore --allow-delete`"));
        }
        Ok(())
    }

    /// Backup and restore keys write; audit keys only read.
    pub fn require_write(&self, action: &str) -> Result<()> {
        if self.keys.role == Role::Audit {
            return Err(Error::new(
                Kind::Permission,
                format!("this key has the audit role and cannot {action}"),
            )
            .hint("audit keys read the operation trail and the snapshot listing only; use a backup-role key"));
        }
        Ok(())
    }

    /// Adds a key file for `role`, sealed with `password`. Refuses a password that already
    /// opens a key, so that a password always names exactly one key.
    pub fn add_key(
        &self,
        role: Role,
        password: &[u8],
        kdf: KdfParams,
        allow_delete: bool,
    ) -> Result<KeyFile> {
        // Only a restore key creates keys: it holds the authority whose public half a new
        // key must carry, and a stolen backup key must not multiply itself.
        self.require_restore(&format!("create a {} key", role.as_str()))?;
        if allow_delete {
            if role != Role::Restore {
                return Err(Error::config("only restore keys can be granted deletion"));
            }
            self.require_delete("grant deletion to a new key")?;
        }
        self.require_write("add keys")?;
        self.refuse_password_in_use(password, None)?;
        let mut keys = self.keys.for_role(role);
        keys.can_delete = allow_delete;
        if self.rewrap_table().is_some() {
            // Everything is readable with the current secret: the new key needs no other.
            keys.previous.clear();
        }
        let kf = store_key_file(
            &self.storage,
            &keys,
            self.config.id,
            password,
            kdf,
            &self.opts,
        )?;
        Ok(kf)
    }

    /// Adds a restore key rebuilt from secret shares (`key recover`): no other key is
    /// needed, the repository is named by `storage`.
    pub fn add_recovered_key(
        storage: &DynStorage,
        keys: &MasterKeys,
        password: &[u8],
        kdf: KdfParams,
        opts: &OpenOptions,
    ) -> Result<KeyFile> {
        let config = Self::read_config(storage)?;
        for kf in Self::key_files(storage)? {
            if kf.open(password, config.id)?.is_some() {
                return Err(Error::config(format!(
                    "this password already opens key {}",
                    kf.id.short()
                ))
                .hint("choose a different password: each password opens exactly one key"));
            }
        }
        let mut keys = keys.clone();
        keys.sign_seed = None;
        store_key_file(storage, &keys, config.id, password, kdf, opts)
    }

    /// A password opens exactly one key: refuses one that already opens a key other than
    /// `except`.
    fn refuse_password_in_use(&self, password: &[u8], except: Option<KeyId>) -> Result<()> {
        for kf in Self::key_files(&self.storage)? {
            if Some(kf.id) != except && kf.open(password, self.config.id)?.is_some() {
                return Err(Error::config(format!(
                    "this password already opens key {}",
                    kf.id.short()
                ))
                .hint("choose a different password: each password opens exactly one key"));
            }
        }
        Ok(())
    }

    /// Finds a key by id prefix.
    pub fn find_key(&self, prefix: &str) -> Result<KeyFile> {
        resolve_prefix(
            Self::key_files(&self.storage)?,
            prefix,
            |k| k.id.to_hex(),
            "key",
            "`custos key list` shows key ids",
        )
    }

    pub fn remove_key(&self, prefix: &str) -> Result<KeyFile> {
        self.require_delete("remove keys")?;
        let kf = self.find_key(prefix)?;
        if kf.id == self.key_id {
            return Err(Error::config("refusing to remove the key in use")
                .hint("open the repository with another key's password to remove this one"));
        }
        let restore_left = Self::key_files(&self.storage)?
            .iter()
            .filter(|k| k.role == Role::Restore && k.id != kf.id)
            .count();
        if kf.role == Role::Restore && restore_left == 0 {
            return Err(Error::config(
                "refusing to remove the last restore key: the data would become unreadable",
            ));
        }
        self.storage.delete(&paths::key(&kf.id))?;
        Ok(kf)
    }

    /// Replaces the current key file by one sealed with a new password (write, then delete).
    pub fn change_password(&mut self, password: &[u8], kdf: KdfParams) -> Result<KeyFile> {
        let old = self.key_id;
        self.refuse_password_in_use(password, Some(old))?;
        let kf = store_key_file(
            &self.storage,
            &self.keys,
            self.config.id,
            password,
            kdf,
            &self.opts,
        )?;
        self.storage.delete(&paths::key(&old))?;
        self.key_id = kf.id;
        Ok(kf)
    }

    pub fn cdc_seed(&self) -> u64 {
        let h = blake3::keyed_hash(&self.keys.id_key, b"custos cdc seed v1");
        u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap())
    }

    pub fn threads(&self) -> usize {
        if self.opts.threads > 0 {
            self.opts.threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }
    }

    pub fn lock(&self, exclusive: bool, command: &str) -> Result<LockGuard> {
        lock::acquire_waiting(
            self.storage.clone(),
            &self.keys.meta_key,
            exclusive,
            &self.opts.host,
            command,
            self.opts.lock_wait,
        )
    }

    /// A lock in another storage holding a copy of this repository (a secondary that
    /// `copy` writes to), sealed with this repository's key.
    pub fn lock_on(
        &self,
        storage: DynStorage,
        exclusive: bool,
        command: &str,
    ) -> Result<LockGuard> {
        lock::acquire_waiting(
            storage,
            &self.keys.meta_key,
            exclusive,
            &self.opts.host,
            command,
            self.opts.lock_wait,
        )
    }

    // ---- index ----

    /// The index (format.md 5.3): the host's on-disk build when it still describes the
    /// repository, plus the index objects written since, in memory while they are few;
    /// otherwise a new build. Memory stays bounded whatever the repository's size.
    pub fn load_index(&self) -> Result<Index> {
        self.load_index_with(true, None)
    }

    /// The index for a command that only reads data (restore, `ls`): as [`load_index`],
    /// but an index object that is damaged or missing is left out with a warning instead
    /// of stopping the command, so a restore at 3 a.m. does not wait on `index rebuild`
    /// for an object its snapshot may not need. A chunk only that object indexed is then
    /// an error when the restore reaches it, with the same way out. Commands that write
    /// or delete (backup, prune) keep refusing.
    ///
    /// [`load_index`]: Repository::load_index
    pub fn load_index_for_reading(&self) -> Result<Index> {
        let (index, skipped) = self.load_index_skipping(true)?;
        for p in &skipped {
            tracing::warn!(
                "{p}; reading without it (`custos index rebuild`, with a key that may delete, indexes its packs again from their headers)"
            );
        }
        Ok(index)
    }

    /// The index read from the repository alone, never from a cache on this host.
    pub fn load_index_fresh(&self) -> Result<Index> {
        self.load_index_with(false, None)
    }

    /// What `verify` judges by: the index read from the repository alone, without the
    /// objects that cannot be read or opened (each one's problem returned), so that one
    /// damaged object does not hide what else is wrong. The packs such an object named
    /// are then unindexed, and the snapshots that need their chunks are reported.
    pub fn load_index_for_verify(&self) -> Result<(Index, Vec<String>)> {
        self.load_index_skipping(false)
    }

    /// The index without the objects that cannot be read or opened, and each one's problem
    /// (once: a load may read an object twice when it starts a build over).
    fn load_index_skipping(&self, cached: bool) -> Result<(Index, Vec<String>)> {
        let mut skipped = vec![];
        let index = self.load_index_with(cached, Some(&mut skipped))?;
        skipped.sort();
        skipped.dedup();
        Ok((index, skipped))
    }

    /// Reads index objects in parallel. With `skipped`, an object that is missing,
    /// altered or cannot be opened is left out and its problem recorded there; without,
    /// it is the error.
    fn read_index_objects(
        &self,
        part: &[&custos_storage::Entry],
        threads: usize,
        skipped: &mut Option<&mut Vec<String>>,
    ) -> Result<Vec<(IndexId, IndexFile)>> {
        let read = parallel_map(part, threads, |e| Ok(self.read_index_object(&e.path)))?;
        let mut out = Vec::with_capacity(read.len());
        for r in read {
            match (r, skipped.as_deref_mut()) {
                (Ok(f), _) => out.push(f),
                (Err(err), Some(s)) if matches!(err.kind, Kind::Integrity | Kind::NotFound) => {
                    s.push(err.message)
                }
                (Err(err), _) => return Err(err),
            }
        }
        Ok(out)
    }

    /// The folder of this repository's and key's on-disk index on this host.
    fn index_cache(&self) -> Option<std::path::PathBuf> {
        let dir = self.opts.cache_dir.as_ref()?;
        let mut who = blake3::Hasher::new();
        who.update(b"custos index cache");
        who.update(&self.signing_public().unwrap_or_default());
        who.update(&self.keys.authority_public.unwrap_or_default());
        Some(
            dir.join(self.config.id.to_hex())
                .join(format!("index-{}", &who.finalize().to_hex()[..16])),
        )
    }

    /// One index object, checked against its name and opened.
    pub fn read_index_object(&self, path: &str) -> Result<(IndexId, IndexFile)> {
        let id = IndexId(
            paths::id_of(path).ok_or_else(|| Error::integrity(format!("bad index name {path}")))?,
        );
        let bytes = custos_storage::get_bounded(&*self.storage, path, INDEX_OBJECT_MAX, "index")
            .map_err(|err| missing_as_integrity(err, "index"))?;
        let rebuild = |e: Error| {
            e.hint("`custos index rebuild` (a key that may delete) indexes the packs again from their own headers and removes the damaged object; `custos verify --read-data` then checks the data")
        };
        if Id::of_bytes(&bytes) != id.0 {
            return Err(rebuild(Error::integrity(format!(
                "index {} does not match its id: it was altered",
                id.short()
            ))));
        }
        let plain = aead::open(
            &self.keys.meta_key,
            INDEX_AAD,
            &bytes,
            &format!("index {}", id.short()),
        )
        .map_err(rebuild)?;
        drop(bytes);
        Ok((
            id,
            from_zjson(&plain, &format!("index {}", id.short())).map_err(rebuild)?,
        ))
    }

    /// What an index object's signature backs for each of its packs (format.md 5.1): the
    /// key whose signature verifies; what the object says of each pack's writer, of
    /// vouching and of damaged copies counts only when that key is the authority.
    fn attribution(&self, f: &IndexFile) -> (bool, impl Fn(&IndexPack) -> Attribution) {
        let signer = f.verified_signer();
        let by_authority = signer.is_some() && signer == self.keys.authority_public;
        let me = self.signing_public();
        (by_authority, move |p: &IndexPack| {
            let (writer, vouched) = if by_authority {
                let w = p
                    .writer
                    .as_deref()
                    .and_then(|h| hex::decode(h).ok()?.try_into().ok());
                (w, p.vouched)
            } else {
                (signer, false)
            };
            Attribution {
                writer,
                vouched,
                trusted: vouched || (writer.is_some() && writer == me),
            }
        })
    }

    fn load_index_with(
        &self,
        cached: bool,
        mut skipped: Option<&mut Vec<String>>,
    ) -> Result<Index> {
        let entries = self.storage.list(paths::INDEX)?;
        let cache = if cached { self.index_cache() } else { None };
        let me = self.signing_public();
        let authority = self.keys.authority_public;
        // A build that names an object no longer listed (prune, compaction) is stale.
        let listed: HashSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        let old = cache
            .as_deref()
            .and_then(|c| DiskIndex::open_current(c, &self.config.id, me, authority).ok())
            .filter(|d| {
                d.meta
                    .files
                    .iter()
                    .all(|f| listed.contains(paths::index(f).as_str()))
            })
            .map(Arc::new);
        let known: HashSet<String> = old
            .iter()
            .flat_map(|d| d.meta.files.iter().map(paths::index))
            .collect();
        let new: Vec<&custos_storage::Entry> = entries
            .iter()
            .filter(|e| !known.contains(&e.path))
            .collect();
        let new_bytes: u64 = new.iter().map(|e| e.size).sum();
        let batch = self.threads() * 2;
        if new_bytes <= self.opts.index_memory.unwrap_or(INDEX_MEMORY) {
            let mut index = Index::over(old.clone());
            let mut bad = vec![];
            let mut rebuild = false;
            'objects: for part in new.chunks(batch.max(1)) {
                let loaded = self.read_index_objects(part, batch, &mut skipped)?;
                for (id, f) in loaded {
                    // A pack the build holds, listed again (vouched for, re-indexed):
                    // what the build says of it may change, so it is built anew.
                    if f.packs.iter().any(|p| index.on_disk(&p.id)) {
                        rebuild = true;
                        break 'objects;
                    }
                    let (by_authority, attr) = self.attribution(&f);
                    for p in &f.packs {
                        index.add_pack_from(p, attr(p));
                    }
                    if by_authority {
                        bad.extend(f.bad.iter().copied());
                    }
                    index.add_file(id, &f);
                }
            }
            if !rebuild {
                // Marks name packs that another object (loaded in any order) lists.
                for (pack, chunk) in bad {
                    index.mark_bad(&pack, chunk);
                }
                return Ok(index);
            }
        }
        let cannot_write = |at: &std::path::Path, e: std::io::Error| {
            Error::new(
                Kind::Config,
                format!("cannot write the on-disk index in {}: {e}", at.display()),
            )
            .hint(
                "custos keeps its chunk index in the cache folder (cache_dir, CUSTOS_CACHE_DIR; \
                 the temporary folder without one): check that it is writable and has room",
            )
        };
        let temp = std::env::temp_dir();
        // A cache folder this user cannot write (made by another user, full) costs a
        // build for this command alone, never the command.
        let (mut builder, where_) = match (Builder::new(cache.as_deref()), &cache) {
            (Ok(b), _) => (b, cache.clone().unwrap_or(temp)),
            (Err(e), Some(c)) => {
                tracing::warn!(
                    "cannot write the on-disk index in {}: {e}; building it in the temporary folder for this command (check the cache folder, cache_dir or CUSTOS_CACHE_DIR)",
                    c.display()
                );
                let b = Builder::new(None).map_err(|e| cannot_write(&temp, e))?;
                (b, temp)
            }
            (Err(e), None) => return Err(cannot_write(&temp, e)),
        };
        let local = |e: std::io::Error| cannot_write(&where_, e);
        let todo: Vec<&custos_storage::Entry> = match &old {
            Some(d) => {
                builder.seed(d).map_err(local)?;
                new
            }
            None => entries.iter().collect(),
        };
        for part in todo.chunks(self.threads().max(1)) {
            for (id, f) in self.read_index_objects(part, self.threads(), &mut skipped)? {
                let (by_authority, attr) = self.attribution(&f);
                builder
                    .add_file(id, &f, attr, by_authority)
                    .map_err(local)?;
            }
        }
        let disk = builder
            .finish(&self.config.id, me, authority)
            .map_err(local)?;
        // The build decoded objects on several threads: give their freed memory back, or
        // the backup that follows allocates beside it (300 MB peak for a first backup at
        // 10M entries, the build's ~200 MB kept on top of the backup's own).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap pages to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(Index::over(Some(Arc::new(disk))))
    }

    /// This key's own trail signing key's public half (what its index objects are signed
    /// with), when it has one.
    pub fn signing_public(&self) -> Option<[u8; 32]> {
        self.keys
            .sign_seed
            .as_deref()
            .map(custos_crypto::sign::public_of)
    }

    /// The key of a secondary's tombstones' MACs (format.md 13): derived from the meta
    /// key, which every key of the repository (and of its secondaries) opens.
    pub fn tombstone_key(&self) -> custos_storage::guard::TombstoneKey {
        blake3::derive_key("custos tombstone v1", self.keys.meta_key.as_ref())
    }

    /// Writes an index object naming `packs`, which this key has just written and which
    /// must already be stored. A restore key vouches for its own packs: it made their ids
    /// from the content it stored.
    pub fn write_index(&self, mut packs: Vec<IndexPack>) -> Result<Option<IndexId>> {
        if packs.is_empty() {
            return Ok(None);
        }
        let me = self.signing_public().map(hex::encode);
        for p in &mut packs {
            p.writer = me.clone();
            p.vouched = self.keys.authority.is_some();
        }
        self.write_index_file(IndexFile {
            packs,
            ..Default::default()
        })
        .map(Some)
    }

    /// Writes the content of `f` as index objects of at most [`INDEX_OBJECT_BLOBS`] blobs
    /// each (see [`IndexObjects`]; the damaged copies of packs `f` does not list go with
    /// the last object).
    pub fn write_index_files(&self, f: IndexFile) -> Result<Vec<IndexId>> {
        let mut bad: HashMap<PackId, Vec<ChunkId>> = HashMap::new();
        for (p, c) in f.bad {
            bad.entry(p).or_default().push(c);
        }
        let mut w = self.index_objects();
        for p in f.packs {
            let b = bad.remove(&p.id).unwrap_or_default();
            w.push(p, b)?;
        }
        // Damaged copies in packs this content does not list (verify names them without
        // re-listing the pack).
        w.finish(
            bad.into_iter()
                .flat_map(|(p, cs)| cs.into_iter().map(move |c| (p, c)))
                .collect(),
        )
    }

    /// A writer of index objects that takes one pack at a time (see [`IndexObjects`]).
    pub fn index_objects(&self) -> IndexObjects<'_> {
        IndexObjects {
            repo: self,
            part: IndexFile::default(),
            blobs: 0,
            written: vec![],
        }
    }

    /// Writes an index object as given, signed: by the authority when this key holds it
    /// (a restore key; what the object says of writers, vouching and damaged copies then
    /// counts), else with the key's own signing key (and those claims left out: they would
    /// not count).
    pub fn write_index_file(&self, mut f: IndexFile) -> Result<IndexId> {
        match (
            self.keys.authority.as_deref(),
            self.keys.sign_seed.as_deref(),
        ) {
            (Some(authority), _) => f.sign(authority),
            (None, Some(seed)) => {
                for p in &mut f.packs {
                    p.writer = None;
                    p.vouched = false;
                }
                f.bad.clear();
                f.sign(seed);
            }
            (None, None) => {}
        }
        let sealed = aead::seal(&self.keys.meta_key, INDEX_AAD, &to_zjson(&f));
        let id = IndexId(Id::of_bytes(&sealed));
        self.storage
            .put(&paths::index(&id), &sealed, PutMode::CreateOnly)?;
        Ok(id)
    }

    pub fn writer(&self, index: Arc<Index>) -> BlobWriter {
        BlobWriter::new(
            self.storage.clone(),
            self.keys.public,
            index,
            WriterOptions {
                pack_size: self.config.pack_size as usize,
                packers: self.threads(),
                // One upload per packer: each holds a 16 MiB pack until the store
                // answers. One more (and a finished pack queued for it) held 30-60 MB
                // more at the same speed, locally and on S3 (bench/RESULTS.md, "the
                // backup pipeline's packs in flight").
                uploaders: self.threads(),
            },
        )
    }

    // ---- blobs ----

    pub fn pack_key(&self, meta: &PackMeta) -> Result<Arc<Zeroizing<[u8; 32]>>> {
        if let Some(k) = self.pack_keys.lock().unwrap().get(&meta.id) {
            return Ok(k.clone());
        }
        self.require_restore("decrypt stored data")?;
        let dek = self.keys.unwrap(
            pack::KEY_AAD,
            &meta.key,
            &format!("pack {}", meta.id.short()),
        )?;
        let arr: [u8; 32] = dek
            .as_slice()
            .try_into()
            .map_err(|_| Error::integrity("bad pack data key"))?;
        let k = Arc::new(Zeroizing::new(arr));
        self.pack_keys.lock().unwrap().insert(meta.id, k.clone());
        Ok(k)
    }

    /// What a stored pack says it holds, from its own header (for `index rebuild`): its
    /// entries and wrapped data key. Reads the trailer and the header only; needs a key
    /// that can unwrap pack keys. Entries must lie between the magic and the header.
    pub fn pack_header(
        &self,
        id: &PackId,
        size: u64,
    ) -> Result<(Vec<crate::blob::PackEntry>, Vec<u8>)> {
        let what = format!("pack {}", id.short());
        let path = paths::pack(id);
        let t = pack::TRAILER_LEN as u64;
        if size < pack::MAGIC.len() as u64 + t {
            return Err(Error::integrity(format!(
                "{what} is truncated or not a pack"
            )));
        }
        let tail = self.storage.get_range(&path, size - t, t)?;
        if &tail[8..] != pack::END {
            return Err(Error::integrity(format!(
                "{what} is truncated or not a pack"
            )));
        }
        let hl = u64::from(u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")));
        let wl = u64::from(u32::from_le_bytes(tail[4..8].try_into().expect("4 bytes")));
        let end = size - t;
        if hl + wl + pack::MAGIC.len() as u64 > end || wl > 4096 {
            return Err(Error::integrity(format!("{what} has a damaged trailer")));
        }
        let start = end - wl - hl;
        let both = self.storage.get_range(&path, start, hl + wl)?;
        let (sealed, wrapped) = both.split_at(hl as usize);
        self.require_restore("read pack headers")?;
        let dek = self.keys.unwrap(pack::KEY_AAD, wrapped, &what)?;
        let dek: [u8; 32] = dek
            .as_slice()
            .try_into()
            .map_err(|_| Error::integrity(format!("{what}: bad data key")))?;
        let entries = pack::open_header(&dek, sealed, &what)?;
        let magic = pack::MAGIC.len() as u64;
        if let Some(e) = entries.iter().find(|e| {
            u64::from(e.offset) < magic || u64::from(e.offset) + u64::from(e.length) > start
        }) {
            return Err(Error::integrity(format!(
                "{what}: its header places chunk {} outside the pack's data",
                e.id.short()
            )));
        }
        Ok((entries, wrapped.to_vec()))
    }

    /// Reads and decrypts one blob, checking it against its id; a damaged copy is passed
    /// over for the next place the chunk is stored.
    pub fn read_blob(&self, index: &Index, id: &ChunkId) -> Result<Vec<u8>> {
        let len = index.get(id).map_or(0, |(_, l)| l.raw_length as usize);
        let mut out = vec![0u8; len];
        self.read_blob_into(index, id, None, &mut out)?;
        Ok(out)
    }

    /// Reads a blob into `out` (its plaintext length) from the first of its locations that
    /// is intact, skipping the copy in `skip` (already found damaged by the caller). The
    /// error of the first copy tried is returned when none is.
    pub fn read_blob_into(
        &self,
        index: &Index,
        id: &ChunkId,
        skip: Option<&PackId>,
        out: &mut [u8],
    ) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut any = false;
        for (meta, loc) in index.locations(id) {
            if skip == Some(&meta.id) {
                continue;
            }
            any = true;
            let r = (|| -> Result<()> {
                let dek = self.pack_key(&meta)?;
                let sealed = self
                    .storage
                    .get_range(
                        &paths::pack(&meta.id),
                        u64::from(loc.offset),
                        u64::from(loc.length),
                    )
                    .map_err(|e| missing_as_integrity(e, "pack"))?;
                if loc.raw_length as usize != out.len() {
                    return Err(Error::integrity(format!(
                        "chunk {} has {} bytes in pack {} but {} elsewhere",
                        id.short(),
                        loc.raw_length,
                        meta.id.short(),
                        out.len()
                    )));
                }
                pack::open_blob_into(&dek, &self.keys.id_key, id, &loc, &sealed, out)
            })();
            match r {
                Ok(()) => return Ok(()),
                // Damaged or missing here: another copy may be intact. Anything else
                // (storage unreachable, wrong key) is not a property of this copy.
                Err(e) if e.kind == Kind::Integrity => {
                    tracing::warn!(
                        "chunk {} in pack {}: {}; trying another copy",
                        id.short(),
                        meta.id.short(),
                        e.message
                    );
                    first.get_or_insert(Error {
                        message: format!("{} (in pack {})", e.message, meta.id),
                        ..e
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Err(first.unwrap_or_else(|| {
            Error::integrity(format!(
                "chunk {} is referenced but not in the index{}",
                id.short(),
                if any || skip.is_none() {
                    ""
                } else {
                    " elsewhere"
                }
            ))
            .hint("if an index object was lost or damaged, `custos index rebuild` indexes the packs again from their headers; `custos verify` names what else is missing")
        }))
    }

    // ---- snapshots ----

    pub fn save_snapshot(
        &self,
        summary: &SnapshotSummary,
        body: &SnapshotBody,
    ) -> Result<SnapshotId> {
        let bytes = snapshot::encode(&self.keys, summary, body)?;
        let id = SnapshotId(Id::of_bytes(&bytes));
        self.storage
            .put(&paths::snapshot(&id), &bytes, PutMode::CreateOnly)?;
        Ok(id)
    }

    /// Every snapshot's summary, oldest first; an error when one does not decode. For
    /// commands that delete or rewrap (forget by policy, prune, key rotation): what they
    /// cannot read they cannot account for.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let (out, damaged) = self.snapshots_checked()?;
        match damaged.into_iter().next() {
            Some((id, e)) => Err(unreadable_snapshot(&id, e, true)),
            None => Ok(out),
        }
    }

    /// Every snapshot that decodes, oldest first; each one that does not is named in a
    /// warning and left out. For commands that read (restore, listings, checks): one
    /// damaged or planted object (storage, or any key that writes snapshots, can write
    /// one) must not stand between the user and every other snapshot.
    pub fn snapshots_for_reading(&self) -> Result<Vec<Snapshot>> {
        let (out, damaged) = self.snapshots_checked()?;
        for (id, e) in damaged {
            warn_unreadable(&id, &e);
        }
        Ok(out)
    }

    /// Every snapshot that decodes, and apart from them each one that does not (altered,
    /// malformed, or sealed with another key) with its error: for checks that must name
    /// every damaged object rather than stop at the first.
    pub fn snapshots_checked(&self) -> Result<(Vec<Snapshot>, DamagedSnapshots)> {
        self.snapshots_read(true)
    }

    /// As [`Repository::snapshots_checked`], every object read from storage (never from
    /// this host's copies): for `verify`, which must see what storage holds now.
    pub fn snapshots_in_storage(&self) -> Result<(Vec<Snapshot>, DamagedSnapshots)> {
        self.snapshots_read(false)
    }

    fn snapshots_read(&self, cached: bool) -> Result<(Vec<Snapshot>, DamagedSnapshots)> {
        // Only names that can be ids are read, so a listing of those is enough.
        let listed = self.storage.list_hex(paths::SNAPSHOTS)?;
        // What this host decoded before (one file) is not read again: only new objects.
        let mut known = if cached {
            self.kept_summaries()
        } else {
            Default::default()
        };
        let was_known = known.len();
        let mut out = vec![];
        let mut entries = vec![];
        for e in &listed {
            let Some(id) = paths::id_of(&e.path).map(SnapshotId) else {
                continue;
            };
            match known.remove(&id) {
                Some(summary) => out.push(Snapshot { id, summary }),
                None => entries.push(e.clone()),
            }
        }
        let from_known = out.len();
        drop(known);
        // Small objects from a bucket: each GET waits on a round trip, not on a core.
        let fetches = match self.storage.as_remote() {
            Some(_) => (self.threads() * 2).max(16),
            None => self.threads() * 2,
        };
        let all = parallel_map(
            &entries,
            fetches,
            |e| -> Result<Option<(SnapshotId, Result<SnapshotSummary>)>> {
                let Some(id) = paths::id_of(&e.path) else {
                    return Ok(None);
                };
                let id = SnapshotId(id);
                let bytes = match cached.then(|| self.cached_snapshot(&id)).flatten() {
                    Some(b) => b,
                    None => match custos_storage::get_listed(
                        &*self.storage,
                        e,
                        SNAPSHOT_MAX,
                        "snapshot",
                    ) {
                        Ok(b) => {
                            self.cache_snapshot(&id, &b);
                            b
                        }
                        Err(err) if err.kind == Kind::NotFound => return Ok(None),
                        Err(err) if err.kind == Kind::Integrity => return Ok(Some((id, Err(err)))),
                        Err(err) => return Err(err),
                    },
                };
                Ok(Some((
                    id,
                    snapshot::decode_summary(&self.keys, &id, &bytes),
                )))
            },
        )?;
        self.forget_cached_snapshots(&listed);
        let mut damaged = vec![];
        for (id, r) in all.into_iter().flatten() {
            match r {
                Ok(summary) => out.push(Snapshot { id, summary }),
                Err(e) => damaged.push((id, e)),
            }
        }
        out.sort_by(|a, b| a.summary.time.cmp(&b.summary.time).then(a.id.cmp(&b.id)));
        damaged.sort_by_key(|d| d.0);
        // Rewritten when a snapshot was decoded for the first time or one went.
        if cached && (out.len() > from_known || from_known < was_known) {
            self.keep_summaries(&out);
        }
        Ok((out, damaged))
    }

    /// Where this host keeps the summaries of the snapshots it has decoded, in one file:
    /// a listing after years of history (the seed keeps over 50,000 snapshots) then reads
    /// one file, not one per snapshot. Sealed with a key derived from the meta key, so the
    /// file tells nothing to whoever reads the cache folder, and whoever writes there
    /// cannot make this host believe a summary: a file that does not open is not used.
    /// Summaries never change (a snapshot's name is the hash of its bytes), and only those
    /// of snapshots the listing holds are taken from it.
    fn summaries_file(&self) -> Option<std::path::PathBuf> {
        Some(self.snapshot_cache()?.with_file_name("summaries"))
    }

    fn summaries_key(&self) -> ([u8; 32], Vec<u8>) {
        let key = blake3::derive_key("custos summary cache v1", self.keys.meta_key.as_ref());
        (
            key,
            [SUMMARIES_AAD, self.config.id.to_hex().as_bytes()].concat(),
        )
    }

    fn kept_summaries(&self) -> HashMap<SnapshotId, SnapshotSummary> {
        let read = || -> Option<HashMap<SnapshotId, SnapshotSummary>> {
            let f = std::fs::File::open(self.summaries_file()?).ok()?;
            if f.metadata().ok()?.len() > SNAPSHOT_MAX {
                return None;
            }
            let mut b = vec![];
            std::io::Read::read_to_end(&mut &f, &mut b).ok()?;
            let (key, aad) = self.summaries_key();
            let plain = aead::open(&key, &aad, &b, "this host's snapshot summaries").ok()?;
            // Read as a map at once: not a list and then a map of it (both at once).
            let mut all: HashMap<SnapshotId, SnapshotSummary> =
                from_zjson(&plain, "this host's snapshot summaries").ok()?;
            all.retain(|_, s| snapshot::check_summary("", s).is_ok());
            Some(all)
        };
        read().unwrap_or_default()
    }

    /// Best effort: without the file, the next listing reads the snapshots' copies.
    fn keep_summaries(&self, all: &[Snapshot]) {
        let Some(path) = self.summaries_file() else {
            return;
        };
        let pairs: HashMap<&SnapshotId, &SnapshotSummary> =
            all.iter().map(|s| (&s.id, &s.summary)).collect();
        let json = serde_json::to_vec(&pairs).expect("serializable");
        // Past what a reader decompresses (some 400,000 snapshots), no file: one that
        // could not be read back would be rewritten at every listing.
        if json.len() as u64 > crate::format::ZJSON_LIMIT {
            let _ = std::fs::remove_file(&path);
            return;
        }
        let z = zstd::bulk::compress(&json, 1).expect("zstd compress in memory");
        drop(json);
        let (key, aad) = self.summaries_key();
        let sealed = aead::seal(&key, &aad, &z);
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            let dir = path.parent().expect("in a folder");
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            let mut rnd = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut rnd);
            let tmp = dir.join(format!(".summaries-{}", hex::encode(rnd)));
            std::io::Write::write_all(
                &mut std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?,
                &sealed,
            )?;
            std::fs::rename(&tmp, &path).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
        };
        if let Err(e) = write() {
            tracing::debug!("snapshot summaries not kept in the cache folder: {e}");
        }
    }

    /// Where this host keeps copies of the snapshot objects it has read. They never change
    /// (a name is the BLAKE3 of the bytes), so a listing fetches only those it has not
    /// seen: after years of history, thousands of GETs fewer for every backup (its
    /// parent), `restore latest` and `snapshots`. A copy is used only when its bytes still
    /// hash to its name, so the folder adds no trust (and it is used only when it passes
    /// the cache folder's checks).
    fn snapshot_cache(&self) -> Option<std::path::PathBuf> {
        Some(self.host_cache()?.join("snapshots"))
    }

    /// This host's folder for this repository, inside its cache folder.
    pub(crate) fn host_cache(&self) -> Option<std::path::PathBuf> {
        let dir = self.opts.cache_dir.as_ref()?;
        Some(dir.join(self.config.id.to_hex()))
    }

    fn cached_snapshot(&self, id: &SnapshotId) -> Option<Vec<u8>> {
        let p = self.snapshot_cache()?.join(id.to_hex());
        let f = std::fs::File::open(&p).ok()?;
        if f.metadata().ok()?.len() > SNAPSHOT_MAX {
            return None;
        }
        let mut b = vec![];
        std::io::Read::read_to_end(&mut &f, &mut b).ok()?;
        if custos_model::Id::of_bytes(&b) != id.0 {
            let _ = std::fs::remove_file(&p);
            return None;
        }
        Some(b)
    }

    /// Best effort: a copy that cannot be written is fetched again next time.
    fn cache_snapshot(&self, id: &SnapshotId, bytes: &[u8]) {
        let Some(dir) = self.snapshot_cache() else {
            return;
        };
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            let mut rnd = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut rnd);
            let tmp = dir.join(format!(".tmp-{}", hex::encode(rnd)));
            // Ciphertext, but no reader but this user needs it.
            std::io::Write::write_all(
                &mut std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?,
                bytes,
            )?;
            std::fs::rename(&tmp, dir.join(id.to_hex())).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
        };
        if let Err(e) = write() {
            tracing::debug!("snapshot {} not kept in the cache folder: {e}", id.short());
        }
    }

    /// Drops the copies of snapshots the listing no longer holds (forgotten).
    fn forget_cached_snapshots(&self, listed: &[custos_storage::Entry]) {
        let Some(dir) = self.snapshot_cache() else {
            return;
        };
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let keep: HashSet<&str> = listed
            .iter()
            .filter_map(|e| e.path.rsplit('/').next())
            .collect();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for f in rd.flatten() {
            let name = f.file_name();
            let Some(n) = name.to_str() else { continue };
            // Another process's copy on its way in, unless it was left an hour ago.
            let in_flight = n.starts_with(".tmp-")
                && f.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t > hour_ago);
            if !keep.contains(n) && !in_flight {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }

    /// Resolves `latest` (the newest snapshot that `filter` accepts) or an id prefix (at
    /// least 4 hex digits; the filter does not apply to an explicit id).
    pub fn find_snapshot(
        &self,
        spec: &str,
        filter: impl Fn(&SnapshotSummary) -> bool,
    ) -> Result<Snapshot> {
        let (candidates, damaged) = self.snapshots_checked()?;
        if spec == "latest" {
            // An unreadable snapshot may be the newest: say so, since `latest` then means
            // the newest of the rest.
            for (id, e) in &damaged {
                warn_unreadable(id, e);
            }
            return candidates.into_iter().filter(|s| filter(&s.summary)).last().ok_or_else(|| {
                Error::new(Kind::NotFound, "no snapshot matches `latest` for this command and source")
                    .hint("`custos snapshots` lists what exists; run a backup first or give a snapshot id")
            });
        }
        match by_prefix(spec, candidates, damaged)? {
            Ok(s) => Ok(s),
            Err((id, e)) => Err(unreadable_snapshot(&id, e, false)),
        }
    }

    /// The id `spec` names (`latest`, or a prefix of at least 4 hex digits), whether or
    /// not that snapshot decodes: for `forget`, which must be able to remove an
    /// unreadable one.
    pub fn resolve_snapshot(&self, spec: &str) -> Result<SnapshotId> {
        if spec == "latest" {
            return self.find_snapshot(spec, |_| true).map(|s| s.id);
        }
        let (candidates, damaged) = self.snapshots_checked()?;
        Ok(match by_prefix(spec, candidates, damaged)? {
            Ok(s) => s.id,
            Err((id, _)) => id,
        })
    }

    pub fn snapshot_body(&self, id: &SnapshotId) -> Result<SnapshotBody> {
        self.require_restore("read the contents of a snapshot")?;
        let bytes = match self.cached_snapshot(id) {
            Some(b) => b,
            None => custos_storage::get_bounded(
                &*self.storage,
                &paths::snapshot(id),
                SNAPSHOT_MAX,
                "snapshot",
            )
            .map_err(|e| missing_as_integrity(e, "snapshot"))?,
        };
        snapshot::decode_body_with(&self.keys, id, &bytes, || {
            self.rewrapped_key(&paths::snapshot(id))
        })
    }
}

/// Why snapshot `id` cannot be used, and what to do: `blocking` for commands that stop on
/// it (they delete or rewrap), not for one asked for by its id.
fn unreadable_snapshot(id: &SnapshotId, e: Error, blocking: bool) -> Error {
    let message = if blocking {
        format!(
            "{} (commands that delete or rewrap data stop until it is dealt with; restores of other snapshots still work)",
            e.message
        )
    } else {
        e.message
    };
    Error {
        kind: e.kind,
        message,
        hint: Some(format!(
            "`custos verify` names every unreadable snapshot; a secondary may hold a good copy of it; once it is examined, `custos forget {}` removes it",
            id.short()
        )),
    }
}

fn warn_unreadable(id: &SnapshotId, e: &Error) {
    tracing::warn!(
        "snapshot {} cannot be read and is left out: {} (`custos verify` names every unreadable snapshot; `custos forget {}` removes one once it is examined)",
        id.short(),
        e.message,
        id.short()
    );
}

/// Seals `keys` under `password` into a new key file and stores it (create-only).
fn store_key_file(
    storage: &DynStorage,
    keys: &MasterKeys,
    repo: RepoId,
    password: &[u8],
    kdf: KdfParams,
    opts: &OpenOptions,
) -> Result<KeyFile> {
    let origin = Origin {
        host: opts.host.clone(),
        user: opts.user.clone(),
    };
    let kf = KeyFile::seal(keys, repo, password, kdf, &origin)?;
    let json = serde_json::to_vec_pretty(&kf).expect("serializable");
    storage.put(&paths::key(&kf.id), &json, PutMode::CreateOnly)?;
    Ok(kf)
}

/// The snapshot whose id starts with `spec` (at least 4 hex digits), readable or not.
fn by_prefix(
    spec: &str,
    readable: Vec<Snapshot>,
    unreadable: DamagedSnapshots,
) -> Result<std::result::Result<Snapshot, (SnapshotId, Error)>> {
    if spec.len() < 4 {
        return Err(Error::config(format!(
            "snapshot id `{spec}` is too short; give at least 4 hex digits"
        )));
    }
    let all = readable
        .into_iter()
        .map(Ok)
        .chain(unreadable.into_iter().map(Err))
        .collect();
    resolve_prefix(
        all,
        spec,
        |s| match s {
            Ok(s) => s.id.to_hex(),
            Err((id, _)) => id.to_hex(),
        },
        "snapshot",
        "`custos snapshots` lists them",
    )
}

/// The one item whose hex id starts with `prefix`.
fn resolve_prefix<T>(
    items: Vec<T>,
    prefix: &str,
    hex: impl Fn(&T) -> String,
    what: &str,
    hint: &str,
) -> Result<T> {
    let mut m: Vec<T> = items
        .into_iter()
        .filter(|i| hex(i).starts_with(prefix))
        .collect();
    match m.len() {
        1 => Ok(m.remove(0)),
        0 => Err(Error::new(Kind::NotFound, format!("no {what} with id {prefix}")).hint(hint)),
        _ => Err(Error::config(format!(
            "{what} id prefix {prefix} is ambiguous; give more digits"
        ))),
    }
}

fn missing_as_integrity(e: Error, what: &str) -> Error {
    if e.kind == Kind::NotFound {
        Error::integrity(format!("a {what} object is missing: {}", e.message))
    } else {
        e
    }
}

/// Runs `f` over `items` on up to `threads` threads, keeping order; first error wins.
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let threads = threads.max(1).min(items.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<R>>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                let failed = r.is_err();
                *results[i].lock().unwrap() = Some(r);
                if failed {
                    next.store(items.len(), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(items.len());
    for r in results {
        match r.into_inner().unwrap() {
            Some(Ok(v)) => out.push(v),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    Ok(out)
}

/// Index objects of at most [`INDEX_OBJECT_BLOBS`] blobs each, written as packs are added
/// (a pack is never split; its damaged copies go with it), so no object is too large to
/// read whatever the repository's size, and what prune, compaction or a re-wrap rewrites
/// is never held whole.
pub struct IndexObjects<'a> {
    repo: &'a Repository,
    part: IndexFile,
    blobs: usize,
    written: Vec<IndexId>,
}

impl IndexObjects<'_> {
    /// Adds a pack, and the chunks whose copy in it is damaged.
    pub fn push(&mut self, p: IndexPack, bad: Vec<ChunkId>) -> Result<()> {
        if self.blobs > 0 && self.blobs + p.blobs.len() > INDEX_OBJECT_BLOBS {
            let part = std::mem::take(&mut self.part);
            self.written.push(self.repo.write_index_file(part)?);
            self.blobs = 0;
        }
        self.blobs += p.blobs.len();
        self.part.bad.extend(bad.into_iter().map(|c| (p.id, c)));
        self.part.packs.push(p);
        Ok(())
    }

    /// Writes what is left, with `bad` (damaged copies in packs not listed here), and
    /// returns every object written.
    pub fn finish(mut self, bad: Vec<(PackId, ChunkId)>) -> Result<Vec<IndexId>> {
        self.part.bad.extend(bad);
        if !self.part.packs.is_empty() || !self.part.bad.is_empty() {
            let part = std::mem::take(&mut self.part);
            self.written.push(self.repo.write_index_file(part)?);
        }
        Ok(self.written)
    }
}
