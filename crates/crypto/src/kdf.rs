//! Argon2id password hashing that turns a password into a key-encryption key.

use argon2::{Algorithm, Argon2, Params, Version};
use custos_model::{Error, Result};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub algorithm: String,
    /// Memory in KiB.
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    #[serde(with = "crate::keys::b64")]
    pub salt: Vec<u8>,
}

impl KdfParams {
    /// OWASP's first Argon2id recommendation (m = 64 MiB, t = 3, p = 4) with a fresh salt;
    /// `memory_mib`/`iterations` override for constrained hosts or tests.
    pub fn new(memory_mib: Option<u32>, iterations: Option<u32>) -> Self {
        let mut salt = vec![0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
        KdfParams {
            algorithm: "argon2id".into(),
            memory_kib: memory_mib.unwrap_or(64) * 1024,
            iterations: iterations.unwrap_or(3),
            parallelism: 4,
            salt,
        }
    }

    pub fn derive(&self, password: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        if self.algorithm != "argon2id" {
            return Err(Error::integrity(format!(
                "unknown key derivation `{}`",
                self.algorithm
            )));
        }
        // A key file is read from storage, which anyone with write access to it may have
        // written: its cost parameters are bounded before anything is allocated (4 GiB,
        // 100 passes, 64 lanes; custos writes 64 MiB, 3 and 4).
        if self.memory_kib > 4 * 1024 * 1024 || self.iterations > 100 || self.parallelism > 64 {
            return Err(Error::integrity(format!(
                "the key file asks for Argon2id with {} KiB, {} passes and {} lanes: more than custos ever writes (at most 4 GiB, 100, 64), refused",
                self.memory_kib, self.iterations, self.parallelism
            ))
            .hint("a key file with such parameters was not written by custos: check who can write the repository's keys/ folder"));
        }
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| Error::integrity(format!("bad Argon2id parameters in key file: {e}")))?;
        let mut out = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(password, &self.salt, out.as_mut())
            .map_err(|e| Error::internal(format!("Argon2id failed: {e}")))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key a password gives must never change with the Argon2 implementation: every
    /// key file ever written depends on it. Expected value from the argon2 crate 0.5.3.
    #[test]
    fn derivation_is_stable() {
        let p = KdfParams {
            algorithm: "argon2id".into(),
            memory_kib: 256,
            iterations: 3,
            parallelism: 4,
            salt: b"custos kdf salt!".to_vec(),
        };
        let key = p.derive(b"correct horse battery staple").unwrap();
        assert_eq!(
            hex::encode(key.as_ref()),
            "76342d2eaac82fb22059d4896a03a1934b7b6f8018bc6382b18dea0b70c9c0bf"
        );
    }
}
