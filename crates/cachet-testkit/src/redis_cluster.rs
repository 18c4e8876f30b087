//! A throwaway Redis Cluster for one test.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis_server::{ClientAuth, RedisServer, RedisServerOptions, free_port};
use crate::tls::TestPki;

/// A local Redis Cluster of masters without replicas: one [`RedisServer`] per
/// node, each on its own free loopback port and in its own temporary directory,
/// started with `--cluster-enabled yes` and joined by
/// `redis-cli --cluster create … --cluster-replicas 0`.
///
/// [`start`](Self::start) returns once every node reports `cluster_state:ok`
/// with all 16384 slots assigned. Dropping the cluster kills and reaps every
/// node; if the thread is panicking at that point, the output of
/// `redis-cli --cluster create` and every node's log are printed to stderr.
///
/// Forming a cluster takes two to three seconds (`redis-cli` waits for the nodes
/// to agree, and a new master waits two seconds before it accepts writes), so
/// tests that can share one should.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    create_log: String,
    tls: bool,
}

impl RedisCluster {
    /// The number of hash slots of a Redis Cluster.
    pub const SLOTS: u16 = 16_384;

    /// How long `redis-cli --cluster create` may take, and then how long the
    /// nodes may take to agree that the cluster is up.
    const READY_TIMEOUT: Duration = Duration::from_secs(30);

    /// Starts a cluster of three masters.
    ///
    /// # Panics
    /// If `redis-server` or `redis-cli` is not on `PATH`, or the cluster is not
    /// up within 30 seconds.
    pub fn start() -> Self {
        Self::start_with_masters(3)
    }

    /// Starts a cluster of `masters` masters (at least 3, as `redis-cli` requires).
    ///
    /// # Panics
    /// If `masters` is below 3, if `redis-server` or `redis-cli` is not on
    /// `PATH`, or if the cluster is not up within 30 seconds.
    pub fn start_with_masters(masters: usize) -> Self {
        assert!(
            masters >= 3,
            "a Redis Cluster needs at least 3 masters, not {masters}"
        );
        Self::start_inner(masters, None)
    }

