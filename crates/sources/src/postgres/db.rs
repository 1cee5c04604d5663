//! Talking to a running cluster over the PostgreSQL protocol (tokio-postgres): what the
//! checks and backups need to ask it. All SQL custos sends lives in this module.

use std::time::Duration;

use chrono::{DateTime, Utc};
use custos_model::{Error, Kind, Lsn, Result};

/// How to reach the cluster: libpq-style settings resolved by the CLI.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// A `postgresql://` URL or a libpq key=value string; overrides the fields below.
    pub url: Option<String>,
    /// Host name, or a folder holding the Unix socket.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub dbname: Option<String>,
    /// PGPASSWORD; otherwise the URL's password, else `~/.pgpass` (or PGPASSFILE).
    pub password: Option<Password>,
    /// Another database of the same server (scratch databases of `verify --table`).
    pub dbname_override: Option<String>,
    /// PGSSLMODE: `disable`, `prefer` (the default: plain where the server allows it) or
    /// `verify-full`; a URL's `sslmode` wins.
    pub sslmode: Option<String>,
    /// PGSSLROOTCERT: the CA that signs the server's certificate (PEM); a URL's wins.
    pub sslrootcert: Option<std::path::PathBuf>,
}

/// TLS as a connection string asks for it: `sslmode=verify-full` with `sslrootcert`, which
/// tokio-postgres does not parse (they are taken out of the string before it does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tls {
    pub(crate) verify_full: bool,
    pub(crate) rootcert: Option<std::path::PathBuf>,
}

/// Takes `sslmode` (when it asks for verification) and `sslrootcert` out of a
/// `postgresql://` URL or a `key=value` string: the rest, and what they said.
/// `require` and `verify-ca` are refused: custos checks whom it connects to.
pub(crate) fn split_tls(
    conn: &str,
) -> Result<(String, Option<String>, Option<std::path::PathBuf>)> {
    let mut mode = None;
    let mut root = None;
    let mut take = |k: &str, v: &str| -> bool {
        match k {
            "sslmode" if v != "disable" && v != "prefer" && v != "allow" => {
                mode = Some(v.to_string());
                true
            }
            "sslrootcert" => {
                root = Some(std::path::PathBuf::from(v));
                true
            }
            _ => false,
        }
    };
    let rest = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        match conn.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        !take(k, v)
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => conn.to_string(),
        }
    } else {
        conn.split_whitespace()
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                !take(k.trim(), v.trim().trim_matches('\''))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    Ok((rest, mode, root))
}

impl ConnectOptions {
    /// What TLS this connection asks for, and the connection string without it.
    pub(crate) fn tls(&self) -> Result<(Option<String>, Tls)> {
        let (url, mode, root) = match &self.url {
            Some(u) => {
                let (rest, m, r) = split_tls(u)?;
                (Some(rest), m, r)
            }
            None => (None, None, None),
        };
        let mode = mode.or_else(|| {
            self.sslmode
                .clone()
                .filter(|m| m != "disable" && m != "prefer" && m != "allow")
        });
        let root = root.or_else(|| self.sslrootcert.clone());
        let verify_full = match mode.as_deref() {
            None => false,
            Some("verify-full") => true,
            Some(m) => {
                return Err(Error::config(format!(
                    "sslmode={m}: custos connects to PostgreSQL either in plain (disable, prefer) or with the server's certificate and name verified (verify-full)"
                ))
                .hint("use sslmode=verify-full with sslrootcert naming the CA that signs the server's certificate"))
            }
        };
        if verify_full && root.is_none() {
            return Err(Error::config(
                "sslmode=verify-full needs sslrootcert: the CA that signs the server's certificate",
            )
            .hint("add sslrootcert=/path/to/ca.pem to --db-url / db_url, or set PGSSLROOTCERT"));
        }
        Ok((
            url,
            Tls {
                verify_full,
                rootcert: root,
            },
        ))
    }
}

