//! The one user-facing error type.
//!
//! Policy (after rustic_core and pgBackRest): every error carries a [`Kind`] with a stable
//! numeric code and process exit code, a message that names what is wrong, and a hint that
//! says what to do. Whether retrying can help is a property of the kind. Errors never carry
//! secrets: callers put names and paths in messages, never passwords or key material.

use std::fmt;

/// What went wrong, as scripts see it. Codes and exit codes are stable: documented in
/// `docs/exit-codes.md`; never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A bug or an unexpected condition.
    Internal,
    /// Bad command line or configuration file.
    Config,
    /// No repository at the given location.
    RepoNotFound,
    /// `init` on a location that already holds a repository.
    RepoExists,
    /// The password opens no key of this repository.
    Authentication,
    /// The key is valid but its role does not allow the operation.
    Permission,
    /// Another process holds a conflicting lock.
    Locked,
    /// Stored data is corrupt, missing or fails authentication.
    Integrity,
    /// The storage backend cannot be reached or refused the credentials.
    Storage,
    /// A snapshot, key or path named by the user does not exist.
    NotFound,
    /// The backup source failed (unreadable path, failing command).
    Source,
    /// The backup finished but some files could not be read.
    Partial,
    /// An object exists with different content under the same name.
    Conflict,
    /// A health check found a problem (archiving lag, a WAL gap).
    Check,
    /// Archived (cold) objects a restore needs are being brought back by the store.
    Cold,
}

impl Kind {
    /// Stable short code shown with every error (`custos: error E12 ...`).
    pub fn code(self) -> u16 {
        match self {
            Kind::Internal => 1,
            Kind::Config => 2,
            Kind::Partial => 3,
            Kind::RepoNotFound => 10,
            Kind::Locked => 11,
            Kind::Authentication => 12,
            Kind::Permission => 13,
            Kind::Integrity => 14,
            Kind::Storage => 15,
            Kind::NotFound => 16,
            Kind::Source => 17,
            Kind::Conflict => 18,
            Kind::RepoExists => 19,
            Kind::Check => 20,
            Kind::Cold => 21,
        }
    }

    /// Process exit code; equal to the code so that scripts and docs use one number.
    pub fn exit_code(self) -> i32 {
        i32::from(self.code())
    }

    /// Whether running the same command again may succeed without changing anything.
    pub fn retryable(self) -> bool {
        matches!(self, Kind::Locked | Kind::Storage | Kind::Cold)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Internal => "internal",
            Kind::Config => "config",
            Kind::RepoNotFound => "repository-not-found",
            Kind::RepoExists => "repository-exists",
            Kind::Authentication => "authentication",
            Kind::Permission => "permission",
            Kind::Locked => "locked",
            Kind::Integrity => "integrity",
            Kind::Storage => "storage",
            Kind::NotFound => "not-found",
            Kind::Source => "source",
            Kind::Partial => "partial",
            Kind::Conflict => "conflict",
            Kind::Check => "check-failed",
            Kind::Cold => "cold-pending",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    pub hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Prefixes the message with what was being done, keeping kind and hint.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(Kind::Internal, message)
    }

    pub fn config(message: impl Into<String>) -> Self {
        Error::new(Kind::Config, message)
    }

    pub fn integrity(message: impl Into<String>) -> Self {
        Error::new(Kind::Integrity, message).hint(
            "run `custos verify --read-data` to list every damaged object; restore from a \
             replica or re-run the backup to store the data again",
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Maps an I/O error of a local path to an error that names the path.
pub fn io_error(kind: Kind, path: &std::path::Path, e: std::io::Error) -> Error {
    Error::new(kind, format!("{}: {e}", path.display()))
}

/// An error and every cause under it, joined by ": " (what a library's own message leaves
/// out: "error sending request: connection refused", "invalid peer certificate").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
