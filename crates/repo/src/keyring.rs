//! Rotation of the data key pair (the X25519 pair data keys are wrapped to).
//!
//! `keyring/<generation>` (8 hex digits, from 1), create-only, sealed with the meta key
//! (AAD = "custos keyring v1" || generation LE):
//!
//! ```json
//! {"generation": 2, "created": "<RFC 3339>", "public": "<b64>", "prev_public": "<b64>",
//!  "wrapped": "<b64 HPKE(prev public, AAD, new secret)>", "mac": "<hex>"}
//! ```
//!
//! A key file sealed at generation g opens the links after g in order: a restore key
//! unwraps each new secret with the one before (keeping the old ones, so data wrapped to
//! them stays readable) and checks the link's MAC, a keyed BLAKE3 under a key derived
//! from the previous secret, which only restore keys can compute. Every link is also
//! signed (`sig`) by the repository's authority, an Ed25519 key that restore keys hold
//! and every other key can only verify: a backup key takes a new public key only when its
//! signature verifies. So a link planted by a backup-role key (which holds the meta key
//! that seals links) is refused by every key, and stops the backup that meets it, instead
//! of making later backups readable by whoever planted it.
//!
//! `keyring/rewrap-<generation>`: after `key rotate --rewrap`, the data keys of every
//! snapshot body and archived WAL file re-wrapped to that generation's public key (packs'
//! keys are re-wrapped in the index), so a key holding only the newest secret reads
//! everything. Packs keep their first wrapping in their trailer (packs are not
//! rewritten): a compromised old secret plus storage access still opens those data keys.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use custos_crypto::wrap::{self, PublicKey, SecretKey};
use custos_crypto::{aead, MasterKeys};
use custos_model::{Error, Result};
use custos_storage::{DynStorage, PutMode, PutOutcome};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::format::{b64, from_zjson, to_zjson};

pub const DIR: &str = "keyring";
const AAD: &[u8] = b"custos keyring v1";
const WRAP_AAD: &[u8] = b"custos keyring secret v1";
const MAC_CONTEXT: &str = "custos keyring mac v1";
const REWRAP_AAD: &[u8] = b"custos keyring rewrap v1";
const SIG_DOMAIN: &[u8] = b"custos keyring sig v1";
const REWRAP_SIG_DOMAIN: &[u8] = b"custos keyring rewrap sig v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Link {
    pub generation: u32,
    pub created: DateTime<Utc>,
    #[serde(with = "b64")]
    pub public: Vec<u8>,
    #[serde(with = "b64")]
    pub prev_public: Vec<u8>,
    #[serde(with = "b64")]
    pub wrapped: Vec<u8>,
    pub mac: String,
    /// Ed25519 signature of the repository's authority over the link (hex).
    #[serde(default)]
    pub sig: String,
}

/// Data keys re-wrapped to one generation's public key, by object path.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rewrap {
    pub generation: u32,
    pub keys: BTreeMap<String, String>,
    /// Ed25519 signature of the repository's authority over the table without this field
    /// (hex).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sig: String,
}

/// What the authority signs of a link: everything a reader acts on.
fn signed_link(l: &Link) -> Vec<u8> {
    let mut m = SIG_DOMAIN.to_vec();
    m.extend_from_slice(&l.generation.to_le_bytes());
    m.extend_from_slice(&l.created.timestamp().to_le_bytes());
    m.extend_from_slice(&l.created.timestamp_subsec_nanos().to_le_bytes());
    for part in [&l.public, &l.prev_public, &l.wrapped] {
        m.extend_from_slice(&(part.len() as u32).to_le_bytes());
        m.extend_from_slice(part);
    }
    m.extend_from_slice(l.mac.as_bytes());
    m
}

/// What the authority signs of a re-wrap table: its JSON without the signature (keys in
/// order, so the bytes are the same on every reader).
fn signed_rewrap(r: &Rewrap) -> Vec<u8> {
    let mut m = REWRAP_SIG_DOMAIN.to_vec();
    let unsigned = Rewrap {
        sig: String::new(),
        ..r.clone()
    };
    m.extend_from_slice(&serde_json::to_vec(&unsigned).expect("serializable"));
    m
}

fn authority_seed<'k>(keys: &'k MasterKeys, what: &str) -> Result<&'k [u8; 32]> {
    keys.authority.as_deref().ok_or_else(|| {
        Error::new(
            custos_model::Kind::Permission,
            format!("this key holds no repository authority, which must sign {what}"),
        )
        .hint("use a restore key made by `custos init`, `key add --role restore` or `key recover`")
    })
}

