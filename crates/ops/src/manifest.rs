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
    let mut refs = vec![];
    for_each_reference(repo, index, snapshot, &mut |id| refs.push(id))?;
    Ok(refs)
}

/// Calls `f` with every chunk a snapshot references (as [`referenced_chunks`] lists them),
/// reading its manifest a few chunks at a time: memory does not grow with the snapshot.
pub fn for_each_reference(
    repo: &Repository,
    index: &Index,
    snapshot: &SnapshotId,
    f: &mut dyn FnMut(ChunkId),
) -> Result<()> {
    let body = repo.snapshot_body(snapshot)?;
    body.manifest.iter().chain(&body.stream).for_each(|c| f(*c));
    let window = (repo.threads() * 2).max(1);
    let mut rest: Vec<u8> = vec![];
    let lines = |buf: &[u8], f: &mut dyn FnMut(ChunkId)| -> Result<()> {
        for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let e: Entry = serde_json::from_slice(line).map_err(|e| {
                Error::integrity(format!("manifest entry is malformed: {e}"))
                    .context("manifest unreadable")
            })?;
            e.chunk_refs().for_each(|c| f(*c));
        }
        Ok(())
    };
    for part in body.manifest.chunks(window) {
        let parts =
            custos_repo::repository::parallel_map(part, window, |id| repo.read_blob(index, id))
                .map_err(|e| e.context("manifest unreadable"))?;
        for p in parts {
            rest.extend_from_slice(&p);
            // Whole lines now; the one cut by the chunk boundary waits for the next.
            if let Some(end) = rest.iter().rposition(|b| *b == b'\n') {
                lines(&rest[..end], f)?;
                rest.drain(..=end);
            }
        }
    }
    lines(&rest, f)
}
