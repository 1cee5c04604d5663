//! AES-256-GCM with a random 96-bit nonce stored in front of the ciphertext.
//! Layout: `nonce (12) || ciphertext || tag (16)`. The AAD binds a ciphertext to its place
//! (an object name, a chunk id), so a valid ciphertext moved elsewhere fails to open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use custos_model::{Error, Result};
use rand::RngCore;

pub const OVERHEAD: usize = 12 + 16;

pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Opens a sealed buffer; `what` names the object in the error.
pub fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8], what: &str) -> Result<Vec<u8>> {
    if sealed.len() < OVERHEAD {
        return Err(Error::integrity(format!(
            "{what} is truncated ({} bytes)",
            sealed.len()
        )));
    }
    let cipher = Aes256Gcm::new(key.into());
    let (nonce, ct) = sealed.split_at(12);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| {
            Error::integrity(format!(
                "{what} fails authentication: it was altered or damaged"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_bit_detected() {
        let key = [7u8; 32];
        let sealed = seal(&key, b"aad", b"hello clinical world");
        assert_eq!(
            open(&key, b"aad", &sealed, "x").unwrap(),
            b"hello clinical world"
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(
                open(&key, b"aad", &bad, "x").is_err(),
                "flip at {i} accepted"
            );
        }
        assert!(open(&key, b"other", &sealed, "x").is_err());
        assert!(open(&[8u8; 32], b"aad", &sealed, "x").is_err());
    }
}
