//! What a stolen key can do with custos's own library: write objects that custos's
//! writers never would. Tests use it to check that readers treat such objects as the
//! hostile input they are.

use std::sync::Arc;

use custos_model::{ChunkId, SnapshotId};
use custos_repo::snapshot::{SnapshotStats, SourceKind};
use custos_repo::{BlobKind, OpenOptions, Repository, SnapshotBody, SnapshotSummary};
use custos_sources::files::{Entry, EntryKind};

use super::T;

/// A manifest entry with the content of its one chunk, if any.
pub type Planted<'a> = (Entry, Option<&'a [u8]>);

pub struct Attacker {
    pub repo: Repository,
}

impl Attacker {
    /// Opens `t`'s (local) repository with the key `password` opens.
    pub fn open(t: &T, password: &str) -> Attacker {
        let loc = custos_storage::url::Location::parse(&t.repo).unwrap();
        let storage = custos_storage::url::open(&loc, &Default::default()).unwrap();
        let repo = Repository::open(
            storage,
            password.as_bytes(),
            OpenOptions {
                host: "attacker".into(),
                user: "mallory".into(),
                threads: 1,
                ..Default::default()
            },
        )
        .unwrap();
        Attacker { repo }
    }

    /// Stores `data` under `id` (which need not be its id) in a pack of its own, and
    /// indexes it.
    pub fn store_blob(&self, id: ChunkId, data: Vec<u8>) {
        let index = Arc::new(custos_repo::Index::default());
        let writer = self.repo.writer(index);
        writer.add(id, BlobKind::Data, data).unwrap();
        let (packs, _) = writer.finish().unwrap();
        self.repo.write_index(packs).unwrap();
    }

    /// Writes a files snapshot whose manifest is `entries`; a file entry given content
    /// gets that content as its one chunk.
    pub fn plant_files(&self, entries: Vec<Planted>) -> SnapshotId {
        let index = Arc::new(self.repo.load_index().unwrap());
        let writer = self.repo.writer(index);
        let mut manifest = String::new();
        let mut plain = vec![];
        for (mut e, content) in entries {
            if let Some(c) = content {
                let id = self.repo.keys.chunk_id(c);
                writer.add(id, BlobKind::Data, c.to_vec()).unwrap();
                e.chunks = vec![id];
                e.size = c.len() as u64;
            }
            plain.push(e);
        }
        for e in &plain {
            manifest.push_str(&serde_json::to_string(e).unwrap());
            manifest.push('\n');
        }
        let id = self.repo.keys.chunk_id(manifest.as_bytes());
        writer
            .add(id, BlobKind::Tree, manifest.into_bytes())
            .unwrap();
        let (packs, _) = writer.finish().unwrap();
        self.repo.write_index(packs).unwrap();
        let summary = SnapshotSummary {
            time: chrono::Utc::now(),
            kind: SourceKind::Files,
            source: "/srv/documents".into(),
            host: "attacker".into(),
            user: "mallory".into(),
            parent: None,
            tags: vec![],
            stats: SnapshotStats::default(),
            key: self.repo.key_id,
            pg: None,
            facts: None,
            trail: None,
        };
        let body = SnapshotBody {
            paths: vec!["/srv/documents".into()],
            manifest: vec![id],
            ..Default::default()
        };
        self.repo.save_snapshot(&summary, &body).unwrap()
    }
}

/// A manifest entry as a walk would record it.
pub fn entry(path: &[u8], kind: EntryKind, mode: u32) -> Entry {
    Entry {
        path: custos_model::PathBytes::new(path.to_vec()),
        kind,
        mode,
        uid: 1234,
        gid: 1234,
        mtime_ns: 1_700_000_000_000_000_000,
        size: 0,
        target: None,
        chunks: vec![],
        pages: None,
        etag: None,
    }
}

impl Attacker {
    /// Records a PostgreSQL base backup's summary (no data: enough for listings, windows
    /// and retention), taken on `host` at `time`, and pushes stand-in WAL segments for it.
    pub fn plant_pg_backup(
        &self,
        host: &str,
        time: chrono::DateTime<chrono::Utc>,
        pg: custos_repo::snapshot::PgInfo,
    ) -> SnapshotId {
        let summary = SnapshotSummary {
            time,
            kind: SourceKind::Postgres,
            source: format!("{host}:/var/lib/postgresql/15/main"),
            host: host.into(),
            user: "postgres".into(),
            parent: None,
            tags: vec![],
            stats: SnapshotStats::default(),
            key: self.repo.key_id,
            pg: Some(pg),
            facts: None,
            trail: None,
        };
        self.repo
            .save_snapshot(&summary, &SnapshotBody::default())
            .unwrap()
    }
}

impl Attacker {
    /// Writes a lock object as any key can (sealed with the meta key), saying what it
    /// likes about its holder.
    pub fn plant_lock(&self, info: &custos_repo::lock::LockInfo) {
        let id = custos_model::LockId(custos_model::Id([0x5a; 32]));
        let sealed = custos_crypto::aead::seal(
            &self.repo.keys.meta_key,
            b"custos lock v1",
            &serde_json::to_vec(info).unwrap(),
        );
        self.repo
            .storage
            .put(
                &custos_repo::paths::lock(&id),
                &sealed,
                custos_storage::PutMode::Overwrite,
            )
            .unwrap();
    }
}

impl Attacker {
    /// Records an audit-log export of `clinical:public.audit_log` at `time` with the facts
    /// given (none: a summary only), and no rows.
    pub fn plant_audit_export(
        &self,
        time: chrono::DateTime<chrono::Utc>,
        facts: Option<serde_json::Value>,
    ) -> SnapshotId {
        let summary = SnapshotSummary {
            time,
            kind: SourceKind::AuditLog,
            source: "clinical:public.audit_log".into(),
            host: "db-1".into(),
            user: "postgres".into(),
            parent: None,
            tags: vec![],
            stats: SnapshotStats::default(),
            key: self.repo.key_id,
            pg: None,
            facts,
            trail: None,
        };
        self.repo
            .save_snapshot(&summary, &SnapshotBody::default())
            .unwrap()
    }
}
