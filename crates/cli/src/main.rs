//! The `custos` binary: arguments, settings, output and exit codes. All work is done by
//! the library crates; this is the only place that reads the environment, prints or exits.

mod output;
mod settings;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use custos_crypto::kdf::KdfParams;
use custos_crypto::Role;
use custos_model::path::escape as esc;
use custos_model::retention::RetentionPolicy;
use custos_model::{ByteSize, Error, Kind, Result};
use custos_ops::maintenance::{forget, prune, verify};
use custos_ops::postgres::backup as pg_backup;
use custos_ops::{backup, files, restore};
use custos_repo::snapshot::PgBackupType;
use custos_repo::snapshot::SourceKind;
use custos_repo::{OpenOptions, Repository};
use custos_storage::url::Location;
use custos_storage::DynStorage;
use output::{mb_per_s, Out};
use settings::{Env, Settings};

#[derive(Parser)]
#[command(
    name = "custos",
    version,
    about = "Encrypted, deduplicated, verifiable backups",
    max_term_width = 100
)]
struct Cli {
    /// Repository location: a path, s3://bucket/prefix, or another OpenDAL scheme [env: CUSTOS_REPO]
    #[arg(long, global = true)]
    repo: Option<String>,
    /// Config file (TOML) [env: CUSTOS_CONFIG]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print one JSON document on stdout instead of text
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars and less text
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Log more (repeat for more detail); logs go to stderr [env: CUSTOS_LOG]
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct KdfArgs {
    /// Argon2id memory in MiB for the new key (default 64). An archiver's backup key whose
    /// password is a long random string in a 0600 file can use 1: the KDF protects
    /// guessable passwords, and every wal-push pays it (8 MiB cost 23 ms per segment).
    #[arg(long, value_name = "MIB")]
    kdf_memory_mib: Option<u32>,
    /// Argon2id iterations for the new key (default 3).
    #[arg(long, value_name = "N")]
    kdf_iterations: Option<u32>,
}

impl KdfArgs {
    fn params(&self) -> KdfParams {
        KdfParams::new(self.kdf_memory_mib, self.kdf_iterations)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a repository and its restore key (password from CUSTOS_PASSWORD* or a prompt)
    #[command(
        after_help = "Example:\n  custos init --owner postgres    # a local repository for the archive_command of postgres"
    )]
    Init {
        #[command(flatten)]
        kdf: KdfArgs,
        /// Target size of pack objects in MiB (default 16; larger suits high-latency stores)
        #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=512))]
        pack_size_mib: Option<u64>,
        /// Block size for database files in KiB (default 128: compresses well, small index;
        /// 8 = one page, for databases whose writes touch few, scattered pages)
        #[arg(long, value_name = "KIB", value_parser = ["8", "16", "32", "64", "128"])]
        db_block_kib: Option<String>,
        /// A local repository for this OS user (run as root): the folder and everything in
        /// it belong to USER, e.g. postgres, whose archive_command writes to it
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
    },
    /// Manage the keys that open the repository
    #[command(subcommand)]
    Key(KeyCommand),
    /// Back up a source
    #[command(subcommand)]
    Backup(BackupCommand),
    /// The repository at a glance: per database cluster its newest backup, age, restorable
    /// window and WAL gaps; per source its newest snapshot; the repository's size.
    /// Example: `custos info --json | jq '.clusters[] | .newest.age_seconds'`
    #[command(after_help = "Example:\n  custos info --json | jq '.clusters[].newest.age_seconds'")]
    Info,
    /// List snapshots
    #[command(after_help = "Example:\n  custos snapshots --source /srv/documents --json")]
    Snapshots {
        /// Only snapshots of this source
        #[arg(long)]
        source: Option<String>,
    },
    /// List the contents of a snapshot
    #[command(after_help = "Example:\n  custos ls latest --source /srv/documents")]
    Ls {
        /// The snapshot: an id (prefix), or `latest` (the newest that is not a stream, as
        /// `restore files latest` picks it)
        snapshot: String,
        /// With `latest`: the latest snapshot of this source
        #[arg(long)]
        source: Option<String>,
    },
    /// Restore a snapshot
    #[command(subcommand)]
    Restore(RestoreCommand),
    /// Check the repository; with --read-data, read back and authenticate stored data
    #[command(after_help = "Example:\n  custos verify --read-data --subset 10%")]
    Verify {
        /// Read every pack back: re-hash it and (restore key) decrypt and check every blob
        #[arg(long)]
        read_data: bool,
        /// Read only part of the data: a percentage like 10%
        #[arg(long, value_name = "PERCENT", requires = "read_data")]
        subset: Option<String>,
    },
    /// Remove snapshots by retention policy (flags, or [retention] in custos.toml)
    #[command(
        after_help = "Example:\n  custos forget --keep-daily 30 --keep-weekly 12 --keep-monthly 12 --keep-yearly 7 --dry-run"
    )]
    Forget {
        /// Remove these snapshots (ids or unique prefixes) instead of applying a policy.
        /// Example: `custos forget 3f2a9c01 --dry-run`
        snapshots: Vec<String>,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Show what would be kept and removed, and why; change nothing
        #[arg(long)]
        dry_run: bool,
        /// Run prune afterwards
        #[arg(long)]
        prune: bool,
    },
    /// Remove data that no snapshot references
    #[command(after_help = "Example:\n  custos prune --dry-run")]
    Prune {
        /// Show what would be deleted and rewritten; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove stale locks left by crashed processes
    #[command(after_help = "Example:\n  custos unlock")]
    Unlock,
    /// The operation trail: who did what to the repository, hash-chained and signed
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print the AWS IAM policy that enforces a role at the storage layer
    #[command(
        after_help = "Example:\n  custos iam-policy --role backup --bucket backups --prefix prod > backup-policy.json"
    )]
    IamPolicy {
        /// The role the policy is for
        #[arg(long, value_parser = ["backup", "restore", "audit"])]
        role: String,
        /// The repository's bucket
        #[arg(long)]
        bucket: String,
        /// The repository's prefix in the bucket
        #[arg(long, default_value = "")]
        prefix: String,
        /// Restore role only: also allow forget and prune to delete
        #[arg(long)]
        allow_delete: bool,
    },
    /// PostgreSQL checks
    #[command(subcommand)]
    Pg(PgCommand),
    /// Archive one WAL file: use as archive_command = 'custos wal-push %p'
    #[command(
        after_help = "Example:\n  archive_command = '/usr/local/bin/custos --config /etc/custos/db.toml wal-push --async %p'"
    )]
    WalPush {
        /// The WAL file (PostgreSQL's %p: a path under pg_wal)
        #[arg(required_unless_present = "drain")]
        path: Option<PathBuf>,
        /// Data directory of the cluster [env: PGDATA; default: the current directory,
        /// where PostgreSQL runs archive_command]
        #[arg(long)]
        pgdata: Option<PathBuf>,
        /// A background pusher reads ahead every file PostgreSQL has ready and uploads in
        /// parallel; this call answers once the repository holds its file
        #[arg(long = "async")]
        is_async: bool,
        /// With --async: how long to wait for the pusher before failing (PostgreSQL retries)
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        async_timeout: String,
        /// Upload what waits in the spool, then exit once it stays empty (started by --async)
        #[arg(long, hide = true)]
        drain: bool,
    },
    /// Fetch one archived WAL file: use as restore_command = 'custos wal-fetch %f %p'
    #[command(
        after_help = "Example:\n  restore_command = '/usr/local/bin/custos --config /etc/custos/db.toml wal-fetch %f %p'"
    )]
    WalFetch {
        /// The WAL file's name (PostgreSQL's %f)
        name: String,
        /// Where to write it (PostgreSQL's %p)
        dest: PathBuf,
        /// Data directory of the cluster being recovered [env: PGDATA; default: the current directory]
        #[arg(long)]
        pgdata: Option<PathBuf>,
    },
}

#[derive(Args, Clone, Default)]
struct PolicyArgs {
    /// Keep the N newest snapshots of each group
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N days that have one
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N weeks that have one
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the last N years that have one
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Keep all snapshots within this duration of the newest (e.g. 7d)
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
}

