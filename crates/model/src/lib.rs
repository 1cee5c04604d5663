//! Pure vocabulary of custos: object ids, the user-facing error type with stable codes,
//! byte sizes and the retention policy. No I/O happens here, so every other layer can use
//! these types and the rules they encode (such as which snapshot a policy keeps) are
//! testable without storage.

pub mod clock;
pub mod error;
pub mod id;
pub mod lsn;
pub mod path;
pub mod retention;
pub mod size;

pub use error::{Error, Kind, Result};
pub use id::{ChunkId, Id, IndexId, KeyId, LockId, PackId, RepoId, SnapshotId};
pub use lsn::Lsn;
pub use path::PathBytes;
pub use size::ByteSize;
