//! AES-256-GCM with a random 96-bit nonce stored in front of the ciphertext.
//! Layout: `nonce (12) || ciphertext || tag (16)`. The AAD binds a ciphertext to its place
//! (an object name, a chunk id), so a valid ciphertext moved elsewhere fails to open.
//!
//! Bulk encryption uses ring's AES-GCM (BoringSSL's assembly): on this machine it runs
//! several times faster than a GHASH computed one block at a time, and every chunk of
//! every backup and restore passes through here. Random nonces are safe: a key encrypts
//! at most one pack (a few thousand blobs) or one small object.

use custos_model::{Error, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

pub const OVERHEAD: usize = NONCE_LEN + 16;

fn key(k: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("32-byte AES-256 key"))
}

pub fn seal(k: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("system random source");
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key(k)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Opens a sealed buffer; `what` names the object in the error.
pub fn open(k: &[u8; 32], aad: &[u8], sealed: &[u8], what: &str) -> Result<Vec<u8>> {
    if sealed.len() < OVERHEAD {
        return Err(Error::integrity(format!(
            "{what} is truncated ({} bytes)",
            sealed.len()
        )));
    }
    let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().expect("length checked");
    let mut buf = sealed[NONCE_LEN..].to_vec();
    let n = key(k)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| {
            Error::integrity(format!(
                "{what} fails authentication: it was altered or damaged"
            ))
        })?
        .len();
    buf.truncate(n);
    Ok(buf)
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

    #[test]
    fn matches_the_standard_layout() {
        // Interoperability: what ring seals, the RustCrypto implementation (used by HPKE)
        // opens, so the format does not depend on one library.
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let k = [3u8; 32];
        let sealed = seal(&k, b"ad", b"payload");
        let c = aes_gcm::Aes256Gcm::new((&k).into());
        let pt = c
            .decrypt(
                aes_gcm::Nonce::from_slice(&sealed[..12]),
                Payload {
                    msg: &sealed[12..],
                    aad: b"ad",
                },
            )
            .unwrap();
        assert_eq!(pt, b"payload");
    }
}
