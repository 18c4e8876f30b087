//! Write-behind (feature `write-behind`) on real Redis servers and PostgreSQL:
//! writes, flushes, backpressure, durability, poison writes, replicas, a
//! Sentinel failover and flushers killed mid-batch.

mod support;

mod backpressure;
mod basics;
mod crash;
mod durability;
mod failover;
mod poison;
mod replicas;