#[derive(Subcommand)]
enum PgCommand {
    /// Archiving health: settings, pg_stat_archiver, lag, and gaps in the archived WAL.
    /// Exits 20 when something is wrong (for monitors: --json).
    #[command(
        after_help = "Example:\n  custos pg check --max-lag 15m --max-backup-age 26h --json"
    )]
    Check {
        /// Connection string; otherwise PGHOST, PGPORT, PGUSER, PGDATABASE
        #[arg(long)]
        db_url: Option<String>,
        /// Fail when segments have waited longer than this to be archived
        #[arg(long, default_value = "15m")]
        max_lag: String,
        /// Fail when the cluster's newest base backup is older than this (like 26h)
        #[arg(long, value_name = "DURATION")]
        max_backup_age: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// List the trail's entries (any key; audit keys exist for this)
    #[command(after_help = "Example:\n  custos audit log --since 30d")]
    Log {
        /// Only entries at or after this time (RFC 3339) or within this duration (like 7d)
        #[arg(long)]
        since: Option<String>,
    },
    /// Prove the trail complete and untampered; names the first bad entry (exit 14)
    #[command(after_help = "Example:\n  custos audit verify --json")]
    Verify,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// List keys (never secrets)
    #[command(after_help = "Example:\n  custos key list")]
    List,
    /// Add a key opened by a new password (CUSTOS_NEW_PASSWORD[_FILE] or a prompt)
    #[command(
        after_help = "Example:\n  CUSTOS_NEW_PASSWORD_FILE=/etc/custos/backup.pw custos key add --role backup --kdf-memory-mib 8"
    )]
    Add {
        /// backup: writes, cannot read back; restore: reads everything; audit: the trail only
        #[arg(long, value_parser = ["backup", "restore", "audit"])]
        role: String,
        /// Restore keys only: may also forget, prune and remove keys
        #[arg(long)]
        allow_delete: bool,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Remove a key by id (prefix)
    #[command(after_help = "Example:\n  custos key remove 3f2a9c01")]
    Remove {
        /// The key's id, or a unique prefix of it (`custos key list`)
        id: String,
    },
    /// Age of every key against the crypto-period ([keys] max_age, default 90d)
    #[command(after_help = "Example:\n  custos key status --json")]
    Status,
    /// New data key pair for new data; old data stays readable (old secrets are kept,
    /// sealed under the new chain). With --rewrap, every stored data key is re-wrapped to
    /// the new pair (packs are not rewritten) and new keys need no old secret
    #[command(after_help = "Example:\n  custos key rotate --rewrap")]
    Rotate {
        /// Also re-wrap every stored data key to the new pair (packs are not rewritten)
        #[arg(long)]
        rewrap: bool,
    },
    /// Split the restore key into N share files, any M of which rebuild it (Shamir)
    #[command(
        after_help = "Example:\n  custos key split --shares 5 --threshold 3 --out /secure/shares"
    )]
    Split {
        /// How many share files to make (one per holder)
        #[arg(long, value_parser = clap::value_parser!(u8).range(2..=255))]
        shares: u8,
        /// How many of them rebuild the key
        #[arg(long, value_parser = clap::value_parser!(u8).range(2..=255))]
        threshold: u8,
        /// Folder for the share files (created 0700; each file 0600: hand one to each holder)
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuild a restore key from share files and add it under a new password
    /// (CUSTOS_NEW_PASSWORD[_FILE] or a prompt); needs no other key
    #[command(
        after_help = "Example:\n  CUSTOS_NEW_PASSWORD_FILE=/root/new.pw custos key recover share-1.json share-4.json share-5.json"
    )]
    Recover {
        /// The share files (at least the threshold of them)
        #[arg(required = true)]
        share_files: Vec<PathBuf>,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Change the password of the key in use
    #[command(after_help = "Example:\n  CUSTOS_NEW_PASSWORD_FILE=/root/new.pw custos key passwd")]
    Passwd {
        #[command(flatten)]
        kdf: KdfArgs,
    },
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Back up folders, or a bucket given as s3://bucket/prefix
    #[command(
        after_help = "Example:\n  custos backup files /srv/documents /etc/platform --tag daily"
    )]
    Files {
        /// Folders or files to back up, or one bucket as s3://bucket/prefix; several paths
        /// sit in the snapshot under their own names
        #[arg(required = true)]
        paths: Vec<String>,
        /// A tag for the snapshot (repeat for more)
        #[arg(long)]
        tag: Vec<String>,
        /// Record this time (RFC 3339) instead of now, e.g. when importing older backups
        #[arg(long, value_name = "TIME")]
        time: Option<String>,
    },
    /// Back up standard input, or the output of --command
    #[command(
        after_help = "Example:\n  custos backup stream --name terraform --command 'terraform state pull'"
    )]
    Stream {
        /// The stream's name in listings (restore it with `--source NAME`)
        #[arg(long)]
        name: String,
        /// Command whose output is backed up; it must exit 0 for the backup to count
        #[arg(long)]
        command: Option<String>,
        /// A tag for the snapshot (repeat for more)
        #[arg(long)]
        tag: Vec<String>,
        /// Record this time (RFC 3339) instead of now
        #[arg(long, value_name = "TIME")]
        time: Option<String>,
    },
    /// Base backup of a running PostgreSQL cluster (15 or later, primary or standby): its
    /// data directory read between pg_backup_start and pg_backup_stop, or streamed by
    /// pg_basebackup with --replication
    #[command(
        after_help = "Example:\n  custos --config /etc/custos/db.toml backup postgres --type full"
    )]
    Postgres {
        /// full reads every file; incremental reads only files changed since the last
        /// backup of the cluster. Both are restorable on their own.
        #[arg(long = "type", value_parser = ["full", "incremental"], default_value = "incremental")]
        backup_type: String,
        /// Connection string; otherwise PGHOST, PGPORT, PGUSER, PGDATABASE or [postgres]
        #[arg(long)]
        db_url: Option<String>,
        /// Data directory [env: PGDATA; default: the server's data_directory]
        #[arg(long)]
        pgdata: Option<PathBuf>,
        /// A name for the cluster in listings (default: [postgres] name, else its system id)
        #[arg(long)]
        cluster: Option<String>,
        /// Also store the WAL from start to end of the backup: restorable without the archive
        #[arg(long)]
        wal: bool,
        /// How long to wait for the backup's last WAL segment to be archived
        #[arg(long, value_name = "DURATION", default_value = "2m")]
        archive_timeout: String,
        /// Stream the backup over the replication protocol (pg_basebackup) instead of
        /// reading the data directory: for a cluster on another host [[postgres] replication]
        #[arg(long)]
        replication: bool,
        /// Folder of PostgreSQL's programs for --replication [[postgres] bin; default: the
        /// server's version under /usr/lib/postgresql, else PATH]
        #[arg(long, value_name = "DIR")]
        pg_bin: Option<PathBuf>,
        /// A tag for the snapshot (repeat for more)
        #[arg(long)]
        tag: Vec<String>,
    },
    /// Back up every [[source]] of custos.toml, in order
    #[command(after_help = "Example:\n  custos --config /etc/custos/custos.toml backup all")]
    All,
}

#[derive(Subcommand)]
enum RestoreCommand {
    /// Restore a file snapshot into a folder. Paths keep their place in the snapshot
    /// (--include restores some of them, under the same folders); SNAPSHOT:PATH restores
    /// what lies under PATH into the folder itself.
    #[command(
        after_help = "Examples:\n  custos restore files latest --to /restore --include documents/patient-0042   # /restore/documents/patient-0042\n  custos restore files latest:documents/patient-0042 --to /restore/patient-0042  # its files right in it"
    )]
    Files {
        /// The snapshot: an id (prefix) or `latest` (the newest of the right kind), with
        /// `:PATH` to restore only what lies under PATH, into the target itself
        snapshot: String,
        /// The folder to restore into (created if missing; must be empty without
        /// --overwrite or --delta)
        #[arg(long)]
        to: PathBuf,
        /// Restore only this path of the snapshot, under the folders it is in (repeatable)
        #[arg(long)]
        include: Vec<String>,
        /// Allow a non-empty target folder; its files that are in the snapshot are replaced
        #[arg(long, conflicts_with = "delta")]
        overwrite: bool,
        /// Make the target folder equal to the snapshot: rewrite only the blocks that differ
        /// and remove what the snapshot does not hold
        #[arg(long)]
        delta: bool,
        /// With `latest`: the latest snapshot of this source
        #[arg(long)]
        source: Option<String>,
    },
    /// Restore a PostgreSQL cluster to a point in time into a data directory
    #[command(
        after_help = "Example:\n  CUSTOS_PASSWORD_FILE=/etc/custos/restore.pw custos restore postgres --to /var/lib/postgresql/18/restored \\\n      --target-time '2026-11-28 02:55:00+00' --port 5433 --no-archiving"
    )]
    Postgres {
        /// The data directory to create (or correct in place with --delta)
        #[arg(long)]
        to: PathBuf,
        /// Recover to this time, with its zone: `2026-01-31 02:00:00+01`, `... UTC`, or RFC 3339
        #[arg(long, value_name = "TIME", group = "target_kind")]
        target_time: Option<String>,
        /// Recover to this WAL position (like 0/3000060)
        #[arg(long, value_name = "LSN", group = "target_kind")]
        target_lsn: Option<String>,
        /// Recover up to and including this transaction id
        #[arg(long, value_name = "XID", group = "target_kind")]
        target_xid: Option<u64>,
        /// Recover to a restore point made with pg_create_restore_point()
        #[arg(long, value_name = "NAME", group = "target_kind")]
        target_name: Option<String>,
        /// `immediate`: stop as soon as the backup is consistent. Default: replay all archived WAL
        #[arg(long, value_parser = ["immediate"], group = "target_kind")]
        target: Option<String>,
        /// Restore this base backup (default: the newest that ends before the target)
        #[arg(long)]
        snapshot: Option<String>,
        /// The cluster (name or system id) when the repository holds several
        #[arg(long)]
        cluster: Option<String>,
        /// Correct an existing data directory: rewrite only blocks that differ, remove extra files
        #[arg(long)]
        delta: bool,
        /// restore_command to write (default: this custos with the same repository and password source)
        #[arg(long, value_name = "COMMAND")]
        restore_command: Option<String>,
        /// Port for the restored server (to run it beside the original)
        #[arg(long)]
        port: Option<u16>,
        /// Turn archiving off in the restored server: for drills and copies, so they do not
        /// archive a new timeline into the production repository
        #[arg(long)]
        no_archiving: bool,
    },
    /// Write a stream snapshot to standard output
    #[command(
        after_help = "Example:\n  custos restore stream latest --source terraform > terraform.tfstate"
    )]
    Stream {
        /// The snapshot: an id (prefix) or `latest`
        snapshot: String,
        /// With `latest`: the latest snapshot of this stream name
        #[arg(long)]
        source: Option<String>,
    },
}

struct Ctx {
    env: Env,
    settings: Settings,
    out: Out,
    /// Set when the repository is opened: what appending to the trail needs.
    trail: std::cell::RefCell<Option<(custos_repo::trail::TrailWriter, Role, custos_model::KeyId)>>,
    /// What the command touched, for its trail entry.
    touched: std::cell::RefCell<serde_json::Value>,
    /// A key the command created, with its signing key, for its trail entry.
    introduces: std::cell::RefCell<Option<(custos_model::KeyId, String, Role)>>,
    /// `init`: the repository's trail authority, named in its entry.
    authority: std::cell::RefCell<Option<String>>,
}

impl Ctx {
    fn storage(&self) -> Result<DynStorage> {
        let loc = self.settings.location()?;
        let s = custos_storage::url::open(&loc, &self.settings.storage)?;
        Ok(match self.settings.kill_before_write {
            Some(n) => Arc::new(custos_storage::fault::KillBeforeWrite::new(s, n)),
            None => s,
        })
    }

    fn open_opts(&self) -> OpenOptions {
        OpenOptions {
            host: self.settings.host.clone(),
            user: self.settings.user.clone(),
            threads: 0,
        }
    }

    fn open(&self) -> Result<Repository> {
        self.open_with(|_| {})
    }

    /// [`Ctx::open`] for a restore: the packs start to be read ahead while the key is
    /// derived (the restore stops that once it is planned).
    fn open_to_restore(&self) -> Result<Repository> {
        self.open_with(|s| s.warm(custos_repo::paths::DATA))
    }

    fn open_with(&self, before_key: impl FnOnce(&DynStorage)) -> Result<Repository> {
        let storage = self.storage()?;
        // Fail on a missing repository, or one this user cannot write to (every command
        // appends to its trail), before asking for a password.
        storage.check_writable()?;
        Repository::read_config(&storage)?;
        before_key(&storage);
        let pw = self.settings.password(&self.env, "repository password: ")?;
        let repo = Repository::open(storage, pw.as_bytes(), self.open_opts())?;
        tracing::debug!("opened the repository with key {}", repo.key_id.short());
        self.opened(&repo);
        Ok(repo)
    }

