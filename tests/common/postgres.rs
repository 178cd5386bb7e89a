//! A real PostgreSQL server for the tests, started once per test binary: `initdb` and `pg_ctl`
//! from Debian's `postgresql` package in a temporary directory, listening on a free loopback
//! port, stopped (and its directory removed) when the test binary exits. Each test gets a
//! database of its own ([`PgServer::database`]), so tests run in parallel on one server.
//!
//! The same end-to-end tests run on either store: with `TOLLGATE_TEST_STORE=postgres`, every
//! test server (in process or the real binary) keeps its ledger in a database of its own
//! instead of sled ([`test_store_of`]); `.ci/run` runs the lifecycle, limits, scopes, money and
//! durability tests both ways. One list of tests, two backends.
//!
//! `initdb` refuses to run as root: as root, the server runs as the `postgres` user (created
//! by the package). Where the binaries are: `TOLLGATE_PG_BIN` if set, else the newest
//! `/usr/lib/postgresql/<version>/bin`, else `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The environment variable that puts the test servers on PostgreSQL.
pub const TEST_STORE_ENV: &str = "TOLLGATE_TEST_STORE";

/// With `TOLLGATE_TEST_STORE=postgres`: the database that stands for the data directory `dir`
/// (made on first use, and remembered in the directory, so a restart over the same directory
/// finds the same ledger). Otherwise none: the tests use sled in `dir`.
pub fn test_store_of(dir: &Path) -> Option<String> {
    match std::env::var(TEST_STORE_ENV).as_deref() {
        Ok("postgres") => {}
        Ok("sled") | Ok("") | Err(_) => return None,
        Ok(other) => panic!("{TEST_STORE_ENV}={other:?}: expected sled or postgres"),
    }
    std::fs::create_dir_all(dir).expect("create the data directory");
    let file = dir.join("test-postgres-url");
    if let Ok(url) = std::fs::read_to_string(&file) {
        return Some(url);
    }
    let url = server().database();
    std::fs::write(&file, &url).expect("remember the database");
    Some(url)
}

/// Wait (at most 60 s) until the server advertising `address` holds the lease of the database
/// at `url`.
pub fn wait_until_leading(url: &str, address: &str) {
    let name = PgServer::name_of(url);
    let sql = "SELECT address FROM tollgate_lease WHERE expires_at > now()";
    let start = std::time::Instant::now();
    while server().psql(name, sql) != address {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{address} did not take the lease of {name} within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The server of this test binary.
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<&'static str>,
}

static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The PostgreSQL server of this test binary, started on first use. Panics with what went
/// wrong if it cannot start (PostgreSQL is required by these tests: `.ci/run` installs it).
pub fn server() -> &'static PgServer {
    match SERVER.get_or_init(PgServer::start) {
        Ok(s) => s,
        Err(e) => panic!("cannot start PostgreSQL for the tests: {e}"),
    }
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TOLLGATE_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).unwrap_or_default()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl PgServer {
    fn command(&self, program: &str) -> Command {
        command(&self.bin, self.run_as, program)
    }

    fn start() -> Result<Self, String> {
        let bin = bin_dir();
        let run_as = is_root().then_some("postgres");
        let dir = tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?
            .keep();
        if let Some(user) = run_as {
            let status = Command::new("chown")
                .arg(user)
                .arg(&dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err(format!("chown {user} {}: {status}", dir.display()));
            }
        }
        let data = dir.join("data");
        let out = command(&bin, run_as, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "tollgate", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|e| format!("initdb ({}): {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "initdb: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // TLS offered (clients choose: `tls_database` asks for it), with a CA made here that
        // signs a certificate for 127.0.0.1. The key must be the server user's alone.
        let ca = {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .map_err(|e| e.to_string())?
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .and_then(|p| p.signed_by(&key, &ca))
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("ca.pem"), ca.pem()).map_err(|e| e.to_string())?;
        let (crt, keyfile) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(&crt, cert.pem()).map_err(|e| e.to_string())?;
        std::fs::write(&keyfile, key.serialize_pem()).map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&keyfile, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| e.to_string())?;
        }
        if let Some(user) = run_as {
            Command::new("chown")
                .arg(user)
                .arg(&crt)
                .arg(&keyfile)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
        }
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let out = command(&bin, run_as, "pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("log"))
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c ssl=on",
                    dir.display()
                ))
                .args(["-w", "-t", "60", "start"])
                .output()
                .map_err(|e| format!("pg_ctl: {e}"))?;
            if out.status.success() {
                let server = PgServer {
                    dir,
                    bin,
                    port,
                    run_as,
                };
                // SAFETY: registering a plain extern "C" function with no captured state.
                unsafe { libc::atexit(stop_at_exit) };
                return Ok(server);
            }
            last = format!(
                "pg_ctl start: {}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("log")).unwrap_or_default()
            );
        }
        Err(last)
    }

    /// A new, empty database; its URL asking for TLS, verified against this server's CA.
    pub fn tls_database(&self) -> String {
        format!(
            "{}?sslmode=require&sslrootcert={}",
            self.database(),
            self.dir.join("ca.pem").display()
        )
    }

    /// The CA file this server's certificate is signed by.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A new, empty database; its URL.
    pub fn database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://tollgate@127.0.0.1:{}/{name}", self.port)
    }

    /// Run `sql` in database `db` with psql; its output (unaligned, tuples only). Panics if
    /// psql fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-U", "tollgate", "-X", "-q", "-A", "-t"])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The database name of `url` (one this server made).
    pub fn name_of(url: &str) -> &str {
        let path = url.split('?').next().unwrap_or_default();
        path.rsplit('/').next().unwrap_or_default()
    }

    fn stop(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn command(bin: &Path, run_as: Option<&str>, program: &str) -> Command {
    let path = bin.join(program);
    match run_as {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(path);
            c
        }
        None => Command::new(path),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

extern "C" fn stop_at_exit() {
    if let Some(Ok(server)) = SERVER.get() {
        server.stop();
    }
}
