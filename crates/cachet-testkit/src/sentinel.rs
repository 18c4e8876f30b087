//! A throwaway Redis Sentinel deployment for one test: a primary, a replica
//! and three sentinels.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis_server::{
    RedisServer, RedisServerOptions, command_at, free_port, ping, try_command_at,
};

/// A primary, one replica (`--replicaof`) and three sentinels watching them,
/// each process on a free loopback port with its own temporary directory.
/// The sentinels mark the primary down after 500 ms without an answer
/// (`down-after-milliseconds`) and fail over with a quorum of two.
///
/// [`start`](Self::start) returns once every sentinel names the primary and
/// knows the replica and the two other sentinels, and the replica's link to
/// the primary is up: ready for a failover. Dropping it kills and reaps every
/// process; if the thread is panicking at that point, every sentinel's log is
/// printed to stderr (the data nodes print theirs as [`RedisServer`] does).
#[derive(Debug)]
pub struct RedisSentinels {
    /// The data nodes: the first primary, then its replica.
    nodes: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
}

#[derive(Debug)]
struct Sentinel {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisSentinels {
    /// The name the sentinels know the primary by.
    pub const MASTER: &'static str = "mymaster";

    /// How long the deployment may take to be ready, and a failover to be
    /// reported.
    const READY_TIMEOUT: Duration = Duration::from_secs(30);

    /// Starts the primary, its replica and three sentinels.
    ///
    /// # Panics
    /// If `redis-server` is not on `PATH`, or the deployment is not ready
    /// within 30 seconds.
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let replica = RedisServer::start_with(RedisServerOptions {
            extra_args: vec![("replicaof".into(), format!("127.0.0.1 {}", primary.port()))],
            ..RedisServerOptions::default()
        });
        let sentinels = (0..3).map(|_| Sentinel::start(primary.port())).collect();
        let deployment = Self {
            nodes: vec![primary, replica],
            sentinels,
        };
        deployment.wait_until_ready();
        deployment
    }

    /// One `redis://127.0.0.1:P/` URL per sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}/", s.port))
            .collect()
    }

    /// The data nodes: the first primary (index 0), then its replica.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Data node `node`, to kill or restart.
    ///
    /// # Panics
    /// If there is no such node.
    pub fn node_mut(&mut self, node: usize) -> &mut RedisServer {
        &mut self.nodes[node]
    }

    /// Sends one command to sentinel `sentinel` and returns the reply as text,
    /// as [`RedisServer::command`] does.
    ///
    /// # Panics
    /// If there is no such sentinel or it cannot be reached.
    pub fn sentinel_command(&self, sentinel: usize, args: &[&str]) -> String {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        command_at(self.sentinels[sentinel].port, &args)
    }

    /// The index of the data node that sentinel `sentinel` names as primary
    /// (`SENTINEL get-master-addr-by-name`), if it is one of ours.
    ///
    /// # Panics
    /// If there is no such sentinel or it cannot be reached.
    pub fn primary_named_by(&self, sentinel: usize) -> Option<usize> {
        let reply = self.sentinel_command(
            sentinel,
            &["SENTINEL", "get-master-addr-by-name", Self::MASTER],
        );
        let port: u16 = reply.lines().nth(1)?.parse().ok()?;
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// The index of the data node that every sentinel names as primary, if
    /// they agree and it answers that it is the primary (`ROLE`).
    pub fn primary(&self) -> Option<usize> {
        let first = self.primary_named_by(0)?;
        let agreed = (1..self.sentinels.len()).all(|s| self.primary_named_by(s) == Some(first));
        let role = try_command_at(self.nodes[first].port(), &[b"ROLE"]);
        (agreed && role.is_some_and(|r| r.starts_with("master"))).then_some(first)
    }

    /// Asks a sentinel to fail over now (`SENTINEL FAILOVER`), without waiting
    /// for the primary to fail.
    ///
    /// # Panics
    /// If the sentinel refuses.
    pub fn failover(&self) {
        self.failover_via(0);
    }

    /// Asks sentinel `sentinel` to fail over now, as [`failover`](Self::failover)
    /// does with the first one.
    ///
    /// # Panics
    /// If there is no such sentinel or it refuses.
    pub fn failover_via(&self, sentinel: usize) {
        let reply = self.sentinel_command(sentinel, &["SENTINEL", "FAILOVER", Self::MASTER]);
        assert_eq!(
            reply,
            "OK",
            "SENTINEL FAILOVER {} via sentinel {sentinel}",
            Self::MASTER
        );
    }

    /// The sentinels that have a client subscribed to one of their channels
    /// (`CLIENT LIST TYPE pubsub`): the sentinels do not subscribe to one
    /// another's, so these are the ones a client listens to.
    ///
    /// # Panics
    /// If a sentinel cannot be reached.
    pub fn listened_to(&self) -> Vec<usize> {
        (0..self.sentinels.len())
            .filter(|&s| {
                !self
                    .sentinel_command(s, &["CLIENT", "LIST", "TYPE", "pubsub"])
                    .is_empty()
            })
            .collect()
    }

    /// Stops sentinel `sentinel` (`SIGSTOP`): its connections stay open and
    /// nothing on them is answered, as with a hung process, until
    /// [`resume_sentinel`](Self::resume_sentinel).
    ///
    /// # Panics
    /// If there is no such sentinel or the signal cannot be sent.
    pub fn pause_sentinel(&mut self, sentinel: usize) {
        self.sentinels[sentinel].signal("STOP");
    }

    /// Lets a sentinel stopped by [`pause_sentinel`](Self::pause_sentinel) run
    /// again (`SIGCONT`).
    ///
    /// # Panics
    /// If there is no such sentinel or the signal cannot be sent.
    pub fn resume_sentinel(&mut self, sentinel: usize) {
        self.sentinels[sentinel].signal("CONT");
    }

    /// Waits until every sentinel names a primary other than data node `old`,
    /// and that node says it is the primary; its index.
    ///
    /// # Panics
    /// If that takes more than 30 seconds.
    pub fn wait_for_new_primary(&self, old: usize) -> usize {
        let found = poll(Self::READY_TIMEOUT, || self.primary().filter(|&p| p != old));
        found.unwrap_or_else(|| {
            panic!(
                "the sentinels did not report a primary other than node {old} within {:?}",
                Self::READY_TIMEOUT
            )
        })
    }

    /// Waits until every sentinel names data node 0 as primary and knows its
    /// replica and the other sentinels, and the replica is in sync.
    fn wait_until_ready(&self) {
        let replica = &self.nodes[1];
        let ready = poll(Self::READY_TIMEOUT, || {
            let synced = replica
                .command(&["INFO", "replication"])
                .contains("master_link_status:up");
            let informed = (0..self.sentinels.len()).all(|s| {
                let master =
                    fields(&self.sentinel_command(s, &["SENTINEL", "master", Self::MASTER]));
                let flags = master.get("flags").map_or("", String::as_str);
                self.primary_named_by(s) == Some(0)
                    && flags == "master"
                    && master.get("num-slaves").map(String::as_str) == Some("1")
                    && master.get("num-other-sentinels").map(String::as_str) == Some("2")
            });
            (synced && informed).then_some(())
        });
        if ready.is_none() {
            let state: Vec<String> = (0..self.sentinels.len())
                .map(|s| self.sentinel_command(s, &["SENTINEL", "master", Self::MASTER]))
                .collect();
            panic!(
                "the Sentinel deployment was not ready within {:?}:\n{}",
                Self::READY_TIMEOUT,
                state.join("\n----\n")
            );
        }
    }
}