    fn opened(&self, repo: &Repository) {
        let mut writer = repo.trail_writer();
        if let Some(dir) = &self.settings.cache_dir {
            writer = writer.with_hint(dir.join(repo.config.id.to_hex()).join("trail-last"));
        }
        *self.trail.borrow_mut() = Some((writer, repo.role(), repo.key_id));
    }

    fn touch(&self, v: serde_json::Value) {
        *self.touched.borrow_mut() = v;
    }

    /// Appends the command's trail entry. A trail that cannot be written does not undo
    /// what the command did, but is an error of its own: an operation the trail does not
    /// show must not pass for recorded (nor a trail for complete).
    fn record(&self, command: &str, result: &Result<i32>) -> Result<()> {
        let Some((writer, role, key)) = self.trail.borrow_mut().take() else {
            return Ok(());
        };
        let intro = self.introduces.take();
        let entry = custos_repo::trail::Entry {
            time: chrono::Utc::now(),
            role: role.as_str().into(),
            key,
            host: self.settings.host.clone(),
            user: self.settings.user.clone(),
            command: command.into(),
            touched: self.touched.take(),
            result: match result {
                Ok(0) => "ok".into(),
                Ok(c) => format!("exit {c}"),
                Err(e) => format!("error E{:02}: {}", e.kind.code(), e.message),
            },
            introduces: intro.as_ref().map(|(id, public, _)| (*id, public.clone())),
            introduces_role: intro.map(|(_, _, role)| role.as_str().to_string()),
            authority: self.authority.take(),
        };
        writer.append(&entry).map(|_| ()).map_err(|e| {
            Error::new(
                e.kind,
                format!(
                    "`{command}` {} but its entry in the operation trail could not be written: {}",
                    if result.is_ok() { "finished" } else { "failed" },
                    e.message
                ),
            )
            .hint("the operation is not recorded: run custos as the OS user that owns the repository, check the storage is writable, and run the command again")
        })
    }
}

fn main() {
    let env = Env::capture();
    // Repository files and caches are private whatever the caller's umask.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => usage_error(e),
    };
    let filter = std::env::var("CUSTOS_LOG").unwrap_or_else(|_| match cli.verbose {
        0 => "warn".into(),
        1 => "info".into(),
        _ => "debug".into(),
    });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .init();
    let json = cli.json;
    let code = match run(cli, env) {
        Ok(code) => code,
        Err(e) => {
            output::error(&e, json);
            e.kind.exit_code()
        }
    };
    std::process::exit(code);
}

/// A command line clap refused: its message on stderr as clap writes it, and with --json
/// (anywhere on the line) the error document on stdout too; exit 2. Help and version
/// requests print as usual.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let json = std::env::args_os().any(|a| a == "--json");
    let _ = e.print();
    if json {
        let text = e.render().to_string();
        let first = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("invalid command line")
            .trim_start_matches("error: ")
            .to_string();
        let err = Error::config(first).hint("see `custos --help` or `custos COMMAND --help`");
        println!(
            "{}",
            serde_json::json!({"error": {"code": err.kind.code(), "kind": err.kind.name(), "message": err.message, "hint": err.hint, "retryable": false}})
        );
    }
    std::process::exit(Kind::Config.exit_code());
}

fn run(cli: Cli, env: Env) -> Result<i32> {
    let settings = Settings::resolve(&env, cli.config.as_deref(), cli.repo.as_deref())?;
    let ctx = Ctx {
        env,
        settings,
        out: Out {
            json: cli.json,
            quiet: cli.quiet,
        },
        trail: Default::default(),
        touched: Default::default(),
        introduces: Default::default(),
        authority: Default::default(),
    };
    let name = trail_name(&cli.command);
    let result = dispatch(&ctx, cli.command);
    let recorded = match name {
        Some(name) => ctx.record(&name, &result),
        None => Ok(()),
    };
    match (result, recorded) {
        (r, Ok(())) => r,
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Err(unrecorded)) => {
            eprintln!("custos: warning: {}", unrecorded.message);
            Err(e)
        }
    }
}

/// The name a command is recorded under in the trail; None for the per-file archive
/// commands (their batches are recorded by the async pusher) and the trail's own reads.
fn trail_name(c: &Command) -> Option<String> {
    Some(match c {
        Command::Init { .. } => "init".into(),
        Command::Key(k) => match k {
            KeyCommand::List => "key list",
            KeyCommand::Status => "key status",
            KeyCommand::Split { .. } => "key split",
            KeyCommand::Rotate { .. } => "key rotate",
            KeyCommand::Recover { .. } => "key recover",
            KeyCommand::Add { .. } => "key add",
            KeyCommand::Remove { .. } => "key remove",
            KeyCommand::Passwd { .. } => "key passwd",
        }
        .into(),
        Command::Backup(b) => match b {
            BackupCommand::Files { .. } => "backup files",
            BackupCommand::Stream { .. } => "backup stream",
            BackupCommand::Postgres { .. } => "backup postgres",
            BackupCommand::All => "backup all",
        }
        .into(),
        Command::Snapshots { .. } => "snapshots".into(),
        Command::Info => "info".into(),
        Command::Ls { .. } => "ls".into(),
        Command::Restore(r) => match r {
            RestoreCommand::Files { .. } => "restore files",
            RestoreCommand::Postgres { .. } => "restore postgres",
            RestoreCommand::Stream { .. } => "restore stream",
        }
        .into(),
        Command::Verify { .. } => "verify".into(),
        Command::Forget { .. } => "forget".into(),
        Command::Prune { .. } => "prune".into(),
        Command::Unlock => "unlock".into(),
        Command::Pg(_) => "pg check".into(),
        Command::WalPush { drain: true, .. } => "wal-push batch".into(),
        // Each decryption with a restore key is recorded; each synchronous push is not (one
        // per segment; the async pusher records its batches).
        Command::WalFetch { .. } => "wal-fetch".into(),
        Command::WalPush { .. } => return None,
        Command::Audit(AuditCommand::Log { .. }) => "audit log".into(),
        Command::Audit(AuditCommand::Verify) => "audit verify".into(),
        Command::IamPolicy { .. } => return None,
    })
}

fn dispatch(ctx: &Ctx, command: Command) -> Result<i32> {
    match command {
        Command::Audit(a) => cmd_audit(ctx, a),
        Command::IamPolicy {
            role,
            bucket,
            prefix,
            allow_delete,
        } => {
            let v = custos_ops::keys::iam::policy(&role, &bucket, &prefix, allow_delete);
            println!(
                "{}",
                serde_json::to_string_pretty(&v).expect("serializable")
            );
            Ok(0)
        }
        Command::Init {
            kdf,
            pack_size_mib,
            db_block_kib,
            owner,
        } => cmd_init(
            ctx,
            &kdf,
            pack_size_mib,
            db_block_kib.map(|k| k.parse::<u32>().expect("checked by clap") * 1024),
            owner.as_deref(),
        ),
        Command::Key(k) => cmd_key(ctx, k),
        Command::Backup(b) => cmd_backup(ctx, b),
        Command::Snapshots { source } => cmd_snapshots(ctx, source.as_deref()),
        Command::Info => cmd_info(ctx),
        Command::Ls { snapshot, source } => cmd_ls(ctx, &snapshot, source.as_deref()),
        Command::Restore(r) => cmd_restore(ctx, r),
        Command::Verify { read_data, subset } => cmd_verify(ctx, read_data, subset.as_deref()),
        Command::Forget {
            snapshots,
            policy,
            dry_run,
            prune,
        } => cmd_forget(ctx, &snapshots, &policy, dry_run, prune),
        Command::Prune { dry_run } => cmd_prune(ctx, dry_run),
        Command::Pg(PgCommand::Check {
            db_url,
            max_lag,
            max_backup_age,
        }) => {
            let max_lag = humantime::parse_duration(&max_lag)
                .map_err(|e| Error::config(format!("--max-lag `{max_lag}`: {e}")))?;
            let max_backup_age = max_backup_age
                .map(|a| {
                    humantime::parse_duration(&a)
                        .map_err(|e| Error::config(format!("--max-backup-age `{a}`: {e}")))
                })
                .transpose()?;
            // A repository that does not open is one of the problems the check reports,
            // beside the archiver's own state.
            let repo = ctx.open();
            let location = ctx.settings.location_key();
            let spool = ctx
                .settings
                .cache_dir
                .as_deref()
                .map(|c| (c, location.as_str()));
            let r = custos_ops::postgres::check::check(
                repo.as_ref(),
                &ctx.settings.db(db_url),
                max_lag,
                max_backup_age,
                spool,
            )?;
            if ctx.out.json {
                ctx.out.json(&r);
            } else {
                let a = &r.archiver;
                println!(
                    "cluster {} (PostgreSQL {}), archive_mode {}",
                    a.system_id, a.server_version_num, a.archive_mode
                );
                println!(
                    "archiver: {} archived, last {} at {}; {} failed",
                    a.archived_count,
                    a.last_archived_wal.as_deref().unwrap_or("none"),
                    a.last_archived_time
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                        .unwrap_or_else(|| "-".into()),
                    a.failed_count
                );
                println!(
                    "writing {}; {} segment(s) waiting, lag {} s (limit {} s)",
                    a.current_wal, r.pending_segments, r.lag_seconds, r.max_lag_seconds
                );
                println!(
                    "repository: {} segment(s), {} .. {}",
                    r.archived_in_repository,
                    r.oldest_archived.as_deref().unwrap_or("-"),
                    r.newest_archived.as_deref().unwrap_or("-")
                );
                if r.spool_waiting > 0 {
                    println!(
                        "async spool: {} file(s) waiting, oldest {} s",
                        r.spool_waiting, r.spool_oldest_seconds
                    );
                }
                for p in &r.problems {
                    println!("problem: {p}");
                }
                if r.ok {
                    println!("WAL archiving is healthy");
                }
            }
            if r.ok {
                Ok(0)
            } else {
                if !ctx.out.json {
                    output::error(
                        &Error::new(
                            Kind::Check,
                            format!("{} problem(s) with WAL archiving", r.problems.len()),
                        ),
                        false,
                    );
                }
                Ok(Kind::Check.exit_code())
            }
        }
        Command::WalPush {
            path,
            pgdata,
            is_async,
            async_timeout,
            drain,
        } => {
            let pgdata = ctx.settings.pgdata(pgdata);
            if drain || is_async {
                let timeout = humantime::parse_duration(&async_timeout).map_err(|e| {
                    Error::config(format!("--async-timeout `{async_timeout}`: {e}"))
                })?;
                return wal_push_async(ctx, path.as_deref(), &pgdata, timeout, drain);
            }
            let path = path.expect("required by clap");
            let repo = ctx.open()?;
            let (name, outcome) = custos_ops::postgres::wal::push(&repo, &path, &pgdata)?;
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({"file": name, "stored": outcome == custos_repo::wal::PushOutcome::Stored}));
            }
            Ok(0)
        }
        Command::WalFetch { name, dest, pgdata } => {
            let repo = ctx.open()?;
            let pgdata = ctx.settings.pgdata(pgdata);
            // PostgreSQL asks for files that do not exist at the end of recovery: answer
            // quickly and quietly.
            let found = custos_ops::postgres::wal::fetch(&repo, &name, &dest, &pgdata)?;
            ctx.touch(serde_json::json!({"file": name, "found": found}));
            if found {
                Ok(0)
            } else {
                Ok(Kind::NotFound.exit_code())
            }
        }
        Command::Unlock => {
            let repo = ctx.open()?;
            let n = custos_repo::lock::remove_stale(
                &repo.storage,
                &repo.keys.meta_key,
                &repo.opts.host,
            )?;
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({ "removed_locks": n }));
            } else {
                println!("removed {n} stale lock(s)");
            }
            Ok(0)
        }
    }
}

