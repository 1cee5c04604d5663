//! Cryptography of custos, with no I/O: password KDF (Argon2id), authenticated encryption
//! (AES-256-GCM), public-key wrapping of data keys (HPKE, RFC 9180: X25519, HKDF-SHA256,
//! AES-256-GCM), keyed chunk ids (BLAKE3 keyed), Ed25519 signatures for the operation
//! trail and Shamir secret sharing of the restore key.
//!
//! Invariant: key material lives in [`zeroize`]-on-drop containers and never implements
//! `Debug` or `Display` with its value.

pub mod aead;
pub mod kdf;
pub mod keys;
pub mod shares;
pub mod sign;
pub mod wrap;

pub use keys::{MasterKeys, Role};
