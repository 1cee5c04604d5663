//! The operation trail: one write-once object per operation, `audit/<seq>` (16 hex
//! digits), hash-chained and signed.
//!
//! ```text
//! {"version": 1, "seq": 7, "prev": "<hex BLAKE3 of the bytes of audit/<seq-1>, zeros for 1>",
//!  "key": "<key id>", "entry": "<base64 AES-256-GCM(meta_key, AAD = "custos trail v1" || seq, JSON)>",
//!  "sig": "<base64 Ed25519 over "custos trail v1" || seq (u64 LE) || prev (32) || key id (32) || entry>"}
//! ```
//!
//! An entry is appended by creating `audit/<last + 1>` create-only: two writers racing for
//! the same number cannot both succeed, and the loser appends after the winner, so the
//! chain never forks; its time is never earlier than the entry before it. A key's signing
//! key is introduced in the trail by the entry that created the key (signed by the key
//! that created it; the first entry, `init`, introduces itself), so removed keys' entries
//! stay verifiable and a forged signer is unknown. Key files' `trail_signer` is
//! informational only: storage could be written by anyone. Every role holds the meta key,
//! so every role could seal an entry saying anything: verification therefore trusts no
//! claim an entry makes about itself that its signature does not back. The key and role
//! inside must be the signer's, only the operation that creates a key may introduce it,
//! once, and only a key allowed to create it; a removed or replaced key signs nothing
//! after; times do not go backwards.

use chrono::{DateTime, Utc};
use custos_crypto::{aead, sign};
use custos_model::{Error, KeyId, Kind, Result};
use custos_storage::{PutMode, PutOutcome};
use serde::{Deserialize, Serialize};

use crate::format::b64;
use crate::Repository;

pub const DIR: &str = "audit";
const DOMAIN: &[u8] = b"custos trail v1";

/// What one operation did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub time: DateTime<Utc>,
    pub role: String,
    pub key: KeyId,
    pub host: String,
    pub user: String,
    /// The command, like `backup postgres` or `restore files`.
    pub command: String,
    /// What it touched: snapshot ids, counts, bytes.
    #[serde(default)]
    pub touched: serde_json::Value,
    /// `ok`, or the error code and message.
    pub result: String,
    /// A key this operation created, with its trail signing key (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introduces: Option<(KeyId, String)>,
    /// The role of the key `introduces` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introduces_role: Option<String>,
    /// `init` only: the repository's trail authority (hex Ed25519), which signs the entry
    /// of a key rebuilt from shares (`key recover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    seq: u64,
    prev: String,
    key: KeyId,
    #[serde(with = "b64")]
    entry: Vec<u8>,
    #[serde(with = "b64")]
    sig: Vec<u8>,
}

pub fn path(seq: u64) -> String {
    format!("{DIR}/{seq:016x}")
}

fn signed_bytes(seq: u64, prev: &[u8; 32], key: &KeyId, entry: &[u8]) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(prev);
    m.extend_from_slice(&key.0 .0);
    m.extend_from_slice(entry);
    m
}

fn entry_aad(seq: u64) -> Vec<u8> {
    let mut a = DOMAIN.to_vec();
    a.extend_from_slice(&seq.to_le_bytes());
    a
}

/// One entry as read back, with what verification found.
#[derive(Debug, Clone, Serialize)]
pub struct Read {
    pub seq: u64,
    pub entry: Option<Entry>,
    /// Empty when the entry is intact and in place.
    pub problems: Vec<String>,
}

impl Repository {
    /// Sequence numbers present in the trail, ascending.
    fn trail_seqs(&self) -> Result<Vec<u64>> {
        seqs_in(&self.storage)
    }

    /// What appending needs, detached from the repository (the CLI appends after a
    /// command, whatever became of it).
    pub fn trail_writer(&self) -> TrailWriter {
        TrailWriter {
            storage: self.storage.clone(),
            meta_key: self.keys.meta_key.clone(),
            seed: self.keys.sign_seed.clone(),
            key_id: self.key_id,
            hint: None,
        }
    }

    pub fn trail_append(&self, entry: &Entry) -> Result<u64> {
        self.trail_writer().append(entry)
    }

    /// A writer that signs as the repository's trail authority (restore keys hold it):
    /// for the entry of a key rebuilt from shares, which no existing key can vouch for.
    pub fn trail_writer_as_authority(&self) -> TrailWriter {
        TrailWriter {
            seed: self.keys.authority.clone(),
            ..self.trail_writer()
        }
    }

    /// The public half of the trail authority, for the `init` entry.
    pub fn trail_authority(&self) -> Option<String> {
        self.keys
            .authority
            .as_ref()
            .map(|s| hex::encode(sign::public_of(s)))
    }
}