/// `wal-push --async` (answer from the pusher's marker, starting the pusher if needed) and
/// `wal-push --drain` (the pusher).
fn wal_push_async(
    ctx: &Ctx,
    path: Option<&std::path::Path>,
    pgdata: &std::path::Path,
    timeout: std::time::Duration,
    drain: bool,
) -> Result<i32> {
    use custos_ops::postgres::wal::Spool;
    let cache = ctx.settings.cache_dir.clone().ok_or_else(|| {
        Error::config("wal-push --async needs a cache folder for its markers")
            .hint("set CUSTOS_CACHE_DIR or cache_dir in custos.toml")
    })?;
    ctx.settings.location()?;
    let pgdata = std::path::absolute(pgdata).unwrap_or_else(|_| pgdata.to_path_buf());
    let system_id = custos_sources::postgres::wal::system_id(&pgdata)?;
    let spool = Spool {
        dir: Spool::location(&cache, system_id, &ctx.settings.location_key()),
    };
    if drain {
        let Some(_lock) = spool.try_lock()? else {
            return Ok(0);
        };
        // Nobody reads this process's output: a failure goes where archive_command and
        // `pg check` look for it.
        let repo = ctx
            .open()
            .and_then(|r| r.require_write("archive WAL").map(|_| r))
            .inspect_err(|e| spool.pusher_failed(e))?;
        spool.pusher_started();
        let n = spool
            .drain(&repo, &pgdata, 4, std::time::Duration::from_secs(3))
            .inspect_err(|e| spool.pusher_failed(e))?;
        ctx.touch(serde_json::json!({"system_id": system_id.to_string(), "files": n}));
        tracing::info!("WAL pusher: stored {n} file(s)");
        return Ok(0);
    }
    let path = path.expect("required by clap");
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("{} names no WAL file", path.display())))?
        .to_string();
    custos_sources::postgres::wal::classify(&name)?;
    if spool.take_done(&name) {
        return Ok(0);
    }
    // The pusher is another process: it must open the repository from files and settings
    // alone, never from secrets in this process's environment.
    ctx.settings
        .check_secrets_by_reference(&ctx.env, "wal-push --async")?;
    if spool.try_lock()?.is_some() {
        spawn_pusher(ctx, &pgdata)?;
    }
    if spool.wait_done(&name, timeout)? {
        Ok(0)
    } else {
        let last = spool.last_error();
        Err(Error::new(
            Kind::Storage,
            format!(
                "{name} was not stored within {} s; PostgreSQL will retry it{}",
                timeout.as_secs(),
                last.map(|l| format!(". The pusher's last error: {l}"))
                    .unwrap_or_default()
            ),
        )
        .hint(format!(
            "`custos pg check` reports the archiver and the pusher; the pusher's errors go to {}",
            spool.dir.join(".last-error").display()
        )))
    }
}

/// Niceness of the background WAL pusher.
const PUSHER_NICE: libc::c_int = 10;

/// Starts `custos wal-push --drain` detached (own session, no inherited output), so that
/// PostgreSQL's archiver does not wait for it.
fn spawn_pusher(ctx: &Ctx, pgdata: &std::path::Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("cannot find the custos binary: {e}")))?;
    let mut c = std::process::Command::new(exe);
    c.args(ctx.settings.global_args());
    c.arg("wal-push")
        .arg("--drain")
        .arg("--pgdata")
        .arg(std::path::absolute(pgdata).unwrap_or_else(|_| pgdata.to_path_buf()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid and setpriority are async-signal-safe and have no preconditions.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            // Below PostgreSQL and its archiver: the archiver's own work between two
            // files (marking one done, starting the next archive_command) then waits for
            // no compression thread, and a busy database keeps its CPU. The pusher still
            // takes every idle cycle.
            libc::setpriority(libc::PRIO_PROCESS, 0, PUSHER_NICE);
            Ok(())
        });
    }
    c.spawn()
        .map_err(|e| Error::internal(format!("cannot start the WAL pusher: {e}")))?;
    Ok(())
}

fn cmd_audit(ctx: &Ctx, a: AuditCommand) -> Result<i32> {
    let repo = ctx.open()?;
    let read = repo.trail_verify()?;
    match a {
        AuditCommand::Log { since } => {
            let since = match since.as_deref() {
                None => None,
                Some(t) => Some(match humantime::parse_duration(t) {
                    Ok(d) => {
                        chrono::Utc::now()
                            - chrono::Duration::from_std(d)
                                .map_err(|e| Error::config(format!("--since `{t}`: {e}")))?
                    }
                    Err(_) => parse_target_time(t).map_err(|_| {
                        Error::config(format!(
                            "--since `{t}` is neither a time (2026-01-31T02:00:00Z) nor a duration (7d)"
                        ))
                    })?,
                }),
            };
            let shown: Vec<&custos_repo::trail::Read> = read
                .iter()
                .filter(|r| since.is_none_or(|s| r.entry.as_ref().is_none_or(|e| e.time >= s)))
                .collect();
            if ctx.out.json {
                ctx.out.json(&shown);
            } else {
                for r in &shown {
                    match &r.entry {
                        Some(e) => println!(
                            "{:>6} {} {:<8} {} {}@{} {:<18} {}{}",
                            r.seq,
                            e.time.format("%Y-%m-%d %H:%M:%S"),
                            esc(&e.role),
                            e.key.short(),
                            esc(&e.user),
                            esc(&e.host),
                            esc(&e.command),
                            esc(&e.result),
                            if e.touched.is_null() {
                                String::new()
                            } else {
                                format!(" {}", e.touched)
                            }
                        ),
                        None => println!("{:>6} <unreadable>", r.seq),
                    }
                    for p in &r.problems {
                        println!("       PROBLEM: {p}");
                    }
                }
            }
            Ok(0)
        }
        AuditCommand::Verify => {
            let bad: Vec<&custos_repo::trail::Read> =
                read.iter().filter(|r| !r.problems.is_empty()).collect();
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({
                    "entries": read.len(),
                    "ok": bad.is_empty(),
                    "first_bad": bad.first().map(|r| r.seq),
                    "problems": bad.iter().map(|r| serde_json::json!({"seq": r.seq, "problems": r.problems})).collect::<Vec<_>>(),
                }));
            } else {
                for r in &bad {
                    for p in &r.problems {
                        println!("entry {}: {p}", r.seq);
                    }
                }
            }
            ctx.touch(serde_json::json!({"entries": read.len(), "bad": bad.len()}));
            match bad.first() {
                None => {
                    if !ctx.out.json {
                        println!(
                            "the operation trail is complete and untampered: {} entries, each chained to the one before and signed by a known key",
                            read.len()
                        );
                    }
                    Ok(0)
                }
                Some(first) => {
                    let e = Error::integrity(format!(
                        "the operation trail is damaged: the first bad entry is {} ({})",
                        first.seq,
                        first.problems.join("; ")
                    ))
                    .hint("keep the repository as it is for investigation; compare with a replica's trail");
                    if !ctx.out.json {
                        output::error(&e, false);
                    }
                    Ok(e.kind.exit_code())
                }
            }
        }
    }
}

fn cmd_init(
    ctx: &Ctx,
    kdf: &KdfArgs,
    pack_size_mib: Option<u64>,
    db_block: Option<u32>,
    owner: Option<&str>,
) -> Result<i32> {
    let storage = match owner {
        None => ctx.storage()?,
        Some(user) => {
            let custos_storage::url::Location::Local(path) = ctx.settings.location()? else {
                return Err(Error::config(
                    "--owner is for a local repository: an object store's access is its policy's (`custos iam-policy`)",
                ));
            };
            let (uid, gid) = user_ids(user)?;
            if unsafe { libc::geteuid() } != 0 && unsafe { libc::geteuid() } != uid {
                return Err(Error::config(format!(
                    "only root can make a repository for {user}"
                )));
            }
            Arc::new(custos_storage::local::LocalStorage::owned_by(
                path, uid, gid,
            ))
        }
    };
    let pw = ctx
        .settings
        .password(&ctx.env, "password for the new repository: ")?;
    if pw.is_empty() {
        return Err(Error::config("the password is empty"));
    }
    let repo = Repository::init(
        storage,
        pw.as_bytes(),
        kdf.params(),
        ctx.open_opts(),
        pack_size_mib.map(|m| m << 20),
        db_block,
    )?;
    if let (Some(user), custos_storage::url::Location::Local(path)) =
        (owner, ctx.settings.location()?)
    {
        let (uid, gid) = user_ids(user)?;
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .map_err(|e| custos_model::error::io_error(Kind::Config, &path, e))?;
    }
    ctx.opened(&repo);
    introduce(ctx, &repo, repo.key_id)?;
    *ctx.authority.borrow_mut() = repo.trail_authority();
    if ctx.out.json {
        ctx.out.json(&serde_json::json!({
            "repository": repo.config.id, "location": repo.storage.location(), "key": repo.key_id, "role": "restore",
        }));
    } else {
        println!(
            "created repository {} at {}",
            repo.config.id.short(),
            repo.storage.location()
        );
        println!(
            "restore key {} (keep its password safe: without it the backups cannot be read)",
            repo.key_id.short()
        );
    }
    Ok(0)
}

