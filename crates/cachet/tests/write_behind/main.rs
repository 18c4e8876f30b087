//! Write-behind (feature `write-behind`) on real Redis servers and PostgreSQL:
//! writes, flushes, backpressure, durability, poison writes, replicas and
//! flushers killed mid-batch.

mod support;

mod backpressure;
mod basics;
mod crash;
mod durability;
mod poison;
mod replicas;
