//! Public-key wrapping of data keys with HPKE base mode (RFC 9180), suite
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM.
//!
//! Whoever holds a [`PublicKey`] can wrap; only the [`SecretKey`] unwraps. This is what lets
//! a backup-role key write data it cannot read back. Layout: `enc (32) || ciphertext || tag`.

use custos_model::{Error, Result};
use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

const INFO: &[u8] = b"custos data key wrap v1";

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

#[derive(Clone)]
pub struct SecretKey(pub Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", hex::encode(&self.0[..8]))
    }
}

pub fn generate() -> (SecretKey, PublicKey) {
    let (sk, pk) = X25519HkdfSha256::gen_keypair(&mut rand::rng());
    let mut skb = Zeroizing::new([0u8; 32]);
    skb.copy_from_slice(&sk.to_bytes());
    let mut pkb = [0u8; 32];
    pkb.copy_from_slice(&pk.to_bytes());
    (SecretKey(skb), PublicKey(pkb))
}

impl SecretKey {
    pub fn public(&self) -> Result<PublicKey> {
        let sk = <X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(self.0.as_ref())
            .map_err(|_| Error::integrity("stored secret key is malformed"))?;
        let pk = X25519HkdfSha256::sk_to_pk(&sk);
        let mut pkb = [0u8; 32];
        pkb.copy_from_slice(&pk.to_bytes());
        Ok(PublicKey(pkb))
    }
}

pub fn wrap(pk: &PublicKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let pk = <X25519HkdfSha256 as Kem>::PublicKey::from_bytes(&pk.0)
        .map_err(|_| Error::integrity("repository public key is malformed"))?;
    let (enc, ct) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, X25519HkdfSha256, _>(
        &OpModeS::Base,
        &pk,
        INFO,
        plaintext,
        aad,
        &mut rand::rng(),
    )
    .map_err(|e| Error::internal(format!("HPKE seal failed: {e}")))?;
    let mut out = enc.to_bytes().to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

pub fn unwrap(
    sk: &SecretKey,
    aad: &[u8],
    wrapped: &[u8],
    what: &str,
) -> Result<Zeroizing<Vec<u8>>> {
    if wrapped.len() < 32 + 16 {
        return Err(Error::integrity(format!(
            "{what}: wrapped key is truncated"
        )));
    }
    let skk = <X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(sk.0.as_ref())
        .map_err(|_| Error::integrity("stored secret key is malformed"))?;
    let enc = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&wrapped[..32])
        .map_err(|_| Error::integrity(format!("{what}: wrapped key is malformed")))?;
    hpke::single_shot_open::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
        &OpModeR::Base,
        &skk,
        &enc,
        INFO,
        &wrapped[32..],
        aad,
    )
    .map(Zeroizing::new)
    .map_err(|_| Error::integrity(format!("{what}: wrapped key fails authentication")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_secret_key_unwraps() {
        let (sk, pk) = generate();
        assert_eq!(sk.public().unwrap(), pk);
        let w = wrap(&pk, b"pack", b"data key bytes").unwrap();
        assert_eq!(&*unwrap(&sk, b"pack", &w, "t").unwrap(), b"data key bytes");
        let (other, _) = generate();
        assert!(unwrap(&other, b"pack", &w, "t").is_err());
        assert!(unwrap(&sk, b"snapshot", &w, "t").is_err());
    }
}