fn cmd_key_recover(ctx: &Ctx, files: &[PathBuf], kdf: &KdfArgs) -> Result<i32> {
    let storage = ctx.storage()?;
    let config = Repository::read_config(&storage)?;
    let mut shares = vec![];
    for f in files {
        let text =
            std::fs::read(f).map_err(|e| custos_model::error::io_error(Kind::Config, f, e))?;
        let share: custos_ops::keys::ShareFile = serde_json::from_slice(&text).map_err(|_| {
            Error::config(format!("{} is not a custos key share file", f.display()))
        })?;
        shares.push((f.display().to_string(), share));
    }
    let keys = custos_ops::keys::recover(config.id, &shares)?;
    let pw = ctx.settings.new_password(&ctx.env)?;
    let kf = Repository::add_recovered_key(
        &storage,
        &keys,
        pw.as_bytes(),
        kdf.params(),
        &ctx.open_opts(),
    )?;
    // The rebuilt key must open this repository's data, not merely parse.
    let repo = match Repository::open(storage.clone(), pw.as_bytes(), ctx.open_opts())
        .and_then(|r| r.snapshots().map(|_| r))
    {
        Ok(r) => r,
        Err(e) => {
            let _ = storage.delete(&custos_repo::paths::key(&kf.id));
            return Err(Error::integrity(format!(
                "the rebuilt key does not open this repository: {}",
                e.message
            )));
        }
    };
    // No existing key can vouch for a key rebuilt from shares: the repository's authority
    // (part of the restore key material the shares carried) signs its entry.
    *ctx.trail.borrow_mut() = Some((repo.trail_writer_as_authority(), repo.role(), repo.key_id));
    introduce(ctx, &repo, kf.id)?;
    ctx.touch(serde_json::json!({"key": kf.id, "shares": shares.len()}));
    if ctx.out.json {
        ctx.out
            .json(&serde_json::json!({"key": kf.id, "role": kf.role}));
    } else {
        println!(
            "rebuilt the restore key from {} shares: added restore key {}",
            shares.len(),
            kf.id.short()
        );
    }
    Ok(0)
}

/// Names a key's trail signing key in the command's trail entry.
fn introduce(ctx: &Ctx, repo: &Repository, id: custos_model::KeyId) -> Result<()> {
    let kf = Repository::key_files(&repo.storage)?
        .into_iter()
        .find(|k| k.id == id);
    if let Some(k) = kf {
        if let Some(public) = k.sign_public {
            *ctx.introduces.borrow_mut() = Some((id, public, k.role));
        }
    }
    Ok(())
}

fn cmd_key(ctx: &Ctx, k: KeyCommand) -> Result<i32> {
    if let KeyCommand::Recover { share_files, kdf } = k {
        return cmd_key_recover(ctx, &share_files, &kdf);
    }
    let mut repo = ctx.open()?;
    match k {
        KeyCommand::List => {
            let keys = Repository::key_files(&repo.storage)?;
            if ctx.out.json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|k| serde_json::json!({"id": k.id, "role": k.role, "created": k.created, "host": k.host, "user": k.user, "current": k.id == repo.key_id}))
                    .collect();
                ctx.out.json(&v);
            } else {
                println!(
                    "{:<2}{:<10} {:<8} {:<20} {:<16} user",
                    "", "id", "role", "created", "host"
                );
                for k in keys {
                    let cur = if k.id == repo.key_id { "*" } else { "" };
                    println!(
                        "{:<2}{:<10} {:<8} {:<20} {:<16} {}",
                        cur,
                        k.id.short(),
                        k.role.as_str(),
                        k.created.format("%Y-%m-%d %H:%M:%S"),
                        esc(&k.host),
                        esc(&k.user)
                    );
                }
            }
        }
        KeyCommand::Add {
            role,
            allow_delete,
            kdf,
        } => {
            let role: Role = role.parse()?;
            let pw = ctx.settings.new_password(&ctx.env)?;
            let kf = repo.add_key(role, pw.as_bytes(), kdf.params(), allow_delete)?;
            ctx.touch(
                serde_json::json!({"key": kf.id, "role": kf.role, "can_delete": allow_delete}),
            );
            introduce(ctx, &repo, kf.id)?;
            if ctx.out.json {
                ctx.out
                    .json(&serde_json::json!({"id": kf.id, "role": kf.role}));
            } else {
                println!("added {} key {}", kf.role.as_str(), kf.id.short());
            }
        }
        KeyCommand::Recover { .. } => unreachable!("handled above"),
        KeyCommand::Rotate { rewrap } => {
            let r = custos_ops::keys::rotate(&mut repo, rewrap)?;
            ctx.touch(serde_json::to_value(&r).expect("serializable"));
            if ctx.out.json {
                ctx.out.json(&r);
            } else {
                println!(
                    "data key pair rotated: generation {}; new data is wrapped to it, older data stays readable",
                    r.generation
                );
                if rewrap {
                    println!(
                        "re-wrapped the data keys of {} packs, {} snapshots and {} WAL files: a key made from now on needs no older secret",
                        r.rewrapped_packs, r.rewrapped_snapshots, r.rewrapped_wal
                    );
                }
            }
        }
        KeyCommand::Split {
            shares,
            threshold,
            out,
        } => {
            if threshold > shares {
                return Err(Error::config(format!(
                    "--threshold {threshold} is more than --shares {shares}"
                )));
            }
            let files = custos_ops::keys::split(&repo, threshold, shares)?;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&out)
                .map_err(|e| custos_model::error::io_error(Kind::Config, &out, e))?;
            let mut written = vec![];
            for f in &files {
                let p = out.join(format!(
                    "custos-share-{}-{}-of-{}.json",
                    repo.config.id.short(),
                    f.index,
                    f.shares
                ));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                    .map_err(|e| {
                        custos_model::error::io_error(Kind::Config, &p, e)
                            .hint("choose an empty --out folder: shares are never overwritten")
                    })?;
                file.write_all(&serde_json::to_vec_pretty(f).expect("serializable"))
                    .and_then(|_| file.sync_all())
                    .map_err(|e| custos_model::error::io_error(Kind::Config, &p, e))?;
                written.push(p.display().to_string());
            }
            ctx.touch(serde_json::json!({"threshold": threshold, "shares": shares, "split": files[0].split}));
            if ctx.out.json {
                ctx.out
                    .json(&serde_json::json!({"threshold": threshold, "files": written}));
            } else {
                println!(
                    "split the restore key into {shares} shares; any {threshold} rebuild it (`custos key recover`):"
                );
                for w in &written {
                    println!("  {w}");
                }
                println!("give each file to one holder and delete it here: together, {threshold} holders can read every backup");
            }
        }
        KeyCommand::Status => {
            let max_age = ctx.settings.key_max_age()?;
            let ages = custos_ops::keys::ages(&repo, max_age, chrono::Utc::now())?;
            let overdue = ages.iter().filter(|k| k.overdue).count();
            ctx.touch(serde_json::json!({"keys": ages.len(), "overdue": overdue}));
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({
                    "max_age_days": max_age.as_secs() / 86400,
                    "keys": ages,
                    "generation": repo.keys.generation,
                    "in_use": {"key": repo.key_id, "older_secrets_held": repo.keys.previous.len()},
                }));
            } else {
                println!(
                    "{:<16} {:<10} {:<8} {:<20} {:>6}",
                    "what", "id", "role", "created (UTC)", "age"
                );
                for k in &ages {
                    println!(
                        "{:<16} {:<10} {:<8} {:<20} {:>5}d{}",
                        k.what,
                        k.id.map(|i| i.short()).unwrap_or_default(),
                        k.role.as_deref().unwrap_or("-"),
                        k.created.format("%Y-%m-%d %H:%M:%S"),
                        k.age_days,
                        if k.overdue { "  OVERDUE" } else { "" }
                    );
                }
                for k in &ages {
                    if let Some(f) = k.finding(max_age) {
                        eprintln!("custos: warning: {f}");
                    }
                }
                if overdue == 0 {
                    println!(
                        "every key is within the crypto-period of {} days",
                        max_age.as_secs() / 86400
                    );
                }
            }
        }
        KeyCommand::Remove { id } => {
            let kf = repo.remove_key(&id)?;
            ctx.touch(serde_json::json!({"key": kf.id, "role": kf.role}));
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({"removed": kf.id}));
            } else {
                println!("removed {} key {}", kf.role.as_str(), kf.id.short());
            }
        }
        KeyCommand::Passwd { kdf } => {
            let pw = ctx.settings.new_password(&ctx.env)?;
            let old = repo.key_id;
            let kf = repo.change_password(pw.as_bytes(), kdf.params())?;
            ctx.touch(serde_json::json!({"key": kf.id, "replaces": old}));
            // Signed by the key being replaced, which vouches for its successor and signs
            // nothing after (the signing key stays, under the new key file's id).
            introduce(ctx, &repo, kf.id)?;
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({"id": kf.id}));
            } else {
                println!("password changed; the key is now {}", kf.id.short());
            }
        }
    }
    Ok(0)
}

fn print_backup(ctx: &Ctx, r: &backup::BackupReport) -> i32 {
    ctx.touch(serde_json::json!({"snapshot": r.snapshot, "source": r.source, "bytes": r.stats.bytes, "bytes_stored": r.stats.bytes_stored}));
    if ctx.out.json {
        ctx.out.json(r);
    } else {
        let s = &r.stats;
        println!(
            "snapshot {} saved ({} {})",
            r.snapshot.short(),
            r.kind.as_str(),
            r.source
        );
        if let Some(p) = r.parent {
            println!("  parent     {}", p.short());
        }
        println!(
            "  files      {} ({} unchanged, not read), {} folders",
            s.files, s.files_unchanged, s.dirs
        );
        println!(
            "  size       {} ({} read)",
            ByteSize(s.bytes),
            ByteSize(s.bytes_read)
        );
        println!(
            "  new data   {} in {} chunks, {} stored",
            ByteSize(s.bytes_new),
            s.chunks_new,
            ByteSize(s.bytes_stored)
        );
        println!(
            "  took       {:.1} s ({})",
            s.duration_ms as f64 / 1000.0,
            mb_per_s(s.bytes_read, s.duration_ms)
        );
        for e in &r.errors {
            eprintln!("custos: warning: could not read {e}");
        }
    }
    if r.errors.is_empty() {
        0
    } else {
        if !ctx.out.json {
            eprintln!(
                "custos: the snapshot is partial: {} path(s) could not be read (exit code {})",
                r.errors.len(),
                Kind::Partial.exit_code()
            );
        }
        Kind::Partial.exit_code()
    }
}

