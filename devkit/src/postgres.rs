//! An ephemeral PostgreSQL server.

use anyhow::{Context, bail};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{signal, spawn_tied};

/// A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 only.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    uid: Option<(u32, u32)>,
    child: Option<Child>,
    durability: Durability,
}

/// Whether a commit waits for its WAL to reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `fsync`, `full_page_writes` and `synchronous_commit` off: a commit
    /// costs no disk flush. Tests and the default benchmark run so; a crash
    /// of the machine (not of the server) may lose committed rows.
    Relaxed,
    /// PostgreSQL's own defaults (all three on), as production runs it: every
    /// commit waits until its WAL is flushed to the disk.
    Durable,
}

impl Durability {
    /// The server settings, as `name=value`.
    pub fn settings(self) -> [&'static str; 3] {
        match self {
            Durability::Relaxed => [
                "fsync=off",
                "full_page_writes=off",
                "synchronous_commit=off",
            ],
            Durability::Durable => ["fsync=on", "full_page_writes=on", "synchronous_commit=on"],
        }
    }
}

/// Where the PostgreSQL server binaries are: `$PG_BIN`, or the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bin() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().context(
        "PostgreSQL server binaries not found (looked for /usr/lib/postgresql/*/bin/initdb). \
         Install them with `apt-get install postgresql` or point PG_BIN at the directory holding initdb and postgres",
    )
}

/// `initdb` and `postgres` refuse to run as root: when we are root, run them
/// as the `postgres` user.
fn unprivileged_ids() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: getuid never fails.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres")?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy
    // the two fields out immediately.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!(
            "running as root but there is no `postgres` user to run PostgreSQL as (apt-get install postgresql creates it)"
        );
    }
    // SAFETY: non-null pointer from getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

fn chown(path: &Path, ids: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

impl Postgres {
    /// initdb + start on a free port with relaxed durability (commits cost
    /// no disk flush); returns once it accepts connections.
    pub async fn start() -> anyhow::Result<Postgres> {
        Self::start_with(Durability::Relaxed).await
    }

    /// initdb + start on a free port; returns once it accepts connections.
    pub async fn start_with(durability: Durability) -> anyhow::Result<Postgres> {
        let bin = find_bin()?;
        let uid = unprivileged_ids()?;
        let dir = tempfile::Builder::new().prefix("outbox-pg-").tempdir()?;
        chown(dir.path(), uid)?;
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((u, g)) = uid {
            initdb.uid(u).gid(g);
        }
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut pg = Postgres {
            dir,
            bin,
            port: crate::free_port()?,
            uid,
            child: None,
            durability,
        };
        pg.start_server().await?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn start_server(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.path().join("postgres.log"))?;
        chown(&self.dir.path().join("postgres.log"), self.uid)?;
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=256MB",
                "-c",
                "max_wal_size=4GB",
            ]);
        for setting in self.durability.settings() {
            cmd.arg("-c").arg(setting);
        }
        cmd.stdout(Stdio::null()).stderr(log);
        if let Some((u, g)) = self.uid {
            cmd.uid(u).gid(g);
        }
        self.child = Some(spawn_tied(&mut cmd).context("starting postgres")?);
        let url = self.url("postgres");
        crate::wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move {
                    use sqlx::Connection;
                    sqlx::PgConnection::connect(&url).await.ok().map(|_| ())
                }
            },
        )
        .await
        .with_context(|| format!("log: {}", self.log()))
    }

    /// The server log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        // Test-chosen name, validated to be a plain identifier.
        anyhow::ensure!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad database name {name}"
        );
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await?;
        Ok(self.url(name))
    }

    /// Fast shutdown (SIGINT), waiting for the server to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGINT)?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts again on the same port with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_server().await
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(&child, libc::SIGQUIT);
            let _ = child.wait();
        }
    }
}
