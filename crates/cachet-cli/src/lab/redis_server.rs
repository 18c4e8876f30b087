//! The Redis a scenario that needs one runs on: the lab's (`--redis-url`,
//! `--redis-cluster`), or a private `redis-server` the scenario starts, and
//! may kill and restart, itself. `cachet bench` starts one the same way.
//!
//! A private server listens on a free loopback port, keeps its files in a
//! temporary directory, and is killed when dropped; it takes every key with it.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::time::Instant;

use super::Lab;
use crate::target::RedisTarget;

/// How long a private `redis-server` may take to answer.
const REDIS_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a private server keeps what it acknowledged across a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Persistence {
    /// Nothing on disk: a restart starts empty.
    None,
    /// An append-only file (`appendfsync always`): acknowledged writes are in
    /// the file before the reply, so they survive a killed process. (With
    /// `everysec`, Redis postpones writing the file for up to 2 s while a
    /// slow fsync runs, and replies meanwhile: a kill then loses writes it
    /// acknowledged.)
    Aof,
}

/// The Redis of one scenario.
#[derive(Debug)]
pub(super) struct ScenarioRedis {
    pub(super) target: RedisTarget,
    /// A private server, or `None` on the lab's Redis.
    pub(super) server: Option<PrivateRedis>,
}

impl ScenarioRedis {
    /// The lab's Redis, or else a private server; `None` when there is no
    /// `redis-server` on `PATH` to start.
    pub(super) async fn open(lab: &Lab, persistence: Persistence) -> Result<Option<Self>> {
        if let Some(target) = &lab.redis {
            return Ok(Some(Self {
                target: target.clone(),
                server: None,
            }));
        }
        Ok(PrivateRedis::start(persistence).await?.map(|server| Self {
            target: RedisTarget::server(server.url()),
            server: Some(server),
        }))
    }

    /// The Redis a scenario that kills or pauses its server may use: a
    /// private server (AOF, so a kill loses nothing acknowledged), or the
    /// lab's Redis with `--allow-disruption`. `None`, with the scenario
    /// recorded as skipped and why, otherwise; `pause` says what the
    /// scenario would do to a given server ("for about a second").
    pub(super) async fn open_disruptive(
        lab: &Lab,
        scenario: &'static str,
        pause: &str,
    ) -> Result<Option<Self>> {
        if let Some(target) = &lab.redis
            && !lab.args.allow_disruption
        {
            lab.skip(
                scenario,
                &format!(
                    "it would make the Redis at {} unavailable for everyone; pass \
                     --allow-disruption to let it pause every node (CLIENT PAUSE) {pause}.",
                    target.describe()
                ),
            );
            return Ok(None);
        }
        let redis = Self::open(lab, Persistence::Aof).await?;
        if redis.is_none() {
            lab.skip(
                scenario,
                "the scenario kills and restarts a redis-server of its own, and there is no \
                 redis-server on PATH (or pass --redis-url / --redis-cluster with \
                 --allow-disruption).",
            );
        }
        Ok(redis)
    }

    /// Whether the server is the scenario's own.
    pub(super) fn is_private(&self) -> bool {
        self.server.is_some()
    }
}

/// A `redis-server` of the run's own: a free port, a temporary directory,
/// 256 MiB with `volatile-lru`; killed when dropped.
#[derive(Debug)]
pub(crate) struct PrivateRedis {
    binary: PathBuf,
    child: Option<std::process::Child>,
    port: u16,
    persistence: Persistence,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts one, or returns `None` when `redis-server` is not on `PATH`.
    pub(crate) async fn start(persistence: Persistence) -> Result<Option<Self>> {
        let Some(binary) = find_on_path("redis-server") else {
            return Ok(None);
        };
        let dir = tempfile::Builder::new()
            .prefix("cachet-lab-redis-")
            .tempdir()
            .context("cannot create a directory for redis-server")?;
        let mut server = Self {
            binary,
            child: None,
            port: 0,
            persistence,
            dir,
        };
        // A port the OS just handed out can be taken before the server binds it;
        // try a few.
        let mut last_error = None;
        for _ in 0..3 {
            server.port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .context("cannot find a free port")?
                .port();
            match server.spawn().await {
                Ok(()) => return Ok(Some(server)),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "cannot start a private {}",
                server.binary.display()
            )))
    }

    /// Starts the server process on this port and directory, and waits until it
    /// answers.
    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no"])
            // A bounded memory that evicts only keys with a TTL: every entry
            // has one, the durable `:sys:` structures (the deferred queue) stay.
            .args(["--maxmemory", "256mb", "--maxmemory-policy", "volatile-lru"]);
        match self.persistence {
            Persistence::None => cmd.args(["--appendonly", "no"]),
            Persistence::Aof => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
        };
        let mut child = cmd
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        let ready = wait_ready(&mut child, self.port).await;
        if ready.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        } else {
            self.child = Some(child);
        }
        ready
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub(super) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory (with AOF, it
    /// loads what it had acknowledged); returns once it answers.
    pub(super) async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await.with_context(|| {
            format!(
                "cannot restart the private redis-server on port {}",
                self.port
            )
        })
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the server on `port` answers `PING`.
async fn wait_ready(child: &mut std::process::Child, port: u16) -> Result<()> {
    let deadline = Instant::now() + REDIS_STARTUP_TIMEOUT;
    let mut backoff = Duration::from_millis(5);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("redis-server exited at start ({status})");
        }
        if tokio::time::timeout(Duration::from_secs(1), ping(port))
            .await
            .is_ok_and(|pong| pong)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("redis-server did not answer within {REDIS_STARTUP_TIMEOUT:?}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut s) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
        return false;
    };
    let mut reply = [0; 7];
    s.write_all(b"PING\r\n").await.is_ok()
        && s.read_exact(&mut reply).await.is_ok()
        && &reply == b"+PONG\r\n"
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
