//! Keeping a repository sound: `verify` (structure, content, WAL continuity; vouching for
//! what a restore key read), `forget` (retention, a plan first), `prune` (unreferenced
//! data, in an order that survives a crash), `lock` (Object Lock dates) and `info` (the
//! repository at a glance).

pub mod copy;
pub mod forget;
pub mod info;
pub mod lock;
pub mod prune;
pub mod verify;
