//! Key files: the repository's key material sealed under a password.
//!
//! `keys/<key id>` is JSON with the Argon2id parameters and `data`, the AES-256-GCM
//! sealing (AAD = the key id) of the key material and the repository id. The role written
//! in clear is for listing only; the sealed role is authoritative. A key file copied from
//! another repository is refused because the sealed repository id differs.

use chrono::{DateTime, Utc};
use custos_crypto::kdf::KdfParams;
use custos_crypto::keys::KeyMaterial;
use custos_crypto::{aead, MasterKeys, Role};
use custos_model::{Error, KeyId, RepoId, Result};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::format::b64;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub version: u32,
    pub id: KeyId,
    pub role: Role,
    pub created: DateTime<Utc>,
    pub host: String,
    pub user: String,
    pub kdf: KdfParams,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Public half of this key's Ed25519 trail signing key (hex). Informational: the
    /// trail itself introduces each key's signing key, signed by the key that added it.
    #[serde(
        default,
        rename = "trail_signer",
        skip_serializing_if = "Option::is_none"
    )]
    pub sign_public: Option<String>,
    /// BLAKE3 of `data` (hex): tells a damaged key file from a wrong password, which
    /// AES-GCM alone cannot (both fail to authenticate). Absent in older key files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    repo: RepoId,
    keys: KeyMaterial,
}

/// Who is creating a key, for the listing.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub host: String,
    pub user: String,
}

impl KeyFile {
    pub fn seal(
        keys: &MasterKeys,
        repo: RepoId,
        password: &[u8],
        kdf: KdfParams,
        origin: &Origin,
    ) -> Result<KeyFile> {
        let mut idb = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut idb);
        let id = KeyId(custos_model::Id(idb));
        let kek = kdf.derive(password)?;
        // Every key file signs the trail with its own key: a fresh one unless the caller
        // (a password change) keeps the existing one.
        let mut material = keys.to_material();
        let seed = match &keys.sign_seed {
            Some(s) => s.clone(),
            None => custos_crypto::sign::generate(),
        };
        material.sign_seed = Some(seed.to_vec());
        let sign_public = hex::encode(custos_crypto::sign::public_of(&seed));
        let plain = Zeroizing::new(
            serde_json::to_vec(&Sealed {
                repo,
                keys: material,
            })
            .expect("serializable"),
        );
        let data = aead::seal(&kek, &id.0 .0, &plain);
        Ok(KeyFile {
            version: 1,
            id,
            role: keys.role,
            created: Utc::now(),
            host: origin.host.clone(),
            user: origin.user.clone(),
            kdf,
            check: Some(blake3::hash(&data).to_hex().to_string()),
            data,
            sign_public: Some(sign_public),
        })
    }

    /// Why the key file is damaged, when it is known to be: its sealed data is too short
    /// to be sealed data, or differs from its checksum.
    pub fn damage(&self) -> Option<&'static str> {
        if self.data.len() < 12 + 16 {
            return Some("its sealed key material is cut short");
        }
        match &self.check {
            Some(c) if *c != blake3::hash(&self.data).to_hex().as_str() => {
                Some("its sealed key material does not match its checksum")
            }
            _ => None,
        }
    }

    /// Opens the key file with a password. `Ok(None)` means the password does not fit.
    pub fn open(&self, password: &[u8], repo: RepoId) -> Result<Option<MasterKeys>> {
        let kek = self.kdf.derive(password)?;
        let plain = match aead::open(&kek, &self.id.0 .0, &self.data, "key file") {
            Ok(p) => Zeroizing::new(p),
            Err(_) => return Ok(None),
        };
        let sealed: Sealed = serde_json::from_slice(&plain).map_err(|_| {
            Error::integrity(format!(
                "key {} holds malformed key material",
                self.id.short()
            ))
        })?;
        if sealed.repo != repo {
            return Err(Error::integrity(format!(
                "key {} belongs to another repository",
                self.id.short()
            ))
            .hint("remove this key file; it was copied from another repository"));
        }
        MasterKeys::from_material(&sealed.keys).map(Some)
    }
}
