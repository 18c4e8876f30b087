//! Test support for cachet.
//!
//! - [`RedisServer`]: a throwaway `redis-server` on a free loopback port, killed
//!   and reaped on drop, whose log is printed when the test fails;
//! - [`RedisCluster`]: a throwaway Redis Cluster of three (or more) masters, one
//!   `redis-server` per node, likewise killed and reaped on drop;
//! - both optionally with TLS on a port of their own, with the throwaway CA and
//!   certificates of a [`TestPki`];
//! - [`RedisSentinels`]: a throwaway Sentinel deployment (a primary, a replica,
//!   three sentinels), and [`ScriptedSentinel`]: a sentinel whose answers and
//!   announcements the test decides;
//! - [`PgDatabase`]: a fresh PostgreSQL database, dropped afterwards;
//! - [`conformance`]: the protocol tests every [`Store`](cachet_core::Store) must pass;
//! - [`TestChild`]: this test binary run again on one of its ignored tests, as a
//!   child process to SIGKILL; [`eventually`]: a bounded poll.
#![deny(missing_docs)]

mod child;
pub mod conformance;
mod logs;
mod postgres;
mod redis_cluster;
mod redis_server;
mod scripted_sentinel;
mod sentinel;
mod tls;

pub use child::{TestChild, child_args, eventually};
pub use logs::Logs;
pub use postgres::{DEFAULT_SERVER_URL, PgDatabase};
pub use redis_cluster::RedisCluster;
pub use redis_server::{ClientAuth, RedisServer, RedisServerOptions};
pub use scripted_sentinel::ScriptedSentinel;
pub use sentinel::RedisSentinels;
pub use tls::{CertFiles, TestPki};
