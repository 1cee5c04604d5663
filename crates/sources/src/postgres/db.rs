//! Talking to a running cluster over the PostgreSQL protocol (tokio-postgres): what the
//! checks and backups need to ask it. All SQL custos sends lives in this module.

use std::time::Duration;

use chrono::{DateTime, Utc};
use custos_model::{Error, Kind, Result};

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
}

pub struct Db {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

fn db_err(what: &str, e: tokio_postgres::Error) -> Error {
    let detail = match e.as_db_error() {
        Some(d) => format!("{}: {}", d.severity(), d.message()),
        None => e.to_string(),
    };
    Error::new(Kind::Source, format!("{what}: {detail}"))
        .hint("check that PostgreSQL is running and reachable with PGHOST, PGPORT, PGUSER, PGDATABASE or --db-url")
}

impl Db {
    pub fn connect(o: &ConnectOptions) -> Result<Db> {
        let mut cfg: tokio_postgres::Config = match &o.url {
            Some(u) => u.parse().map_err(|e| {
                Error::config(format!("--db-url is not a valid connection string: {e}"))
            })?,
            None => tokio_postgres::Config::new(),
        };
        if o.url.is_none() {
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
            cfg.dbname(o.dbname.as_deref().unwrap_or("postgres"));
        }
        cfg.application_name("custos")
            .connect_timeout(Duration::from_secs(10));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::internal(e.to_string()))?;
        let (client, conn) = rt
            .block_on(cfg.connect(tokio_postgres::NoTls))
            .map_err(|e| db_err("cannot connect to PostgreSQL", e))?;
        rt.spawn(async move {
            let _ = conn.await;
        });
        Ok(Db { rt, client })
    }

    fn one(&self, sql: &str) -> Result<tokio_postgres::Row> {
        self.rt
            .block_on(self.client.query_one(sql, &[]))
            .map_err(|e| db_err("querying the cluster", e))
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
        Ok(ArchiverStatus {
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
    pub archive_mode: String,
    pub archive_command: String,
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