    /// Starts a cluster of three masters that speak TLS, to clients and to
    /// each other (`tls-cluster yes`), with the certificates of `pki`. Each
    /// node keeps a plain port for [`command`](Self::command); a client on
    /// TLS is told the nodes' TLS ports. Clients may present a certificate.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_tls(pki: &TestPki) -> Self {
        Self::start_inner(3, Some(pki))
    }

    fn start_inner(masters: usize, pki: Option<&TestPki>) -> Self {
        let nodes: Vec<RedisServer> = (0..masters).map(|_| start_node(pki)).collect();
        let create_log = create(&nodes, pki);
        let cluster = Self {
            nodes,
            create_log,
            tls: pki.is_some(),
        };
        cluster.wait_until_up();
        cluster
    }

    /// One `redis://127.0.0.1:P/` URL per node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// One `rediss://127.0.0.1:P/` URL per node, its TLS port.
    ///
    /// # Panics
    /// If the cluster was not started with TLS.
    pub fn tls_urls(&self) -> Vec<String> {
        assert!(self.tls, "a cluster started with TLS");
        self.nodes.iter().map(RedisServer::tls_url).collect()
    }

    /// The nodes, in the order their URLs are listed.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Sends one command to node `node` (an index into [`nodes`](Self::nodes))
    /// and returns the reply as text, as [`RedisServer::command`] does. No
    /// redirection is followed: a key of another node's slot gets `MOVED …`.
    ///
    /// # Panics
    /// If there is no such node or it cannot be reached.
    pub fn command(&self, node: usize, args: &[&str]) -> String {
        self.nodes[node].command(args)
    }

    /// Sends one command to every node; the replies in node order.
    ///
    /// # Panics
    /// If a node cannot be reached.
    pub fn command_all(&self, args: &[&str]) -> Vec<String> {
        self.nodes.iter().map(|n| n.command(args)).collect()
    }

    /// Sends one command about `key` to the node that serves `key`'s slot.
    ///
    /// # Panics
    /// If a node cannot be reached or no node serves the slot.
    pub fn command_for_key(&self, key: &str, args: &[&str]) -> String {
        self.command(self.node_of(key), args)
    }

    /// [`command_for_key`](Self::command_for_key) with binary arguments.
    ///
    /// # Panics
    /// If a node cannot be reached or no node serves the slot.
    pub fn command_bytes_for_key(&self, key: &str, args: &[&[u8]]) -> String {
        self.nodes[self.node_of(key)].command_bytes(args)
    }

    /// The hash slot of `key`, as the cluster computes it (`CLUSTER KEYSLOT`).
    ///
    /// # Panics
    /// If the first node cannot be reached.
    pub fn slot_of(&self, key: &str) -> u16 {
        let reply = self.command(0, &["CLUSTER", "KEYSLOT", key]);
        reply
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key}: {reply}"))
    }

    /// The index of the node that serves `key`'s slot, from the first node's
    /// `CLUSTER NODES`.
    ///
    /// # Panics
    /// If the first node cannot be reached or no node serves the slot.
    pub fn node_of(&self, key: &str) -> usize {
        self.node_of_slot(self.slot_of(key))
    }

    /// The index of the node that serves `slot`.
    ///
    /// # Panics
    /// If the first node cannot be reached or no node serves the slot.
    pub fn node_of_slot(&self, slot: u16) -> usize {
        let nodes = self.command(0, &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = fields
                .get(1)
                .and_then(|addr| addr.split(['@', ',']).next())
                .and_then(|addr| addr.rsplit_once(':'))
                .and_then(|(_, port)| port.parse::<u16>().ok())
            else {
                continue;
            };
            let serves = fields.iter().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()),
                    (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if serves && let Some(i) = self.nodes.iter().position(|n| n.port() == port) {
                return i;
            }
        }
        panic!("no node of this cluster serves slot {slot}:\n{nodes}");
    }

    /// Kills node `node` (SIGKILL) and reaps it; its slots stay unserved.
    ///
    /// # Panics
    /// If there is no such node.
    pub fn kill_node(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// The output of `redis-cli --cluster create`.
    pub fn create_log(&self) -> &str {
        &self.create_log
    }

    /// Waits until every node sees the cluster up: `cluster_state:ok`, every
    /// slot assigned and every node known.
    fn wait_until_up(&self) {
        let want = [
            "cluster_state:ok".to_owned(),
            format!("cluster_slots_assigned:{}", Self::SLOTS),
            format!("cluster_known_nodes:{}", self.nodes.len()),
        ];
        let deadline = Instant::now() + Self::READY_TIMEOUT;
        loop {
            let infos = self.command_all(&["CLUSTER", "INFO"]);
            let up = infos
                .iter()
                .all(|info| want.iter().all(|w| info.lines().any(|l| l.trim() == w)));
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster was not up after {:?}; CLUSTER INFO per node:\n{}",
                Self::READY_TIMEOUT,
                infos.join("\n----\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- redis-cli --cluster create ----\n{}---- end of output ----",
                self.create_log
            );
        }
        // Each node prints its own log as it is dropped.
    }
}

/// Starts one cluster-enabled node. Its cluster bus gets a free port of its own
/// (`cluster-port`) rather than the default port + 10000, which may be taken or
/// above 65535.
fn start_node(pki: Option<&TestPki>) -> RedisServer {
    let arg = |name: &str, value: String| (name.to_owned(), value);
    let mut options = RedisServerOptions {
        append_only: false,
        extra_args: vec![
            arg("cluster-enabled", "yes".into()),
            // Relative to the node's own directory (`--dir`).
            arg("cluster-config-file", "nodes.conf".into()),
            arg("cluster-node-timeout", "2000".into()),
            arg("cluster-port", free_port().to_string()),
        ],
    };
    match pki {
        None => RedisServer::start_with(options),
        Some(pki) => {
            options.extra_args.extend([
                arg("tls-cluster", "yes".into()),
                arg("tls-replication", "yes".into()),
            ]);
            RedisServer::start_tls_with(options, pki, ClientAuth::Optional)
        }
    }
}

