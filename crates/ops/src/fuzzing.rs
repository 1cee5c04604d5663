//! Fuzzing entry points of this layer (see `custos_repo::fuzzing`): a manifest's
//! plaintext, parsed as `manifest::load` parses it and checked as a restore checks it
//! before it writes anything.

/// A manifest's JSON lines, then the tree checks of a restore.
pub fn manifest(data: &[u8]) {
    let mut entries = vec![];
    for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<custos_sources::files::Entry>(line) {
            Ok(e) => entries.push(e),
            Err(_) => return,
        }
    }
    let _ = crate::restore::check_tree(&entries);
    // A database file's plan from its blocks and page patches (chunk lengths as an index
    // would give them: a page patch's pages long, a block's 128 KiB).
    for e in entries.iter().filter(|e| e.pages.is_some()).take(16) {
        let patches = e.pages.as_ref().expect("filtered");
        let len = |id: &custos_model::ChunkId| {
            patches
                .patches
                .iter()
                .find(|p| p.chunk == *id)
                .map(|p| p.pages.len() as u64 * 8192)
                .or_else(|| {
                    let units = patches.units.iter().find(|p| p.chunk == *id)?;
                    Some(units.pages.len() as u64 * 1024)
                })
                .or(Some(128 << 10))
        };
        let _ = crate::postgres::pages::pieces(e, len);
    }
}

/// A binary COPY stream split into rows, as table and audit-log restores and `audit
/// verify` read one back from storage.
pub fn copy_rows(data: &[u8]) {
    let mut rows = custos_sources::postgres::tables::CopyRows::new(data);
    while let Ok(Some(_)) = rows.next_row() {}
}

/// A WAL file as `wal-push` is handed it: its name (the input's first line) and its first
/// page's header (the rest), and the segment numbers a name gives at each segment size.
pub fn segment(data: &[u8]) {
    use custos_sources::postgres::wal;
    let (name, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let name = String::from_utf8_lossy(name);
    let _ = wal::classify(&name);
    for shift in 20..=30 {
        if let Some((tli, n)) = wal::segment_number(&name, 1 << shift) {
            let _ = wal::segment_name(tli, n, 1 << shift);
        }
    }
    let _ = wal::parse_header(body, "segment");
}

/// Key share files (one JSON per line), combined as `key recover` combines them.
pub fn share(data: &[u8]) {
    let files: Vec<(String, crate::keys::ShareFile)> = data
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .take(16)
        .enumerate()
        .map(|(i, f)| (format!("share {i}"), f))
        .collect();
    if let Some((_, first)) = files.first() {
        let _ = crate::keys::recover(first.repository, &files);
    }
}

/// A secondary's tombstones and marker.
pub fn tombstone(data: &[u8]) {
    custos_storage::guard::fuzz(data);
}

/// Every target by name: this layer's and the repository format's.
pub fn targets() -> Vec<custos_repo::fuzzing::Target> {
    let mut t = custos_repo::fuzzing::TARGETS.to_vec();
    t.push(("manifest", manifest));
    t.push(("copy_rows", copy_rows));
    t.push(("segment", segment));
    t.push(("share", share));
    t.push(("tombstone", tombstone));
    t
}
