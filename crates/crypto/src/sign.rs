//! Ed25519 signatures (ed25519-dalek) for the operation trail: every key file carries its
//! own signing key, sealed with the rest of its key material.

use zeroize::Zeroizing;

/// A fresh signing key seed.
pub fn generate() -> Zeroizing<[u8; 32]> {
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rng(), seed.as_mut());
    seed
}

pub fn public_of(seed: &[u8; 32]) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(seed)
        .verifying_key()
        .to_bytes()
}

pub fn sign(seed: &[u8; 32], msg: &[u8]) -> [u8; 64] {
    use ed25519_dalek::Signer;
    ed25519_dalek::SigningKey::from_bytes(seed)
        .sign(msg)
        .to_bytes()
}

/// Strict verification (rejects malleable and small-order forms).
pub fn verify(public: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(public) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
        return false;
    };
    vk.verify_strict(msg, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_refuses_altered_messages_and_other_keys() {
        let a = generate();
        let b = generate();
        let sig = sign(&a, b"entry 1");
        assert!(verify(&public_of(&a), b"entry 1", &sig));
        assert!(!verify(&public_of(&a), b"entry 2", &sig));
        assert!(!verify(&public_of(&b), b"entry 1", &sig));
        assert!(!verify(&public_of(&a), b"entry 1", &sig[..63]));
    }
}