/// Runs `redis-cli --cluster create` over `nodes` and returns its output.
fn create(nodes: &[RedisServer], pki: Option<&TestPki>) -> String {
    let log_path = nodes[0].dir().join("cluster-create.log");
    let log = File::create(&log_path).expect("create the redis-cli log file");
    let mut cmd = Command::new("redis-cli");
    if let Some(pki) = pki {
        cmd.arg("--tls")
            .arg("--cacert")
            .arg(&pki.ca_file)
            .arg("--cert")
            .arg(&pki.client.cert_file)
            .arg("--key")
            .arg(&pki.client.key_file);
    }
    cmd.args(["--cluster", "create"]);
    for node in nodes {
        let port = if pki.is_some() {
            node.tls_port()
        } else {
            node.port()
        };
        cmd.arg(format!("127.0.0.1:{port}"));
    }
    cmd.args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log file handle"))
        .stderr(log);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run redis-cli (is it installed?): {e}"));
    let deadline = Instant::now() + RedisCluster::READY_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for redis-cli") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => output,
        Some(s) => panic!("redis-cli --cluster create failed ({s}):\n{output}"),
        None => panic!(
            "redis-cli --cluster create did not finish within {:?}:\n{output}",
            RedisCluster::READY_TIMEOUT
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_server::ping;

    #[test]
    fn forms_a_cluster_that_routes_keys_by_slot() {
        let cluster = RedisCluster::start();
        let urls = cluster.urls();
        assert_eq!(urls.len(), 3);
        for (url, node) in urls.iter().zip(cluster.nodes()) {
            assert_eq!(url, &format!("redis://127.0.0.1:{}/", node.port()));
        }
        for info in cluster.command_all(&["CLUSTER", "INFO"]) {
            assert!(info.contains("cluster_state:ok"), "{info}");
            assert!(info.contains("cluster_size:3"), "{info}");
        }
        // Keys with one hash tag share a slot, hence a node.
        assert_eq!(cluster.slot_of("{user:1}a"), cluster.slot_of("{user:1}b"));
        assert_eq!(cluster.slot_of("a"), 15_495);
        // Every node serves some slot.
        let owners: std::collections::BTreeSet<usize> = (0..RedisCluster::SLOTS)
            .step_by(1_000)
            .map(|s| cluster.node_of_slot(s))
            .collect();
        assert_eq!(owners.len(), 3, "{owners:?}");

        let key = "{user:1}a";
        let owner = cluster.node_of(key);
        assert_eq!(cluster.command_for_key(key, &["SET", key, "1"]), "OK");
        assert_eq!(cluster.command(owner, &["GET", key]), "1");
        let other = (owner + 1) % 3;
        let moved = cluster.command(other, &["GET", key]);
        let port = cluster.nodes()[owner].port();
        assert_eq!(
            moved,
            format!("MOVED {} 127.0.0.1:{port}", cluster.slot_of(key))
        );
        // Keys of two slots in one command are refused.
        let cross = cluster.command_for_key("a", &["DEL", "a", "b"]);
        assert!(cross.starts_with("CROSSSLOT"), "{cross}");
        assert!(cluster.create_log().contains("All 16384 slots covered"));
    }

    #[test]
    fn drop_kills_every_node() {
        let mut cluster = RedisCluster::start();
        let addrs: Vec<_> = cluster.nodes().iter().map(RedisServer::addr).collect();
        cluster.kill_node(1);
        assert!(!ping(addrs[1]), "a killed node still answers");
        assert!(ping(addrs[0]) && ping(addrs[2]));
        let dirs: Vec<_> = cluster.nodes().iter().map(|n| n.dir().to_owned()).collect();
        assert!(dirs.iter().all(|d| d.join("nodes.conf").exists()));
        drop(cluster);
        for addr in addrs {
            assert!(!ping(addr), "{addr} still answers");
        }
        assert!(
            dirs.iter().all(|d| !d.exists()),
            "temporary directories left"
        );
    }
}