pub struct TrailWriter {
    storage: custos_storage::DynStorage,
    meta_key: zeroize::Zeroizing<[u8; 32]>,
    seed: Option<zeroize::Zeroizing<[u8; 32]>>,
    key_id: KeyId,
    /// A local file remembering the last sequence number this host wrote or saw.
    hint: Option<std::path::PathBuf>,
}

fn seqs_in(storage: &custos_storage::DynStorage) -> Result<Vec<u64>> {
    crate::numbered_objects(storage, DIR, 16)
}

impl TrailWriter {
    /// The time of a stored entry, when it reads.
    fn time_of(&self, bytes: &[u8], seq: u64) -> Option<DateTime<Utc>> {
        let stored: Stored = serde_json::from_slice(bytes).ok()?;
        let plain = aead::open(
            &self.meta_key,
            &entry_aad(seq),
            &stored.entry,
            "trail entry",
        )
        .ok()?;
        serde_json::from_slice::<Entry>(&plain).ok().map(|e| e.time)
    }

    /// The same writer appending to the trail in another storage: operations run against
    /// a secondary copy are recorded in the primary's trail (the secondary's is a copy).
    pub fn on(mut self, storage: custos_storage::DynStorage) -> TrailWriter {
        self.storage = storage;
        self
    }

    /// Remembers the trail's end in `path` (a file in the local cache), so an append
    /// finds the end with two lookups instead of listing the whole trail.
    pub fn with_hint(mut self, path: std::path::PathBuf) -> TrailWriter {
        self.hint = Some(path);
        self
    }

    /// The last sequence number: from the hint when it is still the end (it exists and
    /// nothing follows it), else by listing.
    fn last_seq(&self) -> Result<u64> {
        let hinted = self
            .hint
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|h| *h > 0);
        if let Some(h) = hinted {
            if self.storage.size(&path(h))?.is_some() && self.storage.size(&path(h + 1))?.is_none()
            {
                return Ok(h);
            }
        }
        Ok(seqs_in(&self.storage)?.last().copied().unwrap_or(0))
    }

    fn remember(&self, seq: u64) {
        if let Some(p) = &self.hint {
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, seq.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }

    /// Appends an entry; returns its sequence number. Keys without a signing key (made
    /// before the trail existed) cannot append.
    pub fn append(&self, entry: &Entry) -> Result<u64> {
        let seed = self.seed.as_ref().ok_or_else(|| {
            Error::new(
                Kind::Permission,
                format!("key {} has no trail signing key", self.key_id.short()),
            )
            .hint("keys made before the operation trail cannot sign it: add a new key and remove this one")
        })?;
        let mut last = self.last_seq()?;
        for _ in 0..1000 {
            let seq = last + 1;
            let mut entry = entry.clone();
            let prev: [u8; 32] = if last == 0 {
                [0u8; 32]
            } else {
                let bytes = self.storage.get(&path(last))?;
                // Hosts' clocks differ: an entry is never dated before the one it follows,
                // so that a verifier can hold every entry to that.
                if let Some(t) = self.time_of(&bytes, last) {
                    entry.time = entry.time.max(t);
                }
                *blake3::hash(&bytes).as_bytes()
            };
            let plain = serde_json::to_vec(&entry).expect("serializable");
            let sealed = aead::seal(&self.meta_key, &entry_aad(seq), &plain);
            let sig = sign::sign(seed, &signed_bytes(seq, &prev, &self.key_id, &sealed));
            let stored = Stored {
                version: 1,
                seq,
                prev: hex::encode(prev),
                key: self.key_id,
                entry: sealed,
                sig: sig.to_vec(),
            };
            let bytes = serde_json::to_vec(&stored).expect("serializable");
            match self.storage.put(&path(seq), &bytes, PutMode::CreateOnly)? {
                PutOutcome::Created => {
                    self.remember(seq);
                    return Ok(seq);
                }
                // Another writer took this number: chain after it.
                PutOutcome::AlreadyExists => last = seq,
            }
        }
        Err(Error::new(
            Kind::Storage,
            "could not append to the operation trail after 1000 attempts",
        ))
    }
}