/// The rustls configuration that trusts only the CA(s) of `rootcert`.
fn tls_config(rootcert: &std::path::Path) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let bad = |e: String| {
        Error::config(format!("sslrootcert {}: {e}", rootcert.display()))
            .hint("sslrootcert names the PEM file of the CA that signs the server's certificate")
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(rootcert)
        .map_err(|e| bad(e.to_string()))?;
    for c in certs {
        roots
            .add(c.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::internal(e.to_string()))
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// A database password: never printed.
#[derive(Clone, Default)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(hidden)")
    }
}

pub struct Db {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) client: tokio_postgres::Client,
}

pub(crate) fn db_err(what: &str, e: tokio_postgres::Error) -> Error {
    let detail = match e.as_db_error() {
        Some(d) => format!("{}: {}", d.severity(), d.message()),
        None => custos_model::error::chain(&e),
    };
    if detail.contains("certificate") {
        return Error::new(
            Kind::Source,
            format!("{what}: the server's TLS certificate is not trusted ({detail})"),
        )
        .hint("sslrootcert must name the CA that signs the server's certificate, and the host you connect to must be a name (or address) the certificate holds");
    }
    Error::new(Kind::Source, format!("{what}: {detail}"))
        .hint("check that PostgreSQL is running and reachable with PGHOST, PGPORT, PGUSER, PGDATABASE or --db-url")
}

impl Db {
    pub fn connect(o: &ConnectOptions) -> Result<Db> {
        let (url, tls) = o.tls()?;
        let mut cfg: tokio_postgres::Config = match &url {
            Some(u) => u.parse().map_err(|e| {
                Error::config(format!("--db-url is not a valid connection string: {e}"))
            })?,
            None => tokio_postgres::Config::new(),
        };
        if let Some(d) = &o.dbname_override {
            cfg.dbname(d);
        }
        if url.is_none() {
            let host = o
                .host
                .clone()
                .unwrap_or_else(|| "/var/run/postgresql".into());
            if host.starts_with('/') {
                cfg.host_path(&host);
            } else {
                cfg.host(&host);
            }
            cfg.port(o.port.unwrap_or(5432));
            cfg.user(o.user.as_deref().unwrap_or("postgres"));
            if o.dbname_override.is_none() {
                cfg.dbname(o.dbname.as_deref().unwrap_or("postgres"));
            }
        }
        if let Some(p) = &o.password {
            cfg.password(p.0.as_bytes());
        } else if cfg.get_password().is_none() {
            if let Some(p) = pgpass(&cfg) {
                cfg.password(p);
            }
        }
        cfg.application_name("custos")
            .connect_timeout(Duration::from_secs(10));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::internal(e.to_string()))?;
        let client = match &tls.rootcert {
            Some(root) if tls.verify_full => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(root)?);
                let (client, conn) = rt
                    .block_on(cfg.connect(connector))
                    .map_err(|e| db_err("cannot connect to PostgreSQL", e))?;
                rt.spawn(async move {
                    let _ = conn.await;
                });
                client
            }
            _ => {
                let (client, conn) = rt
                    .block_on(cfg.connect(tokio_postgres::NoTls))
                    .map_err(|e| db_err("cannot connect to PostgreSQL", e))?;
                rt.spawn(async move {
                    let _ = conn.await;
                });
                client
            }
        };
        Ok(Db { rt, client })
    }

    fn one(&self, sql: &str) -> Result<tokio_postgres::Row> {
        self.rt
            .block_on(self.client.query_one(sql, &[]))
            .map_err(|e| db_err("querying the cluster", e))
    }

    /// Where the cluster's WAL is now (a recovery point binds it), its system id and
    /// clock; then a switch to a new segment, so the archive holds this point soon.
    pub fn point(&self) -> Result<(u64, Lsn, DateTime<Utc>)> {
        let r = self.one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text, \
             pg_current_wal_lsn()::text, clock_timestamp()",
        )?;
        let sys = r
            .get::<_, String>(0)
            .parse()
            .map_err(|_| Error::internal("bad system identifier"))?;
        let lsn: Lsn = r.get::<_, String>(1).parse()?;
        let at: DateTime<Utc> = r.get(2);
        self.one("SELECT pg_switch_wal()::text")?;
        Ok((sys, lsn, at))
    }

    pub fn archiver(&self) -> Result<ArchiverStatus> {
        let r = self.one(
            "SELECT current_setting('archive_mode'), current_setting('archive_command'), \
             (SELECT system_identifier FROM pg_control_system())::text, \
             (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), \
             a.archived_count, a.last_archived_wal, a.last_archived_time, \
             a.failed_count, a.last_failed_wal, a.last_failed_time, \
             pg_walfile_name(pg_current_wal_lsn()), now(), current_setting('server_version_num')::int \
             FROM pg_stat_archiver a",
        )?;
        // What waits to be archived, from the archive_status folder itself (superuser or
        // pg_monitor; without the right, None and the counters above decide).
        let ready = self
            .rt
            .block_on(self.client.query_one(
                "SELECT count(*), min(modification) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'",
                &[],
            ))
            .ok();
        Ok(ArchiverStatus {
            ready_files: ready.as_ref().map(|r| r.get::<_, i64>(0) as u64),
            oldest_ready: ready.as_ref().and_then(|r| r.get(1)),
            archive_mode: r.get(0),
            archive_command: r.get(1),
            system_id: r
                .get::<_, String>(2)
                .parse()
                .map_err(|_| Error::internal("bad system identifier"))?,
            segment_size: r.get::<_, i64>(3) as u64,
            archived_count: r.get(4),
            last_archived_wal: r.get(5),
            last_archived_time: r.get(6),
            failed_count: r.get(7),
            last_failed_wal: r.get(8),
            last_failed_time: r.get(9),
            current_wal: r.get(10),
            now: r.get(11),
            server_version_num: r.get(12),
        })
    }
}

