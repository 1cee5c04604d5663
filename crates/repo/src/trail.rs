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
/// Where appenders leave the last sequence number they wrote: a hint only (format.md 11).
pub const HINT: &str = "hints/trail";

/// The largest trail entry read whole. An entry is a few hundred bytes; `forget`'s lists the
/// snapshots it removed (70 bytes each, so a first forget of years of hourly backups is a
/// few MB). A larger object in the trail's place is damaged: it is reported, and hashed in
/// pieces for the entry after it, never held whole.
pub const ENTRY_MAX: u64 = 64 << 20;

/// Entry `seq`'s stored bytes; an integrity error when the object is larger than
/// [`ENTRY_MAX`], `NotFound` when there is none.
pub fn read_entry(storage: &dyn custos_storage::Storage, seq: u64) -> Result<Vec<u8>> {
    custos_storage::get_bounded(storage, &path(seq), ENTRY_MAX, "trail entry")
}

/// The BLAKE3 hash of entry `seq`'s stored bytes (what the next entry chains to), with the
/// bytes when they are of a size custos writes. An object larger than that (anyone who can
/// write the trail's next number can plant one) is hashed in pieces of 16 MiB: chaining
/// to it costs reading it once, never memory of its size.
pub fn hash_entry(
    storage: &dyn custos_storage::Storage,
    seq: u64,
) -> Result<(blake3::Hash, Option<Vec<u8>>)> {
    let p = path(seq);
    let first = storage.get_prefix(&p, ENTRY_MAX + 1)?;
    if first.len() as u64 <= ENTRY_MAX {
        return Ok((blake3::hash(&first), Some(first)));
    }
    let mut h = blake3::Hasher::new();
    h.update(&first);
    let mut at = first.len() as u64;
    drop(first);
    let size = storage
        .size(&p)?
        .ok_or_else(|| Error::new(Kind::NotFound, format!("`{p}` went away while read")))?;
    while at < size {
        let n = (size - at).min(16 << 20);
        h.update(&storage.get_range(&p, at, n)?);
        at += n;
    }
    Ok((h.finalize(), None))
}
const DOMAIN: &[u8] = b"custos trail v1";

/// An entry of the trail as a witness records it: its number and the BLAKE3 of its bytes
/// (`SEQ:HASH`). A snapshot records the head it saw; `audit head` prints it;
/// `audit verify --expect-head` proves the trail still holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub seq: u64,
    /// Lowercase hex.
    pub hash: String,
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl std::str::FromStr for Anchor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Anchor> {
        let bad = || {
            Error::config(format!(
                "`{s}` is not a trail head: it is SEQ:HASH, as `custos audit head` prints it"
            ))
        };
        let (seq, hash) = s.trim().split_once(':').ok_or_else(bad)?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        let hash = hash.to_ascii_lowercase();
        if seq == 0 || hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Anchor { seq, hash })
    }
}