impl Repository {
    /// The newest entry, read from the end of the trail, that `f` accepts and whose
    /// signature verifies with the signing key a present key file of `role` names; at
    /// most `limit` entries are read. For decisions that may only rely on what a key of
    /// that role did (forget's retention interlock trusts only a restore key's verify).
    /// Key files are not trail-authenticated here: `custos audit verify` proves the
    /// signer was introduced by the trail.
    pub fn trail_newest(
        &self,
        role: custos_crypto::Role,
        limit: usize,
        mut f: impl FnMut(&Entry) -> bool,
    ) -> Result<Option<(u64, Entry)>> {
        let signers: std::collections::HashMap<KeyId, [u8; 32]> = Self::key_files(&self.storage)?
            .into_iter()
            .filter(|k| k.role == role)
            .filter_map(|k| {
                let p = hex::decode(k.sign_public.as_ref()?).ok()?;
                Some((k.id, p.try_into().ok()?))
            })
            .collect();
        for seq in self.trail_seqs()?.into_iter().rev().take(limit) {
            let bytes = self.storage.get(&path(seq))?;
            let Ok(stored) = serde_json::from_slice::<Stored>(&bytes) else {
                continue;
            };
            let Some(public) = signers.get(&stored.key) else {
                continue;
            };
            let Ok(prev) = hex::decode(&stored.prev).map(<[u8; 32]>::try_from) else {
                continue;
            };
            let Ok(prev) = prev else { continue };
            if !sign::verify(
                public,
                &signed_bytes(seq, &prev, &stored.key, &stored.entry),
                &stored.sig,
            ) {
                continue;
            }
            let Ok(plain) = aead::open(
                &self.keys.meta_key,
                &entry_aad(seq),
                &stored.entry,
                "trail entry",
            ) else {
                continue;
            };
            let Ok(entry) = serde_json::from_slice::<Entry>(&plain) else {
                continue;
            };
            if f(&entry) {
                return Ok(Some((seq, entry)));
            }
        }
        Ok(None)
    }
}

/// A key the trail introduced: its signing key, its role, and the entry after which it
/// signs nothing (removed, or replaced by a new password's key file).
struct Signer {
    public: [u8; 32],
    /// None for a key introduced by an entry written before roles were recorded.
    role: Option<String>,
    retired: Option<u64>,
}

/// The commands that create a key, and so may introduce one.
const CREATES_KEYS: [&str; 4] = ["init", "key add", "key passwd", "key recover"];