/// Whether the authority signed `msg` with `sig` (hex); an error names `what` otherwise.
fn check_signed(keys: &MasterKeys, msg: &[u8], sig: &str, what: &str) -> Result<()> {
    let Some(public) = keys.authority_public else {
        return Err(Error::integrity(format!(
            "{what} cannot be checked: this key file predates signed key generations"
        ))
        .hint(
            "add a new key of this role with a restore key (`custos key add`) and remove this one",
        ));
    };
    let ok = hex::decode(sig)
        .ok()
        .is_some_and(|s| custos_crypto::sign::verify(&public, msg, &s));
    if !ok {
        return Err(Error::integrity(format!(
            "{what} is not signed by the repository's authority: a key that cannot sign one (a backup or audit key) wrote it"
        ))
        .hint("stop backups to this repository and investigate (`custos audit log`, storage access logs); do not delete the object before it is examined"));
    }
    Ok(())
}

fn aad(generation: u32) -> Vec<u8> {
    let mut a = AAD.to_vec();
    a.extend_from_slice(&generation.to_le_bytes());
    a
}

fn mac(prev_secret: &SecretKey, l: &Link) -> String {
    let key = blake3::derive_key(MAC_CONTEXT, prev_secret.0.as_ref());
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(&l.generation.to_le_bytes());
    h.update(&l.public);
    h.update(&l.prev_public);
    h.update(&l.wrapped);
    h.finalize().to_hex().to_string()
}

pub fn link_path(generation: u32) -> String {
    format!("{DIR}/{generation:08x}")
}

pub fn rewrap_path(generation: u32) -> String {
    format!("{DIR}/rewrap-{generation:08x}")
}

/// Every generation from 1 to the highest listed, in order, each with its link or why it
/// does not load (missing, damaged, malformed, mislabelled). A failure to list, or to read
/// for another reason than the object's own, is an error.
pub fn load(storage: &DynStorage, meta_key: &[u8; 32]) -> Result<Vec<(u32, Result<Link>)>> {
    let gens: std::collections::BTreeSet<u32> = crate::numbered_objects(storage, DIR, 8)?
        .into_iter()
        .map(|g| g as u32)
        .collect();
    let last = gens.iter().next_back().copied().unwrap_or(0);
    let mut out = vec![];
    for g in 1..=last {
        if !gens.contains(&g) {
            let e = Error::integrity(format!("keyring generation {g} is missing"));
            out.push((g, Err(e)));
            continue;
        }
        match load_link(storage, meta_key, g) {
            Err(e)
                if e.kind != custos_model::Kind::Integrity
                    && e.kind != custos_model::Kind::NotFound =>
            {
                return Err(e)
            }
            r => out.push((g, r)),
        }
    }
    Ok(out)
}

fn load_link(storage: &DynStorage, meta_key: &[u8; 32], g: u32) -> Result<Link> {
    // A link is a few hundred bytes; anyone who can write `keyring/` can plant any size.
    let bytes = custos_storage::get_bounded(&**storage, &link_path(g), 1 << 20, "keyring link")?;
    let what = format!("keyring generation {g}");
    let plain = aead::open(meta_key, &aad(g), &bytes, &what)?;
    let l: Link = from_zjson(&plain, &what)?;
    if l.generation != g {
        return Err(Error::integrity(format!(
            "{what} is labelled {}",
            l.generation
        )));
    }
    Ok(l)
}

/// Brings keys opened from a key file up to the newest generation.
pub fn apply(keys: &mut MasterKeys, links: &[Link]) -> Result<()> {
    let start = keys.generation;
    for l in links.iter().filter(|l| l.generation > start) {
        let what = format!("keyring generation {}", l.generation);
        check_signed(keys, &signed_link(l), &l.sig, &what)?;
        if l.prev_public != keys.public.0 {
            return Err(Error::integrity(format!(
                "{what} does not follow the key pair before it"
            )));
        }
        let public = PublicKey(
            l.public
                .as_slice()
                .try_into()
                .map_err(|_| Error::integrity(format!("{what}: malformed public key")))?,
        );
        if let Some(prev) = keys.secret.take() {
            if mac(&prev, l) != l.mac {
                return Err(Error::integrity(format!(
                    "{what} was not made by a restore key (forged?)"
                ))
                .hint("do not back up with this repository until it is investigated: new data would be wrapped to a key the restore keys may not hold"));
            }
            let s = wrap::unwrap(&prev, WRAP_AAD, &l.wrapped, &what)?;
            let s: [u8; 32] = s
                .as_slice()
                .try_into()
                .map_err(|_| Error::integrity(format!("{what}: malformed secret")))?;
            let secret = SecretKey(Zeroizing::new(s));
            if secret.public()? != public {
                return Err(Error::integrity(format!(
                    "{what}: the secret does not match the public key"
                )));
            }
            keys.previous.insert(0, prev);
            keys.secret = Some(secret);
        }
        keys.public = public;
        keys.generation = l.generation;
    }
    Ok(())
}

