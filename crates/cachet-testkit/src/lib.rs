//! Test support for cachet.
//!
//! - [`RedisServer`]: a throwaway `redis-server` on a free loopback port, killed
//!   and reaped on drop, whose log is printed when the test fails;
//! - [`conformance`]: the protocol tests every [`Store`](cachet_core::Store) must pass.
#![deny(missing_docs)]

pub mod conformance;
mod redis_server;

pub use redis_server::{RedisServer, RedisServerOptions};
