//! Names as the file system gives them: bytes, not text.
//!
//! A Unix file name is any byte string without `/` and NUL. Storing names as Rust strings
//! (lossily) renames the ones that are not UTF-8, and makes distinct names collide: `s\xfe`
//! and `s\xff` both become `s\u{FFFD}`, one path twice in a manifest. [`PathBytes`] keeps
//! the bytes; it serializes as a JSON string when they are UTF-8 (every name a manifest
//! held before) and as `{"b64": "<base64>"}` when they are not, so no two names share a
//! form. What people read goes through [`escape`]: invalid bytes and control characters
//! are shown as escapes, never sent raw to a terminal.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A path as bytes, `/`-separated (relative in manifests; a symlink's target may be
/// anything).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathBytes(Vec<u8>);

impl PathBytes {
    pub fn new(bytes: Vec<u8>) -> PathBytes {
        PathBytes(bytes)
    }

    pub fn from_os(s: &OsStr) -> PathBytes {
        PathBytes(s.as_bytes().to_vec())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path for system calls (exact bytes).
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// The path as text, when it is UTF-8.
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `self/name`, or `name` when self is empty.
    pub fn join(&self, name: &[u8]) -> PathBytes {
        if self.0.is_empty() {
            return PathBytes(name.to_vec());
        }
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        v.push(b'/');
        v.extend_from_slice(name);
        PathBytes(v)
    }

    /// The components between slashes.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|b| *b == b'/')
    }

    /// Everything before the last slash (None for a single component).
    pub fn parent(&self) -> Option<&[u8]> {
        let i = self.0.iter().rposition(|b| *b == b'/')?;
        Some(&self.0[..i])
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// Whether `prefix` is this path or one of its folders (whole components).
    pub fn is_within(&self, prefix: &[u8]) -> bool {
        self.0.starts_with(prefix)
            && (self.0.len() == prefix.len() || prefix.is_empty() || self.0[prefix.len()] == b'/')
    }

    /// Why this cannot be a path relative to a snapshot's root, if it cannot: empty, absolute,
    /// an empty, `.` or `..` component, or a NUL byte.
    pub fn relative_problem(&self) -> Option<&'static str> {
        if self.0.is_empty() {
            Some("it is empty")
        } else if self.0[0] == b'/' {
            Some("it is absolute")
        } else if self.0.contains(&0) {
            Some("it holds a NUL byte")
        } else if self
            .components()
            .any(|c| c.is_empty() || c == b"." || c == b"..")
        {
            Some("it has an empty, `.` or `..` component")
        } else {
            None
        }
    }

    /// The path as text with invalid bytes replaced: for matching against names that are
    /// text (PostgreSQL's own files), never for writing.
    pub fn lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }

    /// For people: UTF-8 shown as is, other bytes and control characters escaped.
    pub fn display(&self) -> Cow<'_, str> {
        escape_bytes(&self.0)
    }
}

impl fmt::Display for PathBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

impl fmt::Debug for PathBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.display())
    }
}

