//! The repository's key material and the roles that hold parts of it.
//!
//! - `id_key`: keyed BLAKE3 for chunk ids. Held by every writing role (dedup needs it).
//! - `meta_key`: AES-256-GCM key for the index, locks and snapshot summaries: what a
//!   writer must read to deduplicate and to find its parent snapshot. No file content or
//!   file name is ever encrypted with it.
//! - the restore key pair (X25519): data keys of packs and snapshot bodies are wrapped to
//!   the public half. Only the restore role holds the secret half.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::wrap::{PublicKey, SecretKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Adds snapshots; cannot decrypt stored data.
    Backup,
    /// Reads and decrypts everything.
    Restore,
    /// Reads the operation trail and the snapshot listing; cannot decrypt data or write.
    Audit,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Backup => "backup",
            Role::Restore => "restore",
            Role::Audit => "audit",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = custos_model::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "backup" => Ok(Role::Backup),
            "restore" => Ok(Role::Restore),
            "audit" => Ok(Role::Audit),
            _ => Err(custos_model::Error::config(format!(
                "unknown role `{s}`; use backup, restore or audit"
            ))),
        }
    }
}

#[derive(Clone)]
pub struct MasterKeys {
    pub role: Role,
    pub id_key: Zeroizing<[u8; 32]>,
    pub meta_key: Zeroizing<[u8; 32]>,
    pub public: PublicKey,
    pub secret: Option<SecretKey>,
    /// Restore secrets of earlier key pairs (after `key rotate`): data wrapped to them
    /// stays readable. Newest first.
    pub previous: Vec<SecretKey>,
    /// This key file's own Ed25519 signing key, for the operation trail.
    pub sign_seed: Option<Zeroizing<[u8; 32]>>,
    /// The repository's trail authority (Ed25519 seed), held by restore keys only: it
    /// vouches in the trail for a key rebuilt from shares, which no other key can, and
    /// signs every new generation of the data key pair.
    pub authority: Option<Zeroizing<[u8; 32]>>,
    /// The authority's public half, held by every key made after signed generations: a
    /// backup key checks with it that a new data public key comes from a restore key (it
    /// can verify, never sign). None in key files made before.
    pub authority_public: Option<[u8; 32]>,
    /// The generation of the data key pair this key file was sealed at (0 = the pair made
    /// at `init`; `key rotate` adds generations in the keyring).
    pub generation: u32,
    /// Restore keys may forget, prune and remove keys only when granted (the key made by
    /// `init` is; `key add --role restore --allow-delete` grants it to others).
    pub can_delete: bool,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKeys(role={:?}, <redacted>)", self.role)
    }
}