/// `pg_stat_archiver` and the settings that decide whether archiving works.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArchiverStatus {
    /// Files marked `.ready` in `pg_wal/archive_status` (segments, backup and timeline
    /// history files waiting for archive_command), and when the oldest was marked.
    pub ready_files: Option<u64>,
    pub oldest_ready: Option<DateTime<Utc>>,
    pub archive_mode: String,
    pub archive_command: String,
    #[serde(with = "custos_model::id::u64_text")]
    pub system_id: u64,
    pub segment_size: u64,
    pub archived_count: i64,
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<DateTime<Utc>>,
    pub failed_count: i64,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<DateTime<Utc>>,
    /// The segment being written now.
    pub current_wal: String,
    pub now: DateTime<Utc>,
    pub server_version_num: i32,
}

/// What a base backup needs to know about the cluster before it starts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterInfo {
    pub system_id: u64,
    pub server_version_num: i32,
    pub server_version: String,
    pub data_directory: String,
    pub data_checksums: bool,
    pub segment_size: u64,
    pub block_size: u32,
    pub in_recovery: bool,
    pub archive_mode: String,
    pub summarize_wal: bool,
    /// The paths of `config_file`, `hba_file` and `ident_file`, where this connection may
    /// read them (superusers and pg_read_all_settings).
    pub config_files: Vec<String>,
}

/// `pg_backup_stop`'s answer: where the backup ends and the files to write beside it.
#[derive(Debug, Clone)]
pub struct BackupStop {
    pub stop_lsn: Lsn,
    pub backup_label: String,
    pub tablespace_map: String,
    pub stop_time: DateTime<Utc>,
    /// The next transaction id at stop: transactions from here on committed after it.
    pub next_xid: u64,
}