/// Makes a new key pair the one new data is wrapped to. Returns the new generation.
pub fn rotate(storage: &DynStorage, keys: &mut MasterKeys) -> Result<u32> {
    let prev = keys
        .secret
        .as_ref()
        .ok_or_else(|| crate::snapshot::restore_key_required("rotate the data key pair"))?;
    let (secret, public) = wrap::generate();
    let generation = keys.generation + 1;
    let mut l = Link {
        generation,
        created: Utc::now(),
        public: public.0.to_vec(),
        prev_public: keys.public.0.to_vec(),
        wrapped: wrap::wrap(&keys.public, WRAP_AAD, secret.0.as_ref())?,
        mac: String::new(),
        sig: String::new(),
    };
    l.mac = mac(prev, &l);
    l.sig = hex::encode(custos_crypto::sign::sign(
        authority_seed(keys, "a new key pair")?,
        &signed_link(&l),
    ));
    let sealed = aead::seal(&keys.meta_key, &aad(generation), &to_zjson(&l));
    if storage.create(&link_path(generation), &sealed)? == PutOutcome::AlreadyExists {
        return Err(Error::new(
            custos_model::Kind::Conflict,
            format!("another rotation made generation {generation} at the same time"),
        )
        .hint("open the repository again and check `custos key status`"));
    }
    apply(keys, std::slice::from_ref(&l))?;
    Ok(generation)
}

pub fn load_rewrap(
    storage: &DynStorage,
    keys: &MasterKeys,
    generation: u32,
) -> Result<Option<Rewrap>> {
    let meta_key = &keys.meta_key;
    let bytes = match storage.get(&rewrap_path(generation)) {
        Ok(b) => b,
        Err(e) if e.kind == custos_model::Kind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let what = format!("keyring re-wrap of generation {generation}");
    let plain = aead::open(meta_key, REWRAP_AAD, &bytes, &what)?;
    let r: Rewrap = from_zjson(&plain, &what)?;
    if r.generation != generation {
        return Err(Error::integrity(format!(
            "{what} is labelled {}",
            r.generation
        )));
    }
    check_signed(keys, &signed_rewrap(&r), &r.sig, &what)?;
    Ok(Some(r))
}

/// Signs and stores a re-wrap table.
pub fn store_rewrap(storage: &DynStorage, keys: &MasterKeys, r: &Rewrap) -> Result<()> {
    let mut r = r.clone();
    r.sig = hex::encode(custos_crypto::sign::sign(
        authority_seed(keys, "a re-wrap table")?,
        &signed_rewrap(&r),
    ));
    let sealed = aead::seal(&keys.meta_key, REWRAP_AAD, &to_zjson(&r));
    storage.put(&rewrap_path(r.generation), &sealed, PutMode::Overwrite)?;
    Ok(())
}

/// A restore key with an authority, made once per process: what the fuzz entry points
/// apply hostile links to.
fn fuzz_keys() -> MasterKeys {
    static KEYS: std::sync::OnceLock<MasterKeys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let mut k = MasterKeys::generate();
        let seed = custos_crypto::sign::generate();
        k.authority_public = Some(custos_crypto::sign::public_of(&seed));
        k.authority = Some(seed);
        k
    })
    .clone()
}

/// Fuzzing: a keyring link's plaintext, applied to a restore key; then what `apply` does
/// past the authority's signature (which no input can forge): the MAC and the unwrap.
#[doc(hidden)]
pub fn fuzz_link(plain: &[u8]) {
    let Ok(l) = from_zjson::<Link>(plain, "keyring link") else {
        return;
    };
    let mut keys = fuzz_keys();
    let _ = apply(&mut keys, std::slice::from_ref(&l));
    if let Some(prev) = keys.secret.as_ref() {
        let _ = mac(prev, &l);
        let _ = wrap::unwrap(prev, WRAP_AAD, &l.wrapped, "keyring link");
    }
}

/// Fuzzing: a re-wrap table's plaintext, and its signature check.
#[doc(hidden)]
pub fn fuzz_rewrap(plain: &[u8]) {
    if let Ok(r) = from_zjson::<Rewrap>(plain, "re-wrap table") {
        let _ = check_signed(&fuzz_keys(), &signed_rewrap(&r), &r.sig, "re-wrap table");
    }
}