fn cmd_backup(ctx: &Ctx, b: BackupCommand) -> Result<i32> {
    let repo = ctx.open()?;
    // An overdue key never stops a backup; it is reported on every run.
    let max_age = ctx.settings.key_max_age()?;
    for k in custos_ops::keys::ages(&repo, max_age, chrono::Utc::now())? {
        if k.id.is_none() || k.id == Some(repo.key_id) {
            if let Some(f) = k.finding(max_age) {
                eprintln!("custos: warning: {f}");
            }
        }
    }
    let progress = ctx.out.progress();
    match b {
        BackupCommand::Files { paths, tag, time } => {
            let opts = backup::BackupOptions {
                tags: tag,
                time: parse_time(time.as_deref())?,
                cache_dir: ctx.settings.cache_dir.clone(),
                progress: progress.as_ref(),
            };
            let is_url = |p: &str| p.contains("://");
            if paths.iter().any(|p| is_url(p)) {
                if paths.len() != 1 {
                    return Err(Error::config(
                        "back up one bucket at a time, and not together with local paths",
                    ));
                }
                let loc = Location::parse(&paths[0])?;
                let (storage_loc, prefix) = match &loc {
                    Location::S3 { bucket, prefix } => (
                        Location::S3 {
                            bucket: bucket.clone(),
                            prefix: String::new(),
                        },
                        prefix.clone(),
                    ),
                    other => (other.clone(), String::new()),
                };
                let src = custos_storage::url::open(&storage_loc, &ctx.settings.storage)?;
                let r = files::backup_bucket(&repo, &src, &paths[0], &prefix, &opts)?;
                Ok(print_backup(ctx, &r))
            } else {
                let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
                let r = files::backup_files(&repo, &paths, &opts)?;
                Ok(print_backup(ctx, &r))
            }
        }
        BackupCommand::Stream {
            name,
            command,
            tag,
            time,
        } => {
            let opts = backup::BackupOptions {
                tags: tag,
                time: parse_time(time.as_deref())?,
                cache_dir: None,
                progress: progress.as_ref(),
            };
            let r = files::backup_stream(&repo, &name, command.as_deref(), &opts)?;
            Ok(print_backup(ctx, &r))
        }
        BackupCommand::Postgres {
            backup_type,
            db_url,
            pgdata,
            cluster,
            wal,
            archive_timeout,
            replication,
            pg_bin,
            tag,
        } => {
            let archive_timeout = humantime::parse_duration(&archive_timeout).map_err(|e| {
                Error::config(format!("--archive-timeout `{archive_timeout}`: {e}"))
            })?;
            let opts = backup::BackupOptions {
                tags: tag,
                time: None,
                cache_dir: ctx.settings.cache_dir.clone(),
                progress: progress.as_ref(),
            };
            let pg = pg_backup::PgBackupOptions {
                backup_type: if backup_type == "full" {
                    PgBackupType::Full
                } else {
                    PgBackupType::Incremental
                },
                conn: ctx.settings.db(db_url),
                pgdata: ctx.settings.pgdata_opt(pgdata),
                cluster: cluster.or_else(|| ctx.settings.file.postgres.name.clone()),
                include_wal: wal,
                archive_timeout,
                replication: replication || ctx.settings.file.postgres.replication,
                pg_bin: pg_bin.or_else(|| ctx.settings.file.postgres.bin.clone()),
            };
            let r = pg_backup::backup_postgres(&repo, &pg, &opts)?;
            Ok(print_pg_backup(ctx, &r))
        }
        BackupCommand::All => {
            let sources = &ctx.settings.file.sources;
            if sources.is_empty() {
                return Err(
                    Error::config("custos.toml defines no [[source]]").hint("see docs/config.md")
                );
            }
            let mut reports = vec![];
            let mut code = 0;
            for s in sources {
                let opts = backup::BackupOptions {
                    tags: vec![s.name.clone()],
                    time: None,
                    cache_dir: ctx.settings.cache_dir.clone(),
                    progress: progress.as_ref(),
                };
                let r = match s.kind.as_str() {
                    "files" => files::backup_files(
                        &repo,
                        &s.paths.iter().map(PathBuf::from).collect::<Vec<_>>(),
                        &opts,
                    ),
                    "stream" => files::backup_stream(
                        &repo,
                        &s.name,
                        Some(s.command.as_deref().ok_or_else(|| {
                            Error::config(format!(
                                "source `{}` has kind stream but no command",
                                s.name
                            ))
                        })?),
                        &opts,
                    ),
                    other => Err(Error::config(format!(
                        "source `{}` has unknown kind `{other}` (files or stream)",
                        s.name
                    ))),
                }
                .map_err(|e| e.context(format!("source `{}`", s.name)))?;
                if !ctx.out.json {
                    code = code.max(print_backup(ctx, &r));
                } else if !r.errors.is_empty() {
                    code = Kind::Partial.exit_code();
                }
                reports.push(r);
            }
            if ctx.out.json {
                ctx.out.json(&reports);
            }
            Ok(code)
        }
    }
}

fn print_pg_backup(ctx: &Ctx, r: &pg_backup::PgBackupReport) -> i32 {
    if ctx.out.json {
        ctx.out.json(r);
    } else {
        let code = print_backup(ctx, &r.backup);
        debug_assert_eq!(code, 0);
        if let Some(p) = &r.backup.pg {
            println!(
                "  postgres   {} backup of cluster {} (PostgreSQL {}), timeline {}, LSN {} .. {}{}",
                p.backup_type.as_str(),
                p.system_id,
                p.version_num,
                p.timeline,
                p.start_lsn,
                p.stop_lsn,
                if p.wal_included { ", WAL included" } else { "" }
            );
            println!(
                "  restorable to any time from {} on (with the archived WAL)",
                p.stop_time.format("%Y-%m-%d %H:%M:%S%.3f UTC")
            );
        }
        if r.via == "replication" {
            println!(
                "  read       over the replication protocol (pg_basebackup): every file crossed the network; unchanged ones were not hashed or stored again"
            );
        }
        if r.promoted_to_full {
            println!("  (no earlier backup of this cluster: this incremental read every file)");
        }
        if r.pages_patched + r.units_patched > 0 {
            println!(
                "  pages      {} changed page(s) stored whole, {} as their changed 1 KiB units (page-level incremental)",
                r.pages_patched, r.units_patched
            );
        }
        for d in &r.damaged_pages {
            eprintln!("custos: warning: damaged page: {d}");
        }
    }
    if r.damaged_pages.is_empty() {
        0
    } else {
        if !ctx.out.json {
            eprintln!(
                "custos: {} damaged page(s) found: the snapshot holds them as read; check the storage of the database and its logs, run pg_amcheck, and keep older backups (exit code {})",
                r.damaged_pages.len(),
                Kind::Partial.exit_code()
            );
        }
        Kind::Partial.exit_code()
    }
}

/// A recovery target time, which must say its zone: a time read in the wrong zone
/// restores the wrong hour, silently (PostgreSQL, pgBackRest and this host may each assume
/// another zone).
fn parse_target_time(t: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, NaiveDateTime, Utc};
    let trimmed = t.trim();
    let utc = ["UTC", "GMT", "Z"]
        .iter()
        .find_map(|z| trimmed.strip_suffix(z).map(str::trim_end));
    let zoned = utc.map_or(trimmed.to_string(), |s| format!("{s}+00:00"));
    if let Ok(d) = DateTime::parse_from_rfc3339(&zoned) {
        return Ok(d.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(d) = DateTime::parse_from_str(&zoned, f) {
            return Ok(d.with_timezone(&Utc));
        }
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if NaiveDateTime::parse_from_str(trimmed, f).is_ok() {
            let here = chrono::Local::now().format("%:z");
            return Err(Error::config(format!(
                "--target-time `{t}` does not say its time zone"
            ))
            .hint(format!(
                "add it: `{trimmed}+00` for UTC, or `{trimmed}{here}` for this host's zone (a server may log in yet another zone: check its log_timezone)"
            )));
        }
    }
    Err(Error::config(format!(
        "--target-time `{t}` is not a time like `2026-01-31 02:00:00+01` or 2026-01-31T02:00:00Z"
    )))
}