impl Db {
    pub fn cluster_info(&self) -> Result<ClusterInfo> {
        let r = self.one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text, \
             current_setting('server_version_num')::int, current_setting('server_version'), \
             current_setting('data_directory'), current_setting('data_checksums') = 'on', \
             (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), \
             current_setting('block_size')::int, pg_is_in_recovery(), current_setting('archive_mode'), \
             coalesce((SELECT setting = 'on' FROM pg_settings WHERE name = 'summarize_wal'), false), \
             (SELECT setting FROM pg_settings WHERE name = 'config_file'), \
             (SELECT setting FROM pg_settings WHERE name = 'hba_file'), \
             (SELECT setting FROM pg_settings WHERE name = 'ident_file')",
        )?;
        let config_files = (10..13)
            .filter_map(|i| r.get::<_, Option<String>>(i).filter(|p| !p.is_empty()))
            .collect();
        Ok(ClusterInfo {
            system_id: r
                .get::<_, String>(0)
                .parse()
                .map_err(|_| Error::internal("bad system identifier"))?,
            server_version_num: r.get(1),
            server_version: r.get(2),
            data_directory: r.get(3),
            data_checksums: r.get(4),
            segment_size: r.get::<_, i64>(5) as u64,
            block_size: r.get::<_, i32>(6) as u32,
            in_recovery: r.get(7),
            archive_mode: r.get(8),
            summarize_wal: r.get(9),
            config_files,
        })
    }

    /// `pg_backup_start` (non-exclusive: this connection must stay open until
    /// [`Db::backup_stop`]). Asks for an immediate checkpoint when `fast`.
    pub fn backup_start(&self, label: &str, fast: bool) -> Result<(Lsn, u32, DateTime<Utc>)> {
        let r = self
            .rt
            .block_on(self.client.query_one(
                "SELECT pg_backup_start($1, $2)::text, \
                 (SELECT timeline_id FROM pg_control_checkpoint()), now()",
                &[&label, &fast],
            ))
            .map_err(|e| db_err("pg_backup_start failed", e))?;
        let lsn: String = r.get(0);
        Ok((lsn.parse()?, r.get::<_, i32>(1) as u32, r.get(2)))
    }

    /// `pg_backup_stop`; waits for the last segment to be archived when `wait_for_archive`.
    pub fn backup_stop(&self, wait_for_archive: bool) -> Result<BackupStop> {
        let r = self
            .rt
            .block_on(self.client.query_one(
                "SELECT lsn::text, labelfile, coalesce(spcmapfile, ''), clock_timestamp(), \
                 pg_snapshot_xmax(pg_current_snapshot())::text::bigint \
                 FROM pg_backup_stop($1)",
                &[&wait_for_archive],
            ))
            .map_err(|e| db_err("pg_backup_stop failed", e))?;
        let lsn: String = r.get(0);
        Ok(BackupStop {
            stop_lsn: lsn.parse()?,
            backup_label: r.get(1),
            tablespace_map: r.get(2),
            stop_time: r.get(3),
            next_xid: r.get::<_, i64>(4) as u64,
        })
    }
}

