//! The platform's configuration: environment variables (values kept, secrets replaced by
//! references) and Terraform state (`terraform`).
//!
//! A variable is stored as a reference, never as its value, when its name says it is a
//! secret (`*KEY*`, `*SECRET*`, `*TOKEN*`, `*PASSWORD*`, `*PASSWD*`, `*CREDENTIAL*`,
//! `*PRIVATE*`), when its value is a connection string with a password, or when its value
//! looks random (20 or more characters, letters and digits, no spaces, at least 4 bits of
//! entropy per character). A reference holds the name, where the secret lives (the
//! source's `secrets_ref`), and a fingerprint keyed with the repository's id key, so a
//! changed secret shows as a changed fingerprint without the value being anywhere.

pub mod terraform;

use std::path::PathBuf;

use custos_model::{Error, Kind, Result};
use custos_repo::snapshot::{SnapshotStats, SourceKind};
use custos_repo::{Repository, Snapshot, SnapshotBody};
use serde::{Deserialize, Serialize};

use crate::backup::{BackupOptions, BackupReport, Run};

pub struct EnvOptions {
    pub name: String,
    /// Names to take (globs with `*`).
    pub allow: Vec<String>,
    /// Names to store as values although their name looks secret (refused when the value
    /// itself looks secret).
    pub plain: Vec<String>,
    /// Read this env file instead of the process environment.
    pub env_file: Option<PathBuf>,
    /// The process environment (as the CLI captured it, its own secrets removed).
    pub vars: Vec<(String, String)>,
    /// Where the secrets live, e.g. `aws-secretsmanager:prod/healthcare`.
    pub secrets_ref: Option<String>,
    /// A command that prints the secret manager's secret names (names only).
    pub list_command: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnvEntry {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    /// For a secret: where it lives.
    #[serde(default)]
    pub reference: Option<String>,
    /// For a secret: keyed fingerprint of its value.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// For a secret: why it was not stored.
    #[serde(default)]
    pub why: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvRecord {
    pub entries: Vec<EnvEntry>,
    #[serde(default)]
    pub secret_names: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvFacts {
    pub variables: usize,
    pub values: usize,
    pub references: usize,
    pub secret_names: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnvReport {
    pub backup: BackupReport,
    pub facts: EnvFacts,
    /// Names stored as references (never their values).
    pub references: Vec<String>,
}

/// `*` matches any run of characters; everything else itself.
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(p) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            match rest.find(p) {
                Some(at) => rest = &rest[at + p.len()..],
                None => return false,
            }
        }
    }
    true
}

const SECRET_WORDS: &[&str] = &[
    "KEY",
    "SECRET",
    "TOKEN",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "PRIVATE",
];

/// Why a value must not be stored, judging by the value alone.
pub fn value_secret(value: &str) -> Option<&'static str> {
    if let Some((_, rest)) = value.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if userinfo.contains(':') {
                return Some("a connection string with a password");
            }
        }
        return None;
    }
    let n = value.chars().count();
    if n >= 20
        && !value.contains(char::is_whitespace)
        && value.chars().any(|c| c.is_ascii_digit())
        && value.chars().any(|c| c.is_ascii_alphabetic())
        && entropy(value) >= 4.0
    {
        return Some("a value that looks random (a key or token)");
    }
    None
}

/// Why a variable must not be stored, by its name or its value.
pub fn secret_reason(name: &str, value: &str) -> Option<&'static str> {
    let upper = name.to_ascii_uppercase();
    if SECRET_WORDS.iter().any(|w| upper.contains(w)) {
        return Some("its name says it is a secret");
    }
    value_secret(value)
}

/// Shannon entropy in bits per character.
fn entropy(s: &str) -> f64 {
    let mut counts = std::collections::HashMap::new();
    let mut n = 0f64;
    for c in s.chars() {
        *counts.entry(c).or_insert(0f64) += 1.0;
        n += 1.0;
    }
    counts
        .values()
        .map(|c| {
            let p = c / n;
            -p * p.log2()
        })
        .sum()
}

