//! Tests of the `cachet` binary, run as a user runs it: a child process whose
//! exit status, stdout and stderr are checked.

mod audit;
mod avalanche;
mod bad_input;
mod bench;
mod bloom;
mod chaos;
mod cluster;
mod durability;
mod environment;
mod fail_safe;
mod groups;
mod inspect;
mod lab;
mod metrics;
mod near_cache;
mod outage;
mod real_backends;
mod redis_checks;
mod refresh_ahead;
mod secrets;
mod sentinel;
mod tls;
mod torture;
mod util;
mod vanish;
mod write_behind;
mod write_through_race;