impl MasterKeys {
    pub fn generate() -> MasterKeys {
        let mut id_key = Zeroizing::new([0u8; 32]);
        let mut meta_key = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rng(), id_key.as_mut());
        rand::RngCore::fill_bytes(&mut rand::rng(), meta_key.as_mut());
        let (secret, public) = crate::wrap::generate();
        MasterKeys {
            role: Role::Restore,
            id_key,
            meta_key,
            public,
            secret: Some(secret),
            previous: vec![],
            sign_seed: None,
            authority: None,
            authority_public: None,
            generation: 0,
            can_delete: true,
        }
        .with_authority(crate::sign::generate())
    }

    fn with_authority(mut self, seed: Zeroizing<[u8; 32]>) -> MasterKeys {
        self.authority_public = Some(crate::sign::public_of(&seed));
        self.authority = Some(seed);
        self
    }

    /// What a key file of `role` holds: backup keys lack the restore secrets; audit keys
    /// also lack the id key (they never write chunks).
    pub fn for_role(&self, role: Role) -> MasterKeys {
        let mut k = self.clone();
        k.role = role;
        k.sign_seed = None;
        k.can_delete = false;
        if role != Role::Restore {
            k.secret = None;
            k.previous = vec![];
            k.authority = None;
        }
        if role == Role::Audit {
            k.id_key = Zeroizing::new([0u8; 32]);
        }
        k
    }

    /// Every restore secret this key holds, current first.
    pub fn secrets(&self) -> impl Iterator<Item = &SecretKey> {
        self.secret.iter().chain(self.previous.iter())
    }

    /// Unwraps a data key with whichever restore secret it was wrapped to (the current
    /// one, or one from before a rotation).
    pub fn unwrap(
        &self,
        aad: &[u8],
        wrapped: &[u8],
        what: &str,
    ) -> custos_model::Result<Zeroizing<Vec<u8>>> {
        let mut first_err = None;
        for s in self.secrets() {
            match crate::wrap::unwrap(s, aad, wrapped, what) {
                Ok(k) => return Ok(k),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| {
            custos_model::Error::new(
                custos_model::Kind::Permission,
                format!("{what}: this key holds no restore secret"),
            )
        }))
    }

    pub fn chunk_id(&self, data: &[u8]) -> custos_model::ChunkId {
        custos_model::ChunkId(custos_model::Id(
            *blake3::keyed_hash(&self.id_key, data).as_bytes(),
        ))
    }

    pub fn to_material(&self) -> KeyMaterial {
        KeyMaterial {
            role: self.role,
            id_key: self.id_key.to_vec(),
            meta_key: self.meta_key.to_vec(),
            public: self.public.0.to_vec(),
            secret: self.secret.as_ref().map(|s| s.0.to_vec()),
            previous: self.previous.iter().map(|s| s.0.to_vec()).collect(),
            sign_seed: self.sign_seed.as_ref().map(|s| s.to_vec()),
            authority: self.authority.as_ref().map(|s| s.to_vec()),
            authority_public: self.authority_public.map(|p| p.to_vec()),
            generation: self.generation,
            can_delete: Some(self.can_delete),
        }
    }

    pub fn from_material(m: &KeyMaterial) -> custos_model::Result<MasterKeys> {
        let bad = || custos_model::Error::integrity("key file holds malformed key material");
        let arr = |v: &[u8]| -> custos_model::Result<[u8; 32]> { v.try_into().map_err(|_| bad()) };
        let secret = match &m.secret {
            Some(s) => Some(SecretKey(Zeroizing::new(arr(s)?))),
            None => None,
        };
        let public = PublicKey(arr(&m.public)?);
        if let Some(s) = &secret {
            if s.public()? != public {
                return Err(bad());
            }
        }
        let previous = m
            .previous
            .iter()
            .map(|p| Ok(SecretKey(Zeroizing::new(arr(p)?))))
            .collect::<custos_model::Result<Vec<_>>>()?;
        let authority = match &m.authority {
            Some(s) => Some(Zeroizing::new(arr(s)?)),
            None => None,
        };
        let sign_seed = match &m.sign_seed {
            Some(s) => Some(Zeroizing::new(arr(s)?)),
            None => None,
        };
        // A restore key's authority public key is its seed's; another key's is what its
        // (sealed) material says.
        let authority_public = match (&authority, &m.authority_public) {
            (Some(seed), _) => Some(crate::sign::public_of(seed)),
            (None, Some(p)) => Some(arr(p)?),
            (None, None) => None,
        };
        Ok(MasterKeys {
            role: m.role,
            id_key: Zeroizing::new(arr(&m.id_key)?),
            meta_key: Zeroizing::new(arr(&m.meta_key)?),
            public,
            secret,
            previous,
            sign_seed,
            authority,
            authority_public,
            generation: m.generation,
            // Key files from before the grant existed: restore keys could delete.
            can_delete: m.can_delete.unwrap_or(m.role == Role::Restore),
        })
    }
}

/// Serialized form of [`MasterKeys`], only ever stored sealed inside a key file.
#[derive(Serialize, Deserialize, zeroize::ZeroizeOnDrop)]
pub struct KeyMaterial {
    #[zeroize(skip)]
    pub role: Role,
    #[serde(with = "b64")]
    pub id_key: Vec<u8>,
    #[serde(with = "b64")]
    pub meta_key: Vec<u8>,
    #[serde(with = "b64")]
    pub public: Vec<u8>,
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub secret: Option<Vec<u8>>,
    #[serde(default, with = "vec_b64", skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<Vec<u8>>,
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub sign_seed: Option<Vec<u8>>,
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub authority: Option<Vec<u8>>,
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub authority_public: Option<Vec<u8>>,
    #[serde(default)]
    #[zeroize(skip)]
    pub generation: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[zeroize(skip)]
    pub can_delete: Option<bool>,
}

pub mod vec_b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&base64::engine::general_purpose::STANDARD.encode(x))?;
        }
        seq.end()
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.into_iter()
            .map(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

pub mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

mod opt_b64 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::b64::serialize(v, s),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        use base64::Engine;
        s.map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}
