//! Test support for cachet.
//!
//! - [`RedisServer`]: a throwaway `redis-server` on a free loopback port, killed
//!   and reaped on drop, whose log is printed when the test fails;
//! - [`RedisCluster`]: a throwaway Redis Cluster of three (or more) masters, one
//!   `redis-server` per node, likewise killed and reaped on drop;
//! - [`PgDatabase`]: a fresh PostgreSQL database, dropped afterwards;
//! - [`conformance`]: the protocol tests every [`Store`](cachet_core::Store) must pass.
#![deny(missing_docs)]

pub mod conformance;
mod postgres;
mod redis_cluster;
mod redis_server;

pub use postgres::{DEFAULT_SERVER_URL, PgDatabase};
pub use redis_cluster::RedisCluster;
pub use redis_server::{RedisServer, RedisServerOptions};