impl Db {
    /// The main-fork blocks WAL changed on `timeline` from `from` to `to`, from the
    /// server's WAL summaries (PostgreSQL 17+ with `summarize_wal`), once the summarizer
    /// has reached `to` (waiting up to `wait`). None when the summaries do not cover the
    /// whole range (summarizing off or lagging, summaries removed, another timeline): the
    /// caller then reads every file.
    pub fn changed_blocks(
        &self,
        timeline: u32,
        from: Lsn,
        to: Lsn,
        wait: Duration,
    ) -> Result<Option<super::summary::ChangedBlocks>> {
        let query = |sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]| {
            self.rt
                .block_on(self.client.query(sql, params))
                .map_err(|e| db_err("reading the WAL summaries", e))
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            let r = query(
                "SELECT summarized_tli, summarized_lsn::text FROM pg_get_wal_summarizer_state()",
                &[],
            )?;
            let Some(r) = r.first() else { return Ok(None) };
            let (tli, lsn): (i64, String) = (r.get(0), r.get(1));
            if tli == i64::from(timeline) && lsn.parse::<Lsn>()? >= to {
                break;
            }
            if std::time::Instant::now() > deadline {
                tracing::info!(
                    "the WAL summarizer has not reached {to} yet: reading every changed file"
                );
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let tli = i64::from(timeline);
        let (from_s, to_s) = (from.to_string(), to.to_string());
        let rows = query(
            "SELECT start_lsn::text, end_lsn::text FROM pg_available_wal_summaries() \
             WHERE tli = $1 AND end_lsn > $2::text::pg_lsn AND start_lsn < $3::text::pg_lsn \
             ORDER BY start_lsn",
            &[&tli, &from_s, &to_s],
        )?;
        let mut ranges = vec![];
        for r in &rows {
            let (s, e): (String, String) = (r.get(0), r.get(1));
            ranges.push((s.parse::<Lsn>()?, e.parse::<Lsn>()?));
        }
        // Complete: the first starts at or before `from`, each next starts where the
        // covered range ends or before, and the last reaches `to`.
        let mut covered = from;
        for (s, e) in &ranges {
            if *s > covered {
                return Ok(None);
            }
            covered = covered.max(*e);
        }
        if ranges.is_empty() || covered < to {
            return Ok(None);
        }
        let mut changed = super::summary::ChangedBlocks::default();
        for (s, e) in &ranges {
            let rows = query(
                "SELECT relfilenode::bigint, reltablespace::bigint, reldatabase::bigint, \
                 relblocknumber, is_limit_block \
                 FROM pg_wal_summary_contents($1, $2::text::pg_lsn, $3::text::pg_lsn) \
                 WHERE relforknumber = 0",
                &[&tli, &s.to_string(), &e.to_string()],
            )?;
            for r in rows {
                changed.add(
                    r.get::<_, i64>(1) as u32,
                    r.get::<_, i64>(2) as u32,
                    r.get::<_, i64>(0) as u32,
                    r.get::<_, i64>(3) as u32,
                    r.get(4),
                );
            }
        }
        Ok(Some(changed))
    }
}

impl Db {
    /// The server's clock and the next transaction id: taken after a streamed base backup
    /// ends, both are at or after its true end (so restore target checks stay safe).
    pub fn clock_and_next_xid(&self) -> Result<(DateTime<Utc>, u64)> {
        let r = self.one(
            "SELECT clock_timestamp(), pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
        )?;
        Ok((r.get(0), r.get::<_, i64>(1) as u64))
    }

