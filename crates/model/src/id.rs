//! Object ids: 32-byte values shown as lowercase hex. One newtype per object kind, so a
//! pack id can never be passed where a chunk id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

/// Ids are hashes, as good as random in any 8 of their bytes: a hash map keyed by ids (the
/// index holds one entry per chunk, looked up several times per chunk restored) hashes the
/// first 8 rather than all 32. Equality still compares all 32.
impl std::hash::Hash for Id {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes")));
    }
}

impl Id {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Unkeyed BLAKE3 of bytes: the id of a storage object, checkable without keys.
    pub fn of_bytes(data: &[u8]) -> Id {
        Id(*blake3::hash(data).as_bytes())
    }

    pub fn random_from(bytes: [u8; 32]) -> Id {
        Id(bytes)
    }

    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl FromStr for Id {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| crate::Error::config(format!("`{s}` is not a 64-digit hex id")))?;
        Ok(Id(out))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

macro_rules! typed_id {
    ($(#[$doc:meta] $name:ident),* $(,)?) => {$(
        #[$doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Id);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { fmt::Display::fmt(&self.0, f) }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { fmt::Debug::fmt(&self.0, f) }
        }
        impl FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> { Ok($name(s.parse()?)) }
        }
        impl $name {
            pub fn to_hex(&self) -> String { self.0.to_hex() }
            pub fn short(&self) -> String { self.0.short() }
        }
    )*};
}

typed_id!(
    /// Keyed BLAKE3 of a chunk's plaintext: reveals nothing without the repository's id key.
    ChunkId,
    /// Unkeyed BLAKE3 of a pack object's stored bytes.
    PackId,
    /// Unkeyed BLAKE3 of a snapshot object's stored bytes.
    SnapshotId,
    /// Unkeyed BLAKE3 of an index object's stored bytes.
    IndexId,
    /// Random id of a key file.
    KeyId,
    /// Random id of a lock object.
    LockId,
    /// Random id of a repository, chosen at `init`.
    RepoId,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_garbage() {
        let id = Id::of_bytes(b"abc");
        let back: Id = id.to_hex().parse().unwrap();
        assert_eq!(id, back);
        assert!("zz".parse::<Id>().is_err());
        assert!(id.to_hex()[..63].parse::<Id>().is_err());
        let json = serde_json::to_string(&ChunkId(id)).unwrap();
        assert_eq!(json, format!("\"{}\"", id.to_hex()));
    }
}

/// Serde for 64-bit integers that JSON readers must not round (a PostgreSQL system
/// identifier is above 2^53, where JavaScript's and jq's numbers lose digits): written as
/// a string, read from a string or (as older objects hold it) a number.
pub mod u64_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number(u64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Number(n) => Ok(n),
            Either::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }

    #[cfg(test)]
    mod tests {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S {
            #[serde(with = "super")]
            id: u64,
        }

        #[test]
        fn written_as_text_read_either_way() {
            let s = S {
                id: 7713358116659438404,
            };
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                r#"{"id":"7713358116659438404"}"#
            );
            assert_eq!(
                serde_json::from_str::<S>(r#"{"id":7713358116659438404}"#).unwrap(),
                s
            );
            assert_eq!(
                serde_json::from_str::<S>(r#"{"id":"7713358116659438404"}"#).unwrap(),
                s
            );
        }
    }
}