impl Repository {
    /// Reads and checks the whole trail: each entry in place, chained to the one before,
    /// signed by a key the trail introduced, saying only what its signer may say. Returns
    /// every entry with its problems.
    pub fn trail_verify(&self) -> Result<Vec<Read>> {
        let seqs = self.trail_seqs()?;
        let mut signers: std::collections::HashMap<KeyId, Signer> = Default::default();
        let mut out = vec![];
        let mut prev_hash = [0u8; 32];
        let mut expected = 1u64;
        let mut authority: Option<[u8; 32]> = None;
        let mut last_time: Option<DateTime<Utc>> = None;
        for seq in seqs {
            let mut problems = vec![];
            if seq != expected {
                problems.push(if seq > expected {
                    format!(
                        "entries {expected}..{} are missing (removed from the trail)",
                        seq - 1
                    )
                } else {
                    format!("sequence number {seq} out of order")
                });
            }
            expected = seq + 1;
            let bytes = match self.storage.get(&path(seq)) {
                Ok(b) => b,
                Err(e) => {
                    out.push(Read {
                        seq,
                        entry: None,
                        problems: vec![format!("unreadable: {}", e.message)],
                    });
                    continue;
                }
            };
            let this_hash = *blake3::hash(&bytes).as_bytes();
            let stored: Stored = match serde_json::from_slice(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(format!("malformed: {e}"));
                    out.push(Read {
                        seq,
                        entry: None,
                        problems,
                    });
                    prev_hash = this_hash;
                    continue;
                }
            };
            if stored.seq != seq {
                problems.push(format!(
                    "holds entry {} under number {seq} (moved or reordered)",
                    stored.seq
                ));
            }
            if stored.prev != hex::encode(prev_hash) {
                problems.push(
                    "does not chain to the entry before it (that entry was altered, removed or reordered)"
                        .into(),
                );
            }
            let entry: Option<Entry> = aead::open(
                &self.keys.meta_key,
                &entry_aad(stored.seq),
                &stored.entry,
                "trail entry",
            )
            .ok()
            .and_then(|p| serde_json::from_slice(&p).ok());
            if entry.is_none() {
                problems.push("its content does not authenticate (altered)".into());
            }
            let first = signers.is_empty() && seq == 1;
            if first {
                // The first entry (`init`) introduces its own signer and names the authority.
                if let Some(e) = entry.as_ref().filter(|e| e.command == "init") {
                    if let Some((id, public)) = &e.introduces {
                        if let (true, Some(p)) = (*id == stored.key, parse_public(public)) {
                            signers.insert(
                                *id,
                                Signer {
                                    public: p,
                                    role: Some("restore".into()),
                                    retired: None,
                                },
                            );
                        }
                    }
                    authority = e.authority.as_deref().and_then(parse_public);
                }
            }
            // Only the trail vouches for signers: a key file's `trail_signer` is plain text
            // that anyone with write access to storage could have put there. A key rebuilt
            // from shares is vouched for by the repository's authority, which init named.
            let msg = signed_bytes(
                stored.seq,
                &unhex32(&stored.prev),
                &stored.key,
                &stored.entry,
            );
            let mut by_authority = false;
            let signer_role: Option<String> = match signers.get(&stored.key) {
                Some(s) => {
                    if !sign::verify(&s.public, &msg, &stored.sig) {
                        problems.push(format!(
                            "signature of key {} does not verify (altered or forged)",
                            stored.key.short()
                        ));
                    }
                    if let Some(at) = s.retired {
                        problems.push(format!(
                            "signed by key {} after entry {at} removed or replaced it (forged with a retired key)",
                            stored.key.short()
                        ));
                    }
                    s.role.clone()
                }
                None if authority.is_some_and(|a| sign::verify(&a, &msg, &stored.sig)) => {
                    // The authority vouches only for a key rebuilt from shares, in the
                    // entry that adds it.
                    let recover = entry.as_ref().is_some_and(|e| {
                        e.command == "key recover"
                            && e.introduces
                                .as_ref()
                                .is_some_and(|(id, _)| *id == stored.key)
                    });
                    if !recover {
                        problems.push(
                            "signed by the repository's authority, which signs only `key recover`"
                                .into(),
                        );
                    }
                    by_authority = true;
                    Some("restore".into())
                }
                None => {
                    problems.push(format!(
                        "signed by key {}, which the trail never introduced (forged)",
                        stored.key.short()
                    ));
                    None
                }
            };
            if let Some(e) = &entry {
                if e.key != stored.key {
                    problems.push(format!(
                        "says it is by key {} but is signed by key {} (forged)",
                        e.key.short(),
                        stored.key.short()
                    ));
                }
                if let Some(r) = signer_role.as_ref().filter(|r| **r != e.role) {
                    problems.push(format!(
                        "says it is by a {} key but key {} is a {r} key (forged)",
                        e.role,
                        stored.key.short()
                    ));
                }
                if let Some(t) = last_time.filter(|t| e.time < *t) {
                    problems.push(format!(
                        "dated {}, before the entry before it ({t}): times never go backwards",
                        e.time
                    ));
                }
                last_time = Some(last_time.map_or(e.time, |t| t.max(e.time)));
                if let Some((id, _)) = &e.introduces {
                    let may = CREATES_KEYS.contains(&e.command.as_str())
                        && e.result == "ok"
                        && match e.command.as_str() {
                            "init" => first,
                            "key recover" => by_authority,
                            // Only restore keys create keys; any key replaces its own file.
                            "key add" => signer_role.as_deref().is_none_or(|r| r == "restore"),
                            _ => true,
                        };
                    if !may {
                        problems.push(format!(
                            "introduces key {} though `{}` by a {} key cannot create one (forged)",
                            id.short(),
                            e.command,
                            signer_role.as_deref().unwrap_or("unknown")
                        ));
                    } else if signers.contains_key(id) && !(first && *id == stored.key) {
                        problems.push(format!(
                            "introduces key {} again (a key is introduced once, by the entry that created it)",
                            id.short()
                        ));
                    }
                }
            }
            if problems.is_empty() {
                let e = entry.as_ref().expect("no problems: the entry read");
                if let Some((id, public)) = e.introduces.clone() {
                    let role = match e.command.as_str() {
                        "init" | "key recover" => Some("restore".to_string()),
                        "key passwd" => signer_role.clone(),
                        _ => e
                            .introduces_role
                            .clone()
                            .or_else(|| e.touched["role"].as_str().map(str::to_string)),
                    };
                    if let (false, Some(p)) = (first, parse_public(&public)) {
                        signers.insert(
                            id,
                            Signer {
                                public: p,
                                role,
                                retired: None,
                            },
                        );
                    }
                }
                // A removed key, or the key file a new password replaced, signs no more.
                let retire = match (e.command.as_str(), e.result.as_str()) {
                    ("key remove", "ok") => e.touched["key"]
                        .as_str()
                        .and_then(|k| serde_json::from_value(k.into()).ok()),
                    ("key passwd", "ok") => Some(stored.key),
                    _ => None,
                };
                if let Some(s) = retire.and_then(|k: KeyId| signers.get_mut(&k)) {
                    s.retired.get_or_insert(seq);
                }
            }
            prev_hash = this_hash;
            out.push(Read {
                seq,
                entry,
                problems,
            });
        }
        Ok(out)
    }
}

fn parse_public(h: &str) -> Option<[u8; 32]> {
    hex::decode(h).ok()?.try_into().ok()
}

fn unhex32(h: &str) -> [u8; 32] {
    parse_public(h).unwrap_or([0u8; 32])
}