/// The number of the trail's last entry (0: empty), in a number of lookups that does not
/// grow with the trail: from `hint` (a number this host remembers) or the hint object
/// the last appender left, when that entry exists, else from 1, the next numbers are
/// probed at doubling distances until one is missing, then the gap is halved down to the
/// last present one. A correct hint costs two lookups; a stale one a few more; a forged
/// one (an entry that does not exist) falls back to the search from 1, about 2 log2(n)
/// lookups. The search assumes the numbers present are contiguous, as appends make
/// them: a hole is tampering, which `audit verify` reports (an append may then land in
/// the hole; the entry after it still does not chain, and says so).
pub fn find_last(storage: &custos_storage::DynStorage, hint: Option<u64>) -> Result<u64> {
    let exists = |n: u64| -> Result<bool> { Ok(storage.size(&path(n))?.is_some()) };
    let remote = || -> Option<u64> {
        let b = custos_storage::get_bounded(&**storage, HINT, 64, "trail head hint").ok()?;
        std::str::from_utf8(&b).ok()?.trim().parse().ok()
    };
    let mut start = None;
    if let Some(h) = hint.filter(|h| *h > 0) {
        if exists(h)? {
            start = Some(h);
        }
    }
    if start.is_none() {
        if let Some(h) = remote().filter(|h| *h > 0) {
            if exists(h)? {
                start = Some(h);
            }
        }
    }
    let mut lo = match start {
        Some(h) => h,
        None if exists(1)? => 1,
        None => return Ok(0),
    };
    let mut step = 1u64;
    let mut hi = loop {
        let probe = lo.saturating_add(step);
        if probe == lo || !exists(probe)? {
            break probe;
        }
        lo = probe;
        step = step.saturating_mul(2);
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if exists(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Fuzzing: a stored entry's JSON and an entry's plaintext JSON.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    if let Ok(s) = serde_json::from_slice::<Stored>(data) {
        let _ = hex::decode(&s.prev);
        let _ = signed_bytes(s.seq, &[0u8; 32], &s.key, &s.entry);
    }
    let _ = serde_json::from_slice::<Entry>(data);
    let _ = data
        .iter()
        .map(|b| *b as char)
        .collect::<String>()
        .parse::<Anchor>();
}

/// The trail's last entry as an anchor, `None` for an empty trail.
pub fn head_of(storage: &custos_storage::DynStorage, hint: Option<u64>) -> Result<Option<Anchor>> {
    let seq = find_last(storage, hint)?;
    if seq == 0 {
        return Ok(None);
    }
    let (hash, _) = hash_entry(&**storage, seq)?;
    Ok(Some(Anchor {
        seq,
        hash: hash.to_hex().to_string(),
    }))
}

/// What this host remembers of the trail: the last entry it wrote or accepted.
fn read_anchor(p: &std::path::Path) -> Option<(u64, Option<String>)> {
    let text = std::fs::read_to_string(p).ok()?;
    let mut parts = text.split_whitespace();
    let seq: u64 = parts.next()?.parse().ok()?;
    let hash = parts.next().map(str::to_string);
    (seq > 0).then_some((seq, hash))
}

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
    /// BLAKE3 of the stored bytes (hex); empty when unreadable.
    pub hash: String,
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

    /// The last sequence number ([`find_last`], from this host's memory of it).
    fn last_seq(&self) -> Result<u64> {
        let hinted = self.hint.as_deref().and_then(read_anchor).map(|(s, _)| s);
        find_last(&self.storage, hinted)
    }

    /// Remembers the entry this host just wrote (or accepted) as its anchor (unless
    /// `anchor` is false), and leaves its number as the hint for every appender (not on
    /// an Object Lock bucket: each overwrite there would be a version kept for the
    /// retention).
    fn remember(&self, seq: u64, hash: &[u8; 32], anchor: bool) {
        if let Some(p) = self.hint.as_ref().filter(|_| anchor) {
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, format!("{seq} {}", hex::encode(hash))).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
        if self.storage.object_lock().is_none() {
            let _ = self
                .storage
                .put(HINT, seq.to_string().as_bytes(), PutMode::Overwrite);
        }
    }

    /// The last entry this host wrote (or accepted), from its cache alone: what a WAL
    /// object's label records (`None` without a cache folder or before the first write).
    pub fn remembered(&self) -> Option<Anchor> {
        let (seq, hash) = read_anchor(self.hint.as_deref()?)?;
        format!("{seq}:{}", hash?).parse().ok()
    }

    /// The trail's head as it is now.
    pub fn head(&self) -> Result<Option<Anchor>> {
        head_of(
            &self.storage,
            self.hint.as_deref().and_then(read_anchor).map(|(s, _)| s),
        )
    }

    /// Refuses (exit 14) when the repository's trail no longer holds the entry this host
    /// last wrote: it ends before it, or that entry's bytes changed. Returns the head.
    pub fn check_anchor(&self) -> Result<Option<Anchor>> {
        let Some(p) = self.hint.as_deref() else {
            return self.head();
        };
        let Some((seq, hash)) = read_anchor(p) else {
            return self.head();
        };
        let head = self.head()?;
        let last = head.as_ref().map_or(0, |h| h.seq);
        let cut = || {
            Error::integrity(format!(
                "the operation trail of {} ends at entry {last}, but this host wrote entry {seq} to it: entries were removed (or the repository was restored from an older copy)",
                self.storage.location()
            ))
            .hint(format!(
                "nothing was done. Run `custos audit verify` and compare with a secondary's trail or a witnessed head; if the repository was restored from an older copy on purpose, `custos audit head --accept` makes this host go on from the trail as it is (and records that). This host's record: {}",
                p.display()
            ))
        };
        if last < seq {
            return Err(cut());
        }
        if let Some(h) = hash {
            let held = self.entry_is(seq, &h)?.ok_or_else(cut)?;
            if !held {
                return Err(Error::integrity(format!(
                    "entry {seq} of the operation trail of {} is not the one this host wrote: the trail was rewritten",
                    self.storage.location()
                ))
                .hint("nothing was done. Run `custos audit verify`; keep the repository as it is for investigation"));
            }
        }
        Ok(head)
    }

    /// Whether entry `seq` of the trail has the bytes whose hash is `hash` (`None`: there is
    /// no such entry).
    fn entry_is(&self, seq: u64, hash: &str) -> Result<Option<bool>> {
        match hash_entry(&*self.storage, seq) {
            Ok((h, _)) => Ok(Some(h.to_hex().as_str() == hash)),
            Err(e) if e.kind == Kind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes the trail as it is now this host's anchor (`audit head --accept`): for a
    /// repository restored from an older copy on purpose. Returns (was, now).
    pub fn accept_head(&self) -> Result<(Option<u64>, Option<Anchor>)> {
        let was = self.hint.as_deref().and_then(read_anchor).map(|(s, _)| s);
        let head = head_of(&self.storage, None)?;
        if let Some(p) = &self.hint {
            match &head {
                Some(h) => {
                    let mut b = [0u8; 32];
                    hex::decode_to_slice(&h.hash, &mut b)
                        .map_err(|e| Error::internal(e.to_string()))?;
                    self.remember(h.seq, &b, true);
                }
                None => {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        Ok((was, head))
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
        let record = self.hint.as_deref().and_then(read_anchor);
        let mut last = self.last_seq()?;
        // Whether the trail still holds the entry this host remembers, as it wrote it.
        // When it does not (the commands that may run on a trail cut short: `audit
        // verify`, `audit log`), the entry is still appended, but the host's record is
        // left as it is: an entry under a number that was cut must not become the
        // anchor that would let this host's next backup go on (`check_anchor`).
        let mut holds = match &record {
            Some((seq, Some(hash))) if *seq < last => {
                Some(self.entry_is(*seq, hash)? == Some(true))
            }
            Some((seq, Some(_))) if *seq > last => Some(false),
            Some((_, Some(_))) => None,
            _ => Some(true),
        };
        for _ in 0..1000 {
            let seq = last + 1;
            let mut entry = entry.clone();
            let prev: [u8; 32] = if last == 0 {
                [0u8; 32]
            } else {
                let (hash, bytes) = hash_entry(&*self.storage, last)?;
                if holds.is_none() {
                    // The record is the trail's last entry: its bytes are these.
                    let want = record.as_ref().and_then(|(_, h)| h.as_deref());
                    holds = Some(want == Some(hash.to_hex().as_str()));
                }
                // Hosts' clocks differ: an entry is never dated before the one it follows,
                // so that a verifier can hold every entry to that.
                if let Some(t) = bytes.and_then(|b| self.time_of(&b, last)) {
                    entry.time = entry.time.max(t);
                }
                *hash.as_bytes()
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
            match self.storage.create(&path(seq), &bytes)? {
                PutOutcome::Created => {
                    self.remember(seq, blake3::hash(&bytes).as_bytes(), holds != Some(false));
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
        // From the head down: never the whole trail.
        let last = find_last(&self.storage, None)?;
        for seq in (1..=last).rev().take(limit) {
            let bytes = match read_entry(&*self.storage, seq) {
                Ok(b) => b,
                Err(e) if matches!(e.kind, Kind::NotFound | Kind::Integrity) => continue,
                Err(e) => return Err(e),
            };
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
            let bytes = match read_entry(&*self.storage, seq) {
                Ok(b) => b,
                Err(e) => {
                    // One too large to read whole is still hashed (in pieces): the entry
                    // after it is checked against what is there.
                    let hash = (e.kind == Kind::Integrity)
                        .then(|| hash_entry(&*self.storage, seq).ok())
                        .flatten();
                    if let Some((h, _)) = hash {
                        prev_hash = *h.as_bytes();
                    }
                    out.push(Read {
                        seq,
                        hash: hash
                            .map(|(h, _)| h.to_hex().to_string())
                            .unwrap_or_default(),
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
                        hash: hex::encode(this_hash),
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
                hash: hex::encode(this_hash),
                entry,
                problems,
            });
        }
        Ok(out)
    }
}

impl Repository {
    /// The entries dated at or after `since`, up to the head. Times never go backwards
    /// along the trail (appends and `audit verify` hold every entry to that), so the
    /// first is found by halving: the cost grows with the period, not with the trail.
    /// Each is checked as far as a part of the trail can be: chained to the entry before
    /// it, decrypted, signed by a present key file's signing key. The full proof (who
    /// introduced each signer, nothing removed before) is `audit verify`.
    pub fn trail_since(&self, since: DateTime<Utc>) -> Result<Vec<Read>> {
        let last = find_last(&self.storage, None)?;
        let signers: std::collections::HashMap<KeyId, [u8; 32]> = Self::key_files(&self.storage)?
            .into_iter()
            .filter_map(|k| {
                let p = hex::decode(k.sign_public.as_ref()?).ok()?;
                Some((k.id, p.try_into().ok()?))
            })
            .collect();
        // None: no entry. Some(Err): one larger than any custos writes.
        type Got = Option<std::result::Result<Vec<u8>, Error>>;
        let get = |seq: u64| -> Result<Got> {
            match read_entry(&*self.storage, seq) {
                Ok(b) => Ok(Some(Ok(b))),
                Err(e) if e.kind == Kind::NotFound => Ok(None),
                Err(e) if e.kind == Kind::Integrity => Ok(Some(Err(e))),
                Err(e) => Err(e),
            }
        };
        let open = |seq: u64, bytes: &[u8]| -> Option<(Stored, Entry)> {
            let stored: Stored = serde_json::from_slice(bytes).ok()?;
            let plain = aead::open(
                &self.keys.meta_key,
                &entry_aad(seq),
                &stored.entry,
                "trail entry",
            )
            .ok()?;
            let e = serde_json::from_slice(&plain).ok()?;
            Some((stored, e))
        };
        // The first entry at or after `since`; an entry that does not read ends the
        // halving where it is (from there on everything is read and reported).
        let (mut lo, mut hi) = (1u64, last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match get(mid)?.and_then(|b| open(mid, &b.ok()?)) {
                Some((_, e)) if e.time >= since => hi = mid,
                Some(_) => lo = mid + 1,
                None => hi = mid,
            }
        }
        let mut prev: Option<[u8; 32]> = match lo {
            1 => Some([0u8; 32]),
            n => match hash_entry(&*self.storage, n - 1) {
                Ok((h, _)) => Some(*h.as_bytes()),
                Err(e) if e.kind == Kind::NotFound => None,
                Err(e) => return Err(e),
            },
        };
        let mut out = vec![];
        for seq in lo..=last {
            let bytes = match get(seq)? {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    prev = hash_entry(&*self.storage, seq)
                        .ok()
                        .map(|(h, _)| *h.as_bytes());
                    out.push(Read {
                        seq,
                        hash: prev.map(hex::encode).unwrap_or_default(),
                        entry: None,
                        problems: vec![e.message],
                    });
                    continue;
                }
                None => {
                    out.push(Read {
                        seq,
                        hash: String::new(),
                        entry: None,
                        problems: vec!["missing (removed from the trail)".into()],
                    });
                    prev = None;
                    continue;
                }
            };
            let hash = *blake3::hash(&bytes).as_bytes();
            let mut problems = vec![];
            let entry = match open(seq, &bytes) {
                None => {
                    problems.push("malformed, or its content does not authenticate".into());
                    None
                }
                Some((stored, e)) => {
                    if let Some(p) = prev {
                        if stored.prev != hex::encode(p) {
                            problems.push("does not chain to the entry before it".into());
                        }
                    }
                    let signed = hex::decode(&stored.prev)
                        .ok()
                        .and_then(|p| <[u8; 32]>::try_from(p).ok())
                        .zip(signers.get(&stored.key))
                        .is_some_and(|(p, public)| {
                            sign::verify(
                                public,
                                &signed_bytes(seq, &p, &stored.key, &stored.entry),
                                &stored.sig,
                            )
                        });
                    if !signed {
                        problems.push("not signed by a present key (`custos audit verify` checks removed keys too)".into());
                    }
                    (e.time >= since).then_some(e)
                }
            };
            prev = Some(hash);
            if entry.is_none() && problems.is_empty() {
                continue;
            }
            out.push(Read {
                seq,
                hash: hex::encode(hash),
                entry,
                problems,
            });
        }
        Ok(out)
    }

    /// What the anchors say about a trail read by [`Repository::trail_verify`]: every
    /// snapshot recorded the head it saw, and the trail must still hold that entry, with
    /// those bytes. One problem per snapshot whose anchor the trail no longer holds, and
    /// per anchor of `others` (what recorded it, the anchor: WAL objects' labels); with
    /// `lagging` (a secondary, whose trail is the primary's as of the last copy), an
    /// anchor of `others` past the trail's end is not one.
    pub fn trail_anchor_problems(
        &self,
        read: &[Read],
        others: &[(String, Anchor)],
        lagging: bool,
    ) -> Result<Vec<String>> {
        let by_seq: std::collections::HashMap<u64, &str> =
            read.iter().map(|r| (r.seq, r.hash.as_str())).collect();
        let last = read.last().map_or(0, |r| r.seq);
        let mut out = vec![];
        for s in self.snapshots_for_reading()? {
            let Some(a) = &s.summary.trail else { continue };
            match by_seq.get(&a.seq) {
                None => out.push(format!(
                    "snapshot {} ({}) saw the trail at entry {}, but the trail now ends at {last} or lacks it: entries were removed",
                    s.id.short(),
                    s.summary.time.format("%Y-%m-%d %H:%M:%S UTC"),
                    a.seq
                )),
                Some(h) if *h != a.hash => out.push(format!(
                    "snapshot {} ({}) saw entry {} of the trail with other bytes: the trail was rewritten",
                    s.id.short(),
                    s.summary.time.format("%Y-%m-%d %H:%M:%S UTC"),
                    a.seq
                )),
                Some(_) => {}
            }
        }
        for (what, a) in others {
            if lagging && a.seq > last {
                continue;
            }
            match by_seq.get(&a.seq) {
                None => out.push(format!(
                    "{what} records entry {} of the trail as written before it, but the trail now ends at {last} or lacks it: entries were removed",
                    a.seq
                )),
                Some(h) if *h != a.hash => out.push(format!(
                    "{what} records entry {} of the trail with other bytes: the trail was rewritten",
                    a.seq
                )),
                Some(_) => {}
            }
        }
        Ok(out)
    }

    /// A witnessed head (`audit verify --expect-head`): the trail must hold that entry
    /// with those bytes.
    pub fn trail_holds(&self, read: &[Read], a: &Anchor) -> Option<String> {
        match read.iter().find(|r| r.seq == a.seq) {
            None => Some(format!(
                "the trail does not hold entry {} (it ends at {}): it was cut short after {a} was witnessed",
                a.seq,
                read.last().map_or(0, |r| r.seq)
            )),
            Some(r) if r.hash != a.hash => Some(format!(
                "entry {} of the trail is not the one witnessed ({a}): the trail was rewritten",
                a.seq
            )),
            Some(_) => None,
        }
    }
}

fn parse_public(h: &str) -> Option<[u8; 32]> {
    hex::decode(h).ok()?.try_into().ok()
}

fn unhex32(h: &str) -> [u8; 32] {
    parse_public(h).unwrap_or([0u8; 32])
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_storage::{DynStorage, Entry as Listed, Storage};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A storage that counts lookups (`size`) and reads (`get`).
    struct Counting {
        inner: DynStorage,
        lookups: AtomicU64,
        reads: AtomicU64,
    }
    impl Storage for Counting {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn put(&self, p: &str, d: &[u8], m: PutMode) -> Result<PutOutcome> {
            self.inner.put(p, d, m)
        }
        fn get(&self, p: &str) -> Result<Vec<u8>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.get(p)
        }
        fn get_range(&self, p: &str, o: u64, l: u64) -> Result<Vec<u8>> {
            self.inner.get_range(p, o, l)
        }
        fn get_prefix(&self, p: &str, n: u64) -> Result<Vec<u8>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.get_prefix(p, n)
        }
        fn size(&self, p: &str) -> Result<Option<u64>> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            self.inner.size(p)
        }
        fn list(&self, d: &str) -> Result<Vec<Listed>> {
            panic!("finding the head lists `{d}`")
        }
        fn delete(&self, p: &str) -> Result<()> {
            self.inner.delete(p)
        }
    }

    fn trail(n: u64) -> (tempfile::TempDir, Arc<Counting>) {
        let dir = tempfile::tempdir().unwrap();
        let inner: DynStorage = Arc::new(custos_storage::local::LocalStorage::new(dir.path()));
        for seq in 1..=n {
            inner.put(&path(seq), b"{}", PutMode::CreateOnly).unwrap();
        }
        let c = Arc::new(Counting {
            inner,
            lookups: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        });
        (dir, c)
    }

    /// Lookups `find_last` made, and its answer.
    fn cost(c: &Arc<Counting>, hint: Option<u64>) -> (u64, u64) {
        c.lookups.store(0, Ordering::SeqCst);
        c.reads.store(0, Ordering::SeqCst);
        let s: DynStorage = c.clone();
        let last = find_last(&s, hint).unwrap();
        (
            last,
            c.lookups.load(Ordering::SeqCst) + c.reads.load(Ordering::SeqCst),
        )
    }

    #[test]
    fn the_head_costs_the_same_at_any_length_with_a_hint_and_log_without() {
        for n in [1u64, 40, 3000] {
            let (_d, c) = trail(n);
            // This host's memory, right: two lookups whatever the length.
            assert_eq!(cost(&c, Some(n)), (n, 2), "n = {n}");
            // The shared hint (no memory here): one read more.
            c.put(HINT, n.to_string().as_bytes(), PutMode::Overwrite)
                .unwrap();
            assert_eq!(cost(&c, None), (n, 3), "n = {n}");
            // Stale by a few: a few lookups more.
            let (last, k) = cost(&c, Some(n.saturating_sub(5).max(1)));
            assert_eq!(last, n);
            assert!(k <= 9, "n = {n}: {k} lookups");
            // Forged (an entry that does not exist), with the shared hint forged too: the
            // search from 1, about 2 log2(n) lookups; never a wrong answer.
            c.put(HINT, b"999999999", PutMode::Overwrite).unwrap();
            let (last, k) = cost(&c, Some(1_000_000_000));
            assert_eq!(last, n);
            let bound = 2 * (64 - n.leading_zeros() as u64) + 4;
            assert!(k <= bound, "n = {n}: {k} lookups > {bound}");
        }
        let (_d, c) = trail(0);
        assert_eq!(cost(&c, None).0, 0);
    }
}