/// An OS user's uid and primary gid.
fn user_ids(user: &str) -> Result<(u32, u32)> {
    let c = std::ffi::CString::new(user)
        .map_err(|_| Error::config(format!("`{user}` is not a user name")))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: a zeroed passwd and a buffer we own; getpwnam_r fills both or leaves result null.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let r = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if r != 0 || result.is_null() {
        return Err(Error::config(format!(
            "there is no user `{user}` on this host"
        )));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

fn parse_time(t: Option<&str>) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    t.map(|t| {
        chrono::DateTime::parse_from_rfc3339(t)
            .map(|d| d.with_timezone(&chrono::Utc))
            .map_err(|e| {
                Error::config(format!(
                    "--time `{t}` is not an RFC 3339 time like 2026-01-31T02:00:00Z: {e}"
                ))
            })
    })
    .transpose()
}

/// An age for people: 3 d 4 h, 5 h 12 min, 40 s.
fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

fn cmd_info(ctx: &Ctx) -> Result<i32> {
    let repo = ctx.open()?;
    let r = custos_ops::maintenance::info::info(&repo, chrono::Utc::now())?;
    ctx.touch(serde_json::json!({"clusters": r.clusters.len(), "sources": r.sources.len()}));
    if ctx.out.json {
        ctx.out.json(&r);
        return Ok(0);
    }
    let x = &r.repository;
    println!(
        "repository {} ({}): {}; {} snapshots, {} in {} packs, {} WAL files ({})",
        x.location,
        &x.id[..8],
        ByteSize(x.bytes),
        x.snapshots,
        ByteSize(x.pack_bytes),
        x.packs,
        x.wal_files,
        ByteSize(x.wal_bytes)
    );
    let t = |d: &chrono::DateTime<chrono::Utc>| d.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    for c in &r.clusters {
        println!(
            "cluster {} (system id {}): {} backup(s); newest {} {} at {} ({} ago)",
            esc(c.name.as_deref().unwrap_or("-")),
            c.system_id,
            c.backups,
            c.newest.kind,
            &c.newest.snapshot[..8],
            t(&c.newest.time),
            age(c.newest.age_seconds)
        );
        println!(
            "  restorable from {} to {}",
            c.restorable_from.as_ref().map_or("nothing".into(), t),
            c.restorable_until
                .as_ref()
                .map_or("the newest backup's end (no later WAL archived)".into(), t)
        );
        println!(
            "  WAL: {} file(s), {} .. {}",
            c.wal_files,
            c.wal_oldest.as_deref().unwrap_or("-"),
            c.wal_newest.as_deref().unwrap_or("-")
        );
        for g in &c.gaps {
            println!("  WAL GAP: {g} missing: recovery cannot pass it");
        }
    }
    for s in &r.sources {
        println!(
            "{} {}: {} snapshot(s); newest {} at {} ({} ago), {}",
            s.kind,
            esc(&s.source),
            s.snapshots,
            &s.newest.snapshot[..8],
            t(&s.newest.time),
            age(s.newest.age_seconds),
            ByteSize(s.newest.bytes)
        );
    }
    Ok(0)
}

fn cmd_snapshots(ctx: &Ctx, source: Option<&str>) -> Result<i32> {
    let repo = ctx.open()?;
    let snaps: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| source.is_none_or(|src| s.summary.source == src))
        .collect();
    // Database backups restore to any time from their end to the end of the unbroken run
    // of archived WAL after them.
    let archives = custos_ops::postgres::archive::archives(
        &repo,
        snaps.iter().filter_map(|s| s.summary.pg.as_ref()),
    )?;
    let mut windows = std::collections::HashMap::new();
    for s in &snaps {
        if let Some(p) = &s.summary.pg {
            windows.insert(s.id, archives[&p.system_id].window(&repo, p)?);
        }
    }
    if ctx.out.json {
        let v: Vec<_> = snaps
            .iter()
            .map(|s| match windows.get(&s.id) {
                Some(w) => serde_json::json!({"id": s.id, "summary": s.summary, "restorable": {
                    "from": w.from,
                    "until": w.until,
                    "until_lsn": w.until_lsn,
                    "archive_end_segment": w.last_segment,
                    "gap": w.gap,
                    "missing": w.missing,
                }}),
                None => serde_json::json!({"id": s.id, "summary": s.summary}),
            })
            .collect();
        ctx.out.json(&v);
    } else {
        println!(
            "{:<10} {:<20} {:<8} {:<12} {:>10} {:>10}  source",
            "id", "time (UTC)", "kind", "host", "size", "added"
        );
        for s in &snaps {
            let m = &s.summary;
            println!(
                "{:<10} {:<20} {:<8} {:<12} {:>10} {:>10}  {}",
                s.id.short(),
                m.time.format("%Y-%m-%d %H:%M:%S"),
                m.kind.as_str(),
                esc(&m.host),
                ByteSize(m.stats.bytes).to_string(),
                ByteSize(m.stats.bytes_stored).to_string(),
                esc(&m.source)
            );
            if let (Some(p), Some(w)) = (&m.pg, windows.get(&s.id)) {
                let end = if !w.missing.is_empty() {
                    format!(
                        "nothing: WAL it needs is missing ({})",
                        w.missing.join(", ")
                    )
                } else {
                    let mut end = match (&w.last_segment, w.until) {
                        (Some(seg), Some(at)) => {
                            format!("{} (WAL to {seg})", at.format("%Y-%m-%d %H:%M:%S"))
                        }
                        (Some(seg), None) => format!("WAL {seg}"),
                        (None, _) if p.wal_included => {
                            "its own end (WAL included, none archived after it)".into()
                        }
                        (None, _) => "its own end: no WAL archived after it".into(),
                    };
                    if let Some(g) = &w.gap {
                        end.push_str(&format!("; WAL GAP: {g} missing, later WAL unreachable"));
                    }
                    end
                };
                println!(
                    "{:<10} {} LSN {}..{} TL {}; restorable from {} to {end}",
                    "",
                    p.backup_type.as_str(),
                    p.start_lsn,
                    p.stop_lsn,
                    p.timeline,
                    p.stop_time.format("%Y-%m-%d %H:%M:%S"),
                );
            }
        }
        println!("{} snapshot(s)", snaps.len());
    }
    Ok(0)
}