impl Sentinel {
    const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

    fn start(primary: u16) -> Self {
        let mut last_log = String::new();
        // A port chosen by the OS can be taken by someone else first; try a few.
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("cachet-sentinel-")
                .tempdir()
                .expect("create a temporary directory for a sentinel");
            let port = free_port();
            let conf = dir.path().join("sentinel.conf");
            let log = dir.path().join("sentinel.log");
            let text = format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                 sentinel monitor {name} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {name} 500\n\
                 sentinel failover-timeout {name} 3000\n\
                 sentinel parallel-syncs {name} 1\n",
                dir = dir.path().display(),
                log = log.display(),
                name = RedisSentinels::MASTER,
            );
            std::fs::write(&conf, text).expect("write sentinel.conf");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run redis-server --sentinel (is redis-server installed?)");
            let mut sentinel = Self {
                child: Some(child),
                port,
                dir,
            };
            let up = poll(Self::STARTUP_TIMEOUT, || {
                let running = sentinel.is_running();
                let answers = running && ping(([127, 0, 0, 1], port).into());
                (!running || answers).then_some(answers)
            });
            if up == Some(true) {
                return sentinel;
            }
            sentinel.kill();
            last_log = sentinel.log();
        }
        panic!("a sentinel did not start after 5 attempts; last log:\n{last_log}");
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("a running sentinel").id();
        crate::child::signal(pid, name);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- sentinel on port {} log ----\n{}---- end of log ----",
                self.port,
                self.log()
            );
        }
    }
}

/// A flat `SENTINEL master` reply (one line per name, then value) as a map.
fn fields(reply: &str) -> HashMap<String, String> {
    let lines: Vec<&str> = reply.lines().collect();
    lines
        .chunks(2)
        .filter_map(|kv| Some((kv.first()?.to_string(), kv.get(1)?.to_string())))
        .collect()
}

/// Calls `check` every 50 ms until it returns `Some`, for at most `limit`.
fn poll<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    let step = Duration::from_millis(50);
    let rounds = limit.as_millis() / step.as_millis() + 1;
    for _ in 0..rounds {
        if let Some(found) = check() {
            return Some(found);
        }
        if start.elapsed() >= limit {
            break;
        }
        std::thread::sleep(step);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_ready_and_fails_over_on_request() {
        let sentinels = RedisSentinels::start();
        assert_eq!(sentinels.primary(), Some(0));
        sentinels.nodes()[0].command(&["SET", "k", "v"]);
        assert_eq!(sentinels.nodes()[0].command(&["WAIT", "1", "5000"]), "1");
        sentinels.failover();
        assert_eq!(sentinels.wait_for_new_primary(0), 1);
        // The data written before the failover was replicated.
        assert_eq!(sentinels.nodes()[1].command(&["GET", "k"]), "v");
    }
}
