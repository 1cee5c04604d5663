//! Manifests: the entries of a file snapshot as JSON lines, cut by the CDC chunker and
//! stored as tree blobs, so that an unchanged part of a large tree deduplicates between
//! snapshots.

use custos_model::{ChunkId, Error, Result, SnapshotId};
use custos_repo::{BlobKind, BlobWriter, Index, Repository};
use custos_sources::files::Entry;

pub fn store(repo: &Repository, writer: &BlobWriter, entries: &[Entry]) -> Result<Vec<ChunkId>> {
    let mut buf = Vec::with_capacity(entries.len() * 160);
    for e in entries {
        serde_json::to_writer(&mut buf, e).expect("serializable");
        buf.push(b'\n');
    }
    let mut ids = vec![];
    for chunk in repo
        .config
        .chunker
        .split(&buf[..], Some(buf.len() as u64), repo.cdc_seed())
    {
        let chunk = chunk.map_err(|e| Error::internal(e.to_string()))?;
        let id = repo.keys.chunk_id(&chunk);
        writer.add(id, BlobKind::Tree, chunk)?;
        ids.push(id);
    }
    Ok(ids)
}

pub fn load(repo: &Repository, index: &Index, chunks: &[ChunkId]) -> Result<Vec<Entry>> {
    // Fetched side by side: on a cold cache each chunk is a disk read (or a request).
    let parts = custos_repo::repository::parallel_map(chunks, repo.threads() * 2, |id| {
        repo.read_blob(index, id)
    })?;
    let buf = parts.concat();
    let mut out = vec![];
    for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        out.push(
            serde_json::from_slice(line)
                .map_err(|e| Error::integrity(format!("manifest entry is malformed: {e}")))?,
        );
    }
    Ok(out)
}

/// Every chunk a snapshot references: its manifest's tree chunks and the data chunks of its
/// files, or its stream's chunks. What prune keeps and what verify expects in the index.
pub fn referenced_chunks(
    repo: &Repository,
    index: &Index,
    snapshot: &SnapshotId,
) -> Result<Vec<ChunkId>> {
    let body = repo.snapshot_body(snapshot)?;
    let mut refs = body.manifest.clone();
    refs.extend(&body.stream);
    if !body.manifest.is_empty() {
        let entries =
            load(repo, index, &body.manifest).map_err(|e| e.context("manifest unreadable"))?;
        refs.extend(entries.iter().flat_map(|e| e.chunk_refs().copied()));
    }
    Ok(refs)
}
