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
}

/// Every target by name: this layer's and the repository format's.
pub fn targets() -> Vec<custos_repo::fuzzing::Target> {
    let mut t = custos_repo::fuzzing::TARGETS.to_vec();
    t.push(("manifest", manifest));
    t
}