    /// Tablespaces other than the two every cluster has.
    pub fn tablespaces(&self) -> Result<Vec<String>> {
        let rows = self
            .rt
            .block_on(self.client.query(
                "SELECT spcname::text FROM pg_tablespace \
                 WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1",
                &[],
            ))
            .map_err(|e| db_err("listing tablespaces", e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// One page of a file in the data directory, read by the server
    /// (`pg_read_binary_file`: superuser, or EXECUTE granted on it).
    pub fn read_page(&self, rel: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let r = self
            .rt
            .block_on(self.client.query_one(
                "SELECT pg_read_binary_file($1, $2, $3)",
                &[&rel, &(offset as i64), &(len as i64)],
            ))
            .map_err(|e| db_err("reading a page again", e))?;
        Ok(r.get(0))
    }
}

impl ConnectOptions {
    /// The connection as a libpq `key=value` string for PostgreSQL's own programs, and the
    /// password apart from it (to hand over in the environment, never in arguments).
    pub fn libpq(&self) -> Result<(String, Option<String>)> {
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut parts = vec![];
        let (url, tls) = self.tls()?;
        let url_password = match &url {
            Some(u) => {
                let cfg: tokio_postgres::Config = u.parse().map_err(|e| {
                    Error::config(format!("--db-url is not a valid connection string: {e}"))
                })?;
                let hosts: Vec<String> = cfg
                    .get_hosts()
                    .iter()
                    .map(|h| match h {
                        tokio_postgres::config::Host::Tcp(s) => s.clone(),
                        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                    })
                    .collect();
                if !hosts.is_empty() {
                    parts.push(format!("host={}", quote(&hosts.join(","))));
                }
                let ports: Vec<String> = cfg.get_ports().iter().map(|p| p.to_string()).collect();
                if !ports.is_empty() {
                    parts.push(format!("port={}", ports.join(",")));
                }
                if let Some(u) = cfg.get_user() {
                    parts.push(format!("user={}", quote(u)));
                }
                if let Some(d) = self.dbname_override.as_deref().or(cfg.get_dbname()) {
                    parts.push(format!("dbname={}", quote(d)));
                }
                let ssl = match cfg.get_ssl_mode() {
                    tokio_postgres::config::SslMode::Disable => "disable",
                    tokio_postgres::config::SslMode::Require => "require",
                    _ => "prefer",
                };
                parts.push(format!("sslmode={ssl}"));
                cfg.get_password()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
            }
            None => {
                let host = self.host.as_deref().unwrap_or("/var/run/postgresql");
                parts.push(format!("host={}", quote(host)));
                parts.push(format!("port={}", self.port.unwrap_or(5432)));
                parts.push(format!(
                    "user={}",
                    quote(self.user.as_deref().unwrap_or("postgres"))
                ));
                parts.push(format!(
                    "dbname={}",
                    quote(
                        self.dbname_override
                            .as_deref()
                            .or(self.dbname.as_deref())
                            .unwrap_or("postgres")
                    )
                ));
                None
            }
        };
        // libpq verifies as custos does.
        if let (true, Some(root)) = (tls.verify_full, &tls.rootcert) {
            parts.retain(|p| !p.starts_with("sslmode="));
            parts.push("sslmode=verify-full".into());
            parts.push(format!(
                "sslrootcert={}",
                quote(&root.display().to_string())
            ));
        }
        parts.push("application_name=custos".into());
        let password = self.password.as_ref().map(|p| p.0.clone()).or(url_password);
        Ok((parts.join(" "), password))
    }
}

/// The password `~/.pgpass` (or PGPASSFILE) gives for the first host of `cfg`, the way libpq
/// looks it up: `host:port:database:user:password`, `*` matching anything, `\` escaping,
/// `localhost` standing for a Unix socket; ignored when others may read the file.
fn pgpass(cfg: &tokio_postgres::Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")))?;
    let meta = std::fs::metadata(&file).ok()?;
    if !meta.is_file() || meta.permissions().mode() & 0o077 != 0 {
        return None;
    }
    let host = match cfg.get_hosts().first()? {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(_) => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = cfg.get_user().unwrap_or("postgres");
    let db = cfg.get_dbname().unwrap_or(user);
    let text = std::fs::read_to_string(&file).ok()?;
    pgpass_lookup(&text, [&host, &port, db, user])
}

fn pgpass_lookup(text: &str, want: [&str; 4]) -> Option<String> {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut fields = vec![String::new()];
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => fields.last_mut()?.extend(chars.next()),
                ':' if fields.len() < 5 => fields.push(String::new()),
                c => fields.last_mut()?.push(c),
            }
        }
        if fields.len() == 5 && (0..4).all(|i| fields[i] == "*" || fields[i] == want[i]) {
            return fields.pop();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn pgpass_matches_fields_wildcards_and_escapes() {
        let text = "# comment\n\
                    db1:5432:app:alice:first\n\
                    *:5433:*:bob:pa\\:ss\n\
                    localhost:*:*:*:local\n";
        let find = |h, p, d, u| super::pgpass_lookup(text, [h, p, d, u]);
        assert_eq!(
            find("db1", "5432", "app", "alice").as_deref(),
            Some("first")
        );
        assert_eq!(find("db1", "5432", "other", "alice"), None);
        assert_eq!(find("any", "5433", "x", "bob").as_deref(), Some("pa:ss"));
        assert_eq!(find("localhost", "1", "x", "y").as_deref(), Some("local"));
    }
}