/// Which variables a source takes, and how; refuses a `plain` name whose value looks
/// secret, naming the variable (never the value), before anything is written.
pub fn classify(repo: &Repository, o: &EnvOptions) -> Result<Vec<EnvEntry>> {
    let vars = match &o.env_file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                Error::new(Kind::Source, format!("cannot read {}: {e}", p.display()))
            })?;
            custos_sources::stream::parse_env_file(&text)
        }
        None => o.vars.clone(),
    };
    let key = blake3::derive_key("custos env fingerprint v1", repo.keys.id_key.as_ref());
    let mut out = vec![];
    for (name, value) in vars {
        if !o.allow.iter().any(|p| glob(p, &name)) {
            continue;
        }
        let forced_plain = o.plain.iter().any(|p| glob(p, &name));
        let why = if forced_plain {
            if let Some(why) = value_secret(&value) {
                return Err(Error::new(
                    Kind::Config,
                    format!(
                        "env source `{}`: `{name}` is listed as plain, but its value is {why}: it would be stored in the clear",
                        o.name
                    ),
                )
                .hint(format!("remove `{name}` from `plain` (it is then kept as a reference to your secrets manager)")));
            }
            None
        } else {
            secret_reason(&name, &value)
        };
        out.push(match why {
            None => EnvEntry {
                name,
                value: Some(value),
                reference: None,
                fingerprint: None,
                why: None,
            },
            Some(why) => {
                let mut h = blake3::Hasher::new_keyed(&key);
                h.update(name.as_bytes());
                h.update(&[0]);
                h.update(value.as_bytes());
                let fp = h.finalize().to_hex()[..32].to_string();
                EnvEntry {
                    reference: Some(match &o.secrets_ref {
                        Some(r) => format!("{r}#{name}"),
                        None => "not stored: set it from your secrets manager".into(),
                    }),
                    name,
                    value: None,
                    fingerprint: Some(fp),
                    why: Some(why.into()),
                }
            }
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn backup_env(repo: &Repository, o: &EnvOptions, opts: &BackupOptions) -> Result<EnvReport> {
    let entries = classify(repo, o)?;
    let secret_names = match &o.list_command {
        Some(c) => String::from_utf8_lossy(&custos_sources::stream::capture(c, None)?)
            .split_whitespace()
            .map(String::from)
            .collect(),
        None => vec![],
    };
    let mut run = Run::begin(repo, SourceKind::Env, &o.name)?;
    let facts = EnvFacts {
        variables: entries.len(),
        values: entries.iter().filter(|e| e.value.is_some()).count(),
        references: entries.iter().filter(|e| e.reference.is_some()).count(),
        secret_names: secret_names.len(),
    };
    run.facts = Some(serde_json::to_value(&facts).expect("serializable"));
    let references = entries
        .iter()
        .filter(|e| e.reference.is_some())
        .map(|e| e.name.clone())
        .collect();
    let record = EnvRecord {
        entries,
        secret_names,
    };
    let body = SnapshotBody {
        paths: vec![o.name.clone()],
        record: Some(serde_json::to_value(&record).expect("serializable")),
        ..Default::default()
    };
    let stats = SnapshotStats {
        files: facts.variables as u64,
        ..Default::default()
    };
    let backup = run.finish(opts, stats, &body, vec![])?;
    Ok(EnvReport {
        backup,
        facts,
        references,
    })
}

/// The env file a restore writes: plain values, and each secret as a comment saying
/// where it lives.
pub fn env_file(repo: &Repository, snap: &Snapshot) -> Result<String> {
    let rec: EnvRecord = crate::backup::record(repo, snap, SourceKind::Env, "an env snapshot")?;
    let mut s = format!(
        "# custos: environment `{}` as of {} (snapshot {})\n",
        snap.summary.source,
        snap.summary.time.format("%Y-%m-%d %H:%M:%S UTC"),
        snap.id.short()
    );
    for e in &rec.entries {
        match (&e.value, &e.reference) {
            (Some(v), _) => {
                let plain = v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./:@,+=".contains(c));
                if plain {
                    s.push_str(&format!("{}={v}\n", e.name));
                } else {
                    s.push_str(&format!("{}='{}'\n", e.name, v.replace('\'', "'\\''")));
                }
            }
            (None, Some(r)) => s.push_str(&format!(
                "# {}: secret ({}), not stored; from {r}; fingerprint {}\n",
                e.name,
                e.why.as_deref().unwrap_or("secret"),
                e.fingerprint.as_deref().unwrap_or("-")
            )),
            _ => {}
        }
    }
    if !rec.secret_names.is_empty() {
        s.push_str(&format!(
            "# the secrets manager held {} secret(s): {}\n",
            rec.secret_names.len(),
            rec.secret_names.join(", ")
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_secret_rules() {
        assert!(glob("APP_*", "APP_MODE"));
        assert!(glob("*", "ANY"));
        assert!(glob("*_URL", "DATABASE_URL"));
        assert!(glob("A*B*C", "AxxBxxC"));
        assert!(!glob("APP_*", "XAPP_MODE"));
        assert!(!glob("A*B*C", "AxxC"));
        assert!(secret_reason("STRIPE_SECRET_KEY", "x").is_some());
        assert!(secret_reason("DATABASE_URL", "postgresql://app:hunter2@db/app").is_some());
        assert!(secret_reason("DATABASE_URL", "postgresql://app@db/app").is_none());
        assert!(secret_reason("SOMETHING", "q8Zr3kLmP0xVb7NwT2yHs9DfGj4Ua6Ce1Ko5Ri").is_some());
        assert!(secret_reason("APP_MODE", "production").is_none());
        assert!(secret_reason("PUBLIC_URL", "https://app.example.org/health").is_none());
        assert!(secret_reason("LOG_LEVEL", "info,custos=debug").is_none());
    }
}
