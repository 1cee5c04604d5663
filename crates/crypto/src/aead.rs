//! AES-256-GCM with a random 96-bit nonce stored in front of the ciphertext.
//! Layout: `nonce (12) || ciphertext || tag (16)`. The AAD binds a ciphertext to its place
//! (an object name, a chunk id), so a valid ciphertext moved elsewhere fails to open.
//!
//! Bulk encryption uses ring's AES-GCM (BoringSSL's assembly): on this machine it runs
//! several times faster than a GHASH computed one block at a time, and every chunk of
//! every backup and restore passes through here. Random nonces are safe: a key encrypts
//! at most one pack (a few thousand blobs) or one small object.

use custos_model::{Error, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

pub const OVERHEAD: usize = NONCE_LEN + 16;

fn key(k: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("32-byte AES-256 key"))
}

pub fn seal(k: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    seal_append(k, aad, plaintext, &mut out);
    out
}

/// [`seal`], appending `nonce || ciphertext || tag` to `out`: the plaintext is copied once,
/// into its place in the object being built, and encrypted there.
pub fn seal_append(k: &[u8; 32], aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("system random source");
    out.reserve(OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let tag = key(k)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[start..],
        )
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    out.extend_from_slice(tag.as_ref());
}

/// Opens a sealed buffer; `what` names the object in the error.
pub fn open(k: &[u8; 32], aad: &[u8], sealed: &[u8], what: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; sealed.len().saturating_sub(OVERHEAD)];
    open_to(k, aad, sealed, &mut buf, what)?;
    Ok(buf)
}

/// [`open`] into `out`, which must be exactly the plaintext's length: the ciphertext is
/// copied once, into its destination, and decrypted there (a restore opens every chunk
/// straight into its place in the write buffer).
pub fn open_to(k: &[u8; 32], aad: &[u8], sealed: &[u8], out: &mut [u8], what: &str) -> Result<()> {
    if sealed.len() < OVERHEAD {
        return Err(Error::integrity(format!(
            "{what} is truncated ({} bytes)",
            sealed.len()
        )));
    }
    if sealed.len() - OVERHEAD != out.len() {
        return Err(Error::integrity(format!(
            "{what} holds {} bytes where {} were expected",
            sealed.len() - OVERHEAD,
            out.len()
        )));
    }
    let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().expect("length checked");
    let (ciphertext, tag) = sealed[NONCE_LEN..].split_at(out.len());
    out.copy_from_slice(ciphertext);
    let opened = key(k).open_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        Tag::try_from(tag).expect("16-byte tag"),
        out,
        0..,
    );
    if opened.is_err() {
        // Nothing unauthenticated is left behind for a caller that ignores the error.
        out.fill(0);
        return Err(Error::integrity(format!(
            "{what} fails authentication: it was altered or damaged"
        )));
    }
    Ok(())
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

    /// Sealing after what is already in a buffer and opening into a caller's slice give
    /// back the plaintext; a tampered or wrongly sized input is refused and leaves the
    /// slice zeroed, never holding unauthenticated bytes.
    #[test]
    fn append_and_open_in_place() {
        let key = [9u8; 32];
        let mut buf = b"header".to_vec();
        seal_append(&key, b"aad", b"clinical note", &mut buf);
        let sealed = &buf[6..];
        assert_eq!(&buf[..6], b"header");
        assert_eq!(open(&key, b"aad", sealed, "x").unwrap(), b"clinical note");
        let mut out = [0xAAu8; 13];
        open_to(&key, b"aad", sealed, &mut out, "x").unwrap();
        assert_eq!(&out, b"clinical note");
        let mut bad = sealed.to_vec();
        bad[14] ^= 1;
        let mut out = [0xAAu8; 13];
        let e = open_to(&key, b"aad", &bad, &mut out, "note").unwrap_err();
        assert!(e.message.contains("fails authentication"), "{}", e.message);
        assert_eq!(out, [0u8; 13]);
        let mut short = [0u8; 12];
        let e = open_to(&key, b"aad", sealed, &mut short, "note").unwrap_err();
        assert!(e.message.contains("13 bytes where 12"), "{}", e.message);
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
