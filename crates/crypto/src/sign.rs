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

/// [`verify`] of a message written piece by piece by `write` (an index object's signed
/// form is its whole content: 20 MB not held at once). The same strict checks: a key or a
/// signature's R of small order is refused.
pub fn verify_written(
    public: &[u8; 32],
    sig: &[u8],
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> bool {
    struct Feed(ed25519_dalek::StreamVerifier);
    impl std::io::Write for Feed {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(public) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
        return false;
    };
    // What verify_strict checks before hashing: R decompresses and neither R nor the key
    // is of small order (`is_weak`).
    match ed25519_dalek::VerifyingKey::from_bytes(sig.r_bytes()) {
        Ok(r) if !r.is_weak() && !vk.is_weak() => {}
        _ => return false,
    }
    let Ok(v) = vk.verify_stream(&sig) else {
        return false;
    };
    let mut feed = Feed(v);
    write(&mut feed).is_ok() && feed.0.finalize_and_verify().is_ok()
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

    #[test]
    fn a_message_written_in_pieces_verifies_as_the_whole_and_as_strictly() {
        let a = generate();
        let msg: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let sig = sign(&a, &msg);
        let pieces = |m: Vec<u8>| {
            move |w: &mut dyn std::io::Write| {
                for c in m.chunks(777) {
                    w.write_all(c)?;
                }
                Ok(())
            }
        };
        assert!(verify_written(&public_of(&a), &sig, pieces(msg.clone())));
        let mut other = msg.clone();
        other[50_000] ^= 1;
        assert!(!verify_written(&public_of(&a), &sig, pieces(other)));
        assert!(!verify_written(
            &public_of(&generate()),
            &sig,
            pieces(msg.clone())
        ));
        assert!(!verify_written(
            &public_of(&a),
            &sig[..63],
            pieces(msg.clone())
        ));
        // The identity as the key and as R with s = 0 satisfies the plain Ed25519 equation
        // for every message; strict verification refuses it, and so does this.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut weak_sig = [0u8; 64];
        weak_sig[0] = 1;
        assert!(!verify(&identity, b"anything", &weak_sig));
        assert!(!verify_written(
            &identity,
            &weak_sig,
            pieces(b"anything".to_vec())
        ));
        // A writer that fails is no verification.
        assert!(!verify_written(&public_of(&a), &sig, |_| Err(
            std::io::Error::other("cut")
        )));
    }
}