impl std::borrow::Borrow<[u8]> for PathBytes {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for PathBytes {
    fn from(s: &str) -> PathBytes {
        PathBytes(s.as_bytes().to_vec())
    }
}

impl From<String> for PathBytes {
    fn from(s: String) -> PathBytes {
        PathBytes(s.into_bytes())
    }
}

impl From<&Path> for PathBytes {
    fn from(p: &Path) -> PathBytes {
        PathBytes::from_os(p.as_os_str())
    }
}

impl PartialEq<str> for PathBytes {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for PathBytes {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

#[derive(Serialize, Deserialize)]
struct Raw {
    b64: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Form {
    Text(String),
    Raw(Raw),
}

impl Serialize for PathBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(t) => s.serialize_str(t),
            Err(_) => Raw {
                b64: base64::engine::general_purpose::STANDARD.encode(&self.0),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for PathBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PathBytes, D::Error> {
        match Form::deserialize(d)? {
            Form::Text(t) => Ok(PathBytes(t.into_bytes())),
            Form::Raw(r) => {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(r.b64)
                    .map_err(serde::de::Error::custom)?;
                // The raw form is for names that are not UTF-8; a writer never uses it for
                // one that is, so a manifest holds each name in one form only.
                if std::str::from_utf8(&b).is_ok() {
                    return Err(serde::de::Error::custom(
                        "a UTF-8 name in the raw (b64) form",
                    ));
                }
                Ok(PathBytes(b))
            }
        }
    }
}

/// Bytes for people: valid UTF-8 as is, invalid bytes as `\xNN`, control characters (and
/// the backslash, so the form is unambiguous) escaped.
pub fn escape_bytes(b: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => escape(s),
        Err(_) => {
            let mut out = String::with_capacity(b.len() + 8);
            for chunk in b.utf8_chunks() {
                out.push_str(&escape(chunk.valid()));
                for x in chunk.invalid() {
                    out.push_str(&format!("\\x{x:02x}"));
                }
            }
            Cow::Owned(out)
        }
    }
}

/// Text for a terminal: control characters (C0, DEL, C1, and the bidirectional overrides
/// that reorder what is shown) escaped, and the backslash doubled when anything is.
pub fn escape(s: &str) -> Cow<'_, str> {
    let bad = |c: char| {
        c.is_control()
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            || c == '\\'
    };
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if bad(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_differ_in_bytes_stay_distinct_through_json() {
        let a = PathBytes::new(b"s\xfe".to_vec());
        let b = PathBytes::new(b"s\xff".to_vec());
        let ja = serde_json::to_string(&a).unwrap();
        let jb = serde_json::to_string(&b).unwrap();
        assert_ne!(ja, jb);
        assert_eq!(serde_json::from_str::<PathBytes>(&ja).unwrap(), a);
        assert_eq!(serde_json::from_str::<PathBytes>(&jb).unwrap(), b);
        // UTF-8 names keep the plain form manifests always had.
        let t = PathBytes::from("docs/\u{e9}t\u{e9}.pdf");
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"docs/\u{e9}t\u{e9}.pdf\""
        );
        assert_eq!(
            serde_json::from_str::<PathBytes>("\"docs/\u{e9}t\u{e9}.pdf\"").unwrap(),
            t
        );
    }

    #[test]
    fn a_utf8_name_in_the_raw_form_is_refused() {
        // Else `a` could appear twice in a manifest, once in each form.
        let raw = format!(
            "{{\"b64\": \"{}\"}}",
            base64::engine::general_purpose::STANDARD.encode("a")
        );
        assert!(serde_json::from_str::<PathBytes>(&raw).is_err());
    }

    #[test]
    fn relative_paths_are_checked() {
        for bad in ["", "/etc", "a//b", "a/./b", "../x", "a/..", "a/"] {
            assert!(PathBytes::from(bad).relative_problem().is_some(), "{bad}");
        }
        assert!(PathBytes::new(b"a\0b".to_vec())
            .relative_problem()
            .is_some());
        for good in ["a", "a/b", "..a/b..", ".hidden/x"] {
            assert_eq!(PathBytes::from(good).relative_problem(), None, "{good}");
        }
    }

    #[test]
    fn display_escapes_what_a_terminal_would_act_on() {
        let p = PathBytes::new(b"a\x1b[31mred\n\xff\\".to_vec());
        assert_eq!(p.display(), "a\\u{1b}[31mred\\n\\xff\\\\");
        assert_eq!(escape("plain text"), "plain text");
        assert_eq!(escape("rtl\u{202e}txt"), "rtl\\u{202e}txt");
    }

    #[test]
    fn within_is_by_whole_components() {
        let p = PathBytes::from("documents/patient-0042/a.pdf");
        assert!(p.is_within(b"documents"));
        assert!(p.is_within(b"documents/patient-0042"));
        assert!(p.is_within(b"documents/patient-0042/a.pdf"));
        assert!(!p.is_within(b"documents/patient-004"));
        assert!(p.is_within(b""));
    }
}
