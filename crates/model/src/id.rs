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
        String::from_utf8(self.hex_digits().to_vec()).expect("hex is ASCII")
    }

    /// The 64 lowercase hex digits, on the stack: index objects write millions of ids.
    fn hex_digits(&self) -> [u8; 64] {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(self.0, &mut buf).expect("64 bytes for 32");
        buf
    }

    /// 64 hex digits (either case); None for anything else. Index objects hold millions
    /// of ids: a table and no allocation (the hex crate's decoding was 8% of a prune).
    pub fn from_hex(s: &[u8]) -> Option<Id> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            let (hi, lo) = (HEX_VALUE[pair[0] as usize], HEX_VALUE[pair[1] as usize]);
            if (hi | lo) == 0xff {
                return None;
            }
            *o = hi << 4 | lo;
        }
        Some(Id(out))
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
        Id::from_hex(s.as_bytes())
            .ok_or_else(|| crate::Error::config(format!("`{s}` is not a 64-digit hex id")))
    }
}

/// Each byte's value as a hex digit (either case), 0xff for a byte that is not one.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.hex_digits()).expect("hex is ASCII"))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(std::str::from_utf8(&self.hex_digits()).expect("hex is ASCII"))
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // From the deserializer's own buffer: no String per id.
        struct HexId;
        impl serde::de::Visitor<'_> for HexId {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 64-digit hex id")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Id, E> {
                Id::from_hex(s.as_bytes())
                    .ok_or_else(|| E::custom(format!("`{s}` is not a 64-digit hex id")))
            }
        }
        d.deserialize_str(HexId)
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
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), ChunkId(id));
        // Read from a reader too (index objects are parsed as they decompress).
        let read: ChunkId = serde_json::from_reader(json.as_bytes()).unwrap();
        assert_eq!(read, ChunkId(id));
    }

    /// The table decoder agrees with the hex crate on every byte value in every position,
    /// upper case included, and refuses what it refuses.
    #[test]
    fn hex_decoding_agrees_with_the_hex_crate() {
        let base = Id::of_bytes(b"base").to_hex().into_bytes();
        for pos in [0, 1, 31, 62, 63] {
            for b in 0..=255u8 {
                let mut s = base.clone();
                s[pos] = b;
                let mut theirs = [0u8; 32];
                let theirs = hex::decode_to_slice(&s, &mut theirs)
                    .ok()
                    .map(|_| Id(theirs));
                assert_eq!(Id::from_hex(&s), theirs, "byte {b} at {pos}");
            }
        }
        let upper = Id::of_bytes(b"x").to_hex().to_uppercase();
        assert_eq!(upper.parse::<Id>().unwrap(), Id::of_bytes(b"x"));
        assert!(Id::from_hex(&base[..62]).is_none());
        assert!(Id::from_hex(&[base.clone(), b"00".to_vec()].concat()).is_none());
        let e = serde_json::from_str::<ChunkId>("\"0g\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a 64-digit hex id"), "{e}");
        assert!(serde_json::from_str::<ChunkId>("12").is_err());
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