fn cmd_ls(ctx: &Ctx, spec: &str, source: Option<&str>) -> Result<i32> {
    let repo = ctx.open()?;
    // `latest` is what `restore files latest` restores: the newest that is not a stream
    // (a stream is listed by its id, or with --source).
    let snap = repo.find_snapshot(spec, |s: &custos_repo::SnapshotSummary| match source {
        Some(src) => s.source == src,
        None => s.kind != SourceKind::Stream,
    })?;
    repo.require_restore("list the contents of a snapshot")?;
    if !ctx.out.json {
        eprintln!(
            "snapshot {} of {} {}, {}",
            snap.id.short(),
            snap.summary.kind.as_str(),
            esc(&snap.summary.source),
            snap.summary.time.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    let index = repo.load_index()?;
    let entries = restore::list(&repo, &snap, &index)?;
    ctx.touch(serde_json::json!({"snapshot": snap.id}));
    if ctx.out.json {
        let v: Vec<_> = entries
            .iter()
            .map(|e| serde_json::json!({"path": e.path, "kind": e.kind, "mode": format!("{:o}", e.mode), "size": e.size, "mtime_ns": e.mtime_ns, "target": e.target}))
            .collect();
        ctx.out.json(&v);
    } else {
        for e in entries {
            let kind = match e.kind {
                custos_sources::files::EntryKind::Dir => 'd',
                custos_sources::files::EntryKind::Symlink => 'l',
                custos_sources::files::EntryKind::File => '-',
                custos_sources::files::EntryKind::Other => '?',
            };
            let target = e.target.map(|t| format!(" -> {t}")).unwrap_or_default();
            println!("{kind}{:04o} {:>12} {}{}", e.mode, e.size, e.path, target);
        }
    }
    Ok(0)
}

fn cmd_restore(ctx: &Ctx, r: RestoreCommand) -> Result<i32> {
    // A delta restore reads the target folder first: no read-ahead to compete with it.
    let delta = matches!(r, RestoreCommand::Postgres { delta: true, .. });
    let repo = if delta {
        ctx.open()?
    } else {
        ctx.open_to_restore()?
    };
    repo.require_restore("restore")?;
    match r {
        RestoreCommand::Files {
            snapshot,
            to,
            include,
            overwrite,
            delta,
            source,
        } => {
            let (spec, subtree) = match snapshot.split_once(':') {
                Some((spec, path)) => (spec.to_string(), Some(path.to_string())),
                None => (snapshot.clone(), None),
            };
            let snap =
                repo.find_snapshot(&spec, |s: &custos_repo::SnapshotSummary| match &source {
                    Some(src) => s.source == *src && s.kind != SourceKind::Stream,
                    None => s.kind != SourceKind::Stream,
                })?;
            let progress = ctx.out.progress();
            let rep = restore::restore_files(
                &repo,
                &snap,
                &to,
                &restore::RestoreOptions {
                    subtree,
                    include,
                    overwrite,
                    delta,
                    progress: progress.as_ref(),
                },
            )?;
            ctx.touch(
                serde_json::json!({"snapshot": snap.id, "files": rep.files, "bytes": rep.bytes}),
            );
            if ctx.out.json {
                ctx.out.json(&rep);
            } else {
                println!("restored snapshot {} to {}", snap.id.short(), rep.target);
                println!(
                    "  {} files, {} folders, {} links, {} in {:.1} s ({})",
                    rep.files,
                    rep.dirs,
                    rep.symlinks,
                    ByteSize(rep.bytes),
                    rep.duration_ms as f64 / 1000.0,
                    mb_per_s(rep.bytes, rep.duration_ms)
                );
            }
        }
        RestoreCommand::Postgres {
            to,
            target_time,
            target_lsn,
            target_xid,
            target_name,
            target,
            snapshot,
            cluster,
            delta,
            restore_command,
            port,
            no_archiving,
        } => {
            let mut extra_settings = vec![];
            if let Some(p) = port {
                extra_settings.push(format!("port = {p}"));
            }
            if no_archiving {
                extra_settings.push("archive_mode = off".to_string());
            }
            use custos_ops::postgres::restore::{restore_postgres, PgRestoreOptions, Target};
            let target = if let Some(t) = target_time {
                Target::Time(parse_target_time(&t)?)
            } else if let Some(l) = target_lsn {
                Target::Lsn(l.parse()?)
            } else if let Some(x) = target_xid {
                Target::Xid(x)
            } else if let Some(n) = target_name {
                Target::Name(n)
            } else if target.is_some() {
                Target::Immediate
            } else {
                Target::Latest
            };
            let (restore_command, command_needs) = match restore_command {
                Some(c) => (c, vec![]),
                None => (
                    ctx.settings.restore_command(&ctx.env)?,
                    ctx.settings.restore_command_files(&ctx.env),
                ),
            };
            if let Target::Time(t) = &target {
                // Said once in both zones, so that a misread zone shows before the restore.
                if !ctx.out.quiet {
                    eprintln!(
                        "custos: recovering to {} ({} on this host)",
                        t.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                        t.with_timezone(&chrono::Local)
                            .format("%Y-%m-%d %H:%M:%S%.3f %:z")
                    );
                }
            }
            let progress = ctx.out.progress();
            let r = restore_postgres(
                &repo,
                &PgRestoreOptions {
                    to: to.clone(),
                    target,
                    snapshot,
                    cluster,
                    delta,
                    restore_command,
                    extra_settings,
                    command_needs,
                    progress: progress.as_ref(),
                },
            )?;
            ctx.touch(serde_json::json!({"snapshot": r.snapshot, "target": r.target, "to": r.data_directory, "bytes": r.restore.bytes, "risky_settings": r.risky_settings.len()}));
            // The restored configuration came from whoever wrote the snapshot (a backup
            // key): what in it runs commands or loads code is named before anyone starts
            // the server, on stderr, with --json too.
            if !r.risky_settings.is_empty() {
                let w = &r.written_by;
                eprintln!(
                    "custos: warning: the restored configuration runs commands or loads code; check these before starting the server (snapshot written by {} key {} on {}):",
                    w.role.as_deref().unwrap_or("a removed"),
                    w.key.short(),
                    custos_model::path::escape(&w.host)
                );
                for s in &r.risky_settings {
                    eprintln!(
                        "  {}:{}: {} = '{}' ({})",
                        s.file,
                        s.line,
                        s.name,
                        custos_model::path::escape(&s.value),
                        s.does
                    );
                }
            }
            for w in &r.warnings {
                eprintln!("custos: warning: {w}");
            }
            if ctx.out.json {
                ctx.out.json(&r);
            } else {
                let b = &r.backup;
                println!(
                    "restored {} backup {} of cluster {} (consistent from {}) to {}",
                    b.backup_type.as_str(),
                    &r.snapshot[..8],
                    b.system_id,
                    b.stop_time.format("%Y-%m-%d %H:%M:%S UTC"),
                    r.data_directory
                );
                let x = &r.restore;
                println!(
                    "  {} files, {} written in {:.1} s ({}){}",
                    x.files,
                    ByteSize(x.bytes),
                    x.duration_ms as f64 / 1000.0,
                    mb_per_s(x.bytes, x.duration_ms),
                    if delta {
                        format!(
                            "; delta: {} already right, {} path(s) removed",
                            ByteSize(x.bytes_unchanged),
                            x.removed
                        )
                    } else {
                        String::new()
                    }
                );
                if let Some((seg, at)) = &r.archive_end {
                    println!(
                        "  archived WAL reaches {seg}{}",
                        at.map(|t| format!(" (archived {})", t.format("%Y-%m-%d %H:%M:%S UTC")))
                            .unwrap_or_default()
                    );
                }
                println!("  recovery settings (postgresql.auto.conf, with recovery.signal):");
                for s in &r.settings {
                    println!("    {s}");
                }
                println!("start it as the owner of the folder, for example:");
                println!(
                    "  runuser -u postgres -- pg_ctl -D {} -l {}/restore.log start",
                    r.data_directory, r.data_directory
                );
                println!("PostgreSQL fetches and replays the WAL up to the target, then promotes and accepts writes.");
                if port.is_none() {
                    println!("(Pass --port, or change `port`, if the original server runs on this host.)");
                }
                if !no_archiving {
                    println!("Archiving stays on: once promoted, the server archives a new timeline into this repository (--no-archiving for a drill or a copy).");
                }
            }
        }
        RestoreCommand::Stream { snapshot, source } => {
            let snap = repo.find_snapshot(&snapshot, |s: &custos_repo::SnapshotSummary| {
                s.kind == SourceKind::Stream && source.as_deref().is_none_or(|src| s.source == src)
            })?;
            ctx.touch(serde_json::json!({"snapshot": snap.id}));
            let stdout = std::io::stdout();
            let mut lock = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
            restore::restore_stream(&repo, &snap, &mut lock)?;
            lock.flush().map_err(|e| Error::internal(e.to_string()))?;
        }
    }
    Ok(0)
}

fn cmd_verify(ctx: &Ctx, read_data: bool, subset: Option<&str>) -> Result<i32> {
    let subset = match subset {
        None => 1.0,
        Some(s) => {
            let v: f64 = s.trim_end_matches('%').parse().map_err(|_| {
                Error::config(format!("--subset `{s}` is not a percentage like 10%"))
            })?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(Error::config("--subset must be between 0% and 100%"));
            }
            v / 100.0
        }
    };
    let repo = ctx.open()?;
    let progress = ctx.out.progress();
    let r = verify::verify(
        &repo,
        &verify::VerifyOptions {
            read_data,
            subset,
            progress: progress.as_ref(),
            key_max_age: ctx.settings.key_max_age()?,
        },
    )?;
    ctx.touch(serde_json::json!({"read_data": read_data, "errors": r.errors.len(), "bytes_read": r.bytes_read, "vouched": r.vouched, "damaged": r.damaged}));
    if ctx.out.json {
        ctx.out.json(&r);
    } else {
        println!(
            "{} snapshots, {} packs, {} archived WAL files",
            r.snapshots, r.packs, r.wal_files
        );
        if read_data {
            println!(
                "read {} packs ({}), {} chunks {}",
                r.packs_read,
                ByteSize(r.bytes_read),
                r.chunks_read,
                if r.decrypted {
                    "decrypted and checked"
                } else {
                    "(pack hashes only: backup key)"
                }
            );
        }
        if r.sampled > 0 {
            println!(
                "checked {} chunks of packs no restore key had read (--read-data reads all)",
                r.sampled
            );
        }
        if r.vouched > 0 {
            println!(
                "vouched for {} pack(s): every backup key may now deduplicate against them",
                r.vouched
            );
        }
        if !r.damaged.is_empty() {
            println!(
                "recorded {} damaged cop(ies): the next backup of that data stores it again",
                r.damaged.len()
            );
        }
        for w in &r.warnings {
            println!("warning: {w}");
        }
        for f in &r.key_findings {
            eprintln!("custos: warning: {f}");
        }
        for e in &r.errors {
            println!("error: {e}");
        }
        if r.errors.is_empty() {
            println!("no problems found");
        }
    }
    match verify::integrity_error(&r) {
        Some(e) => {
            if !ctx.out.json {
                output::error(&e, false);
            }
            Ok(e.kind.exit_code())
        }
        None => Ok(0),
    }
}

fn policy_from(ctx: &Ctx, a: &PolicyArgs) -> Result<RetentionPolicy> {
    let any = a.keep_last.is_some()
        || a.keep_daily.is_some()
        || a.keep_weekly.is_some()
        || a.keep_monthly.is_some()
        || a.keep_yearly.is_some()
        || a.keep_within.is_some();
    if !any {
        return ctx.settings.file.retention.clone().ok_or_else(|| {
            Error::config("no retention policy given")
                .hint("pass --keep-daily N etc., or set [retention] in custos.toml")
        });
    }
    Ok(RetentionPolicy {
        keep_last: a.keep_last.unwrap_or(0),
        keep_daily: a.keep_daily.unwrap_or(0),
        keep_weekly: a.keep_weekly.unwrap_or(0),
        keep_monthly: a.keep_monthly.unwrap_or(0),
        keep_yearly: a.keep_yearly.unwrap_or(0),
        keep_within: a
            .keep_within
            .as_deref()
            .map(|s| {
                humantime::parse_duration(s)
                    .map_err(|e| Error::config(format!("--keep-within `{s}`: {e}")))
            })
            .transpose()?,
    })
}

fn cmd_forget(
    ctx: &Ctx,
    named: &[String],
    a: &PolicyArgs,
    dry_run: bool,
    and_prune: bool,
) -> Result<i32> {
    let flags = a.keep_last.is_some()
        || a.keep_daily.is_some()
        || a.keep_weekly.is_some()
        || a.keep_monthly.is_some()
        || a.keep_yearly.is_some()
        || a.keep_within.is_some();
    if !named.is_empty() && flags {
        return Err(Error::config(
            "name snapshots to forget, or give a retention policy, not both",
        ));
    }
    let policy = if named.is_empty() {
        Some(policy_from(ctx, a)?)
    } else {
        None
    };
    let repo = ctx.open()?;
    if !dry_run {
        repo.require_delete("forget snapshots")?;
    }
    let ids = named
        .iter()
        .map(|n| {
            repo.find_snapshot(n, |_: &custos_repo::SnapshotSummary| true)
                .map(|s| s.id)
        })
        .collect::<Result<Vec<_>>>()?;
    let plan = forget::plan(
        &repo,
        match &policy {
            Some(p) => forget::Selection::Policy(p),
            None => forget::Selection::Named(&ids),
        },
    )?;
    let removed = if dry_run {
        0
    } else {
        forget::execute(&repo, &plan)?
    };
    ctx.touch(serde_json::json!({"dry_run": dry_run, "removed": plan.removed()}));
    let mut prune_out = None;
    if and_prune && !dry_run {
        let progress = ctx.out.progress();
        prune_out = Some(prune::prune(&repo, false, progress.as_ref())?);
    }
    if ctx.out.json {
        ctx.out.json(&serde_json::json!({"dry_run": dry_run, "plan": plan, "removed": removed, "prune": prune_out}));
    } else {
        let t = |d: &Option<chrono::DateTime<chrono::Utc>>| {
            d.map_or("nothing".to_string(), |d| {
                d.format("%Y-%m-%d %H:%M:%S UTC").to_string()
            })
        };
        for g in &plan.groups {
            match &g.system_id {
                Some(sys) => println!(
                    "postgres cluster {} (system id {sys}, every host):",
                    esc(&g.source)
                ),
                None => println!("{} {} on {}:", g.kind, esc(&g.source), esc(&g.host)),
            }
            for d in &g.decisions {
                println!(
                    "  {} {}  {}  {}",
                    if d.keep { "keep  " } else { "remove" },
                    d.item.short(),
                    d.time.format("%Y-%m-%d %H:%M:%S"),
                    d.reasons.join("; ")
                );
            }
            if let Some(w) = &g.window {
                if w.from_before == w.from_after {
                    println!(
                        "  recovery window unchanged: from {} to {}",
                        t(&w.from_before),
                        t(&w.until)
                    );
                } else {
                    println!(
                        "  recovery window shrinks: from {} to {} becomes from {}; prune then deletes {} WAL file(s)",
                        t(&w.from_before),
                        t(&w.until),
                        t(&w.from_after),
                        w.wal_freed
                    );
                }
            }
        }
        let n = plan.removed().len();
        if dry_run {
            println!("dry run: {n} snapshot(s) would be removed");
        } else {
            println!("removed {removed} snapshot(s); run `custos prune` to free their data");
        }
        if let Some((_, Some(r))) = &prune_out {
            println!(
                "prune: deleted {} packs ({})",
                r.packs_deleted,
                ByteSize(r.bytes_deleted)
            );
        }
    }
    Ok(0)
}

fn cmd_prune(ctx: &Ctx, dry_run: bool) -> Result<i32> {
    let repo = ctx.open()?;
    let progress = ctx.out.progress();
    let (plan, report) = prune::prune(&repo, dry_run, progress.as_ref())?;
    ctx.touch(serde_json::json!({"dry_run": dry_run, "report": report}));
    if ctx.out.json {
        ctx.out
            .json(&serde_json::json!({"dry_run": dry_run, "plan": plan, "report": report}));
    } else {
        println!(
            "{} snapshots, {} packs; chunks used {}, unused {}",
            plan.snapshots, plan.packs, plan.chunks_used, plan.chunks_unused
        );
        println!(
            "{} {} unused pack(s), rewrite {} partly used, remove {} unindexed pack(s), {} temp file(s) and {} WAL file(s) older than every kept database backup; about {} freed",
            if dry_run { "would delete" } else { "delete" },
            plan.packs_delete.len(),
            plan.packs_repack.len(),
            plan.packs_unindexed.len(),
            plan.temp_files.len(),
            plan.wal_delete.len(),
            ByteSize(plan.bytes_freed_estimate)
        );
        if let Some(r) = report {
            println!(
                "done: deleted {} packs ({}) and {} WAL file(s), wrote {} new packs with {} chunks",
                r.packs_deleted,
                ByteSize(r.bytes_deleted),
                r.wal_deleted,
                r.packs_written,
                r.chunks_repacked
            );
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument says what it is for, and every command shows an example.
    #[test]
    fn every_argument_has_help_and_every_command_an_example() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", c.get_name());
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if ["help", "version"].contains(&id) || a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path}: argument `{id}` has no help"));
                }
            }
            let subs: Vec<_> = c
                .get_subcommands()
                .filter(|s| s.get_name() != "help")
                .collect();
            if subs.is_empty() {
                let shown = format!(
                    "{}{}",
                    c.get_after_help()
                        .map(|h| h.to_string())
                        .unwrap_or_default(),
                    c.get_after_long_help()
                        .map(|h| h.to_string())
                        .unwrap_or_default()
                );
                if !shown.contains("Example") {
                    missing.push(format!("{path}: no example"));
                }
            }
            for s in subs {
                walk(s, &path, missing);
            }
        }
        let mut missing = vec![];
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
