//! `cachet`, the command-line tool of the cachet caching library.
//!
//! `cachet lab` runs caching failure modes side by side (see [`lab`]);
//! `cachet stats` prints a Redis server's memory, eviction and hit counters
//! and what in its settings weakens cachet's guarantees (see [`stats`]);
//! `cachet inspect` shows one cache entry as stored (see [`inspect`]);
//! `cachet bench` measures a cache's hits, misses and invalidations against
//! raw commands on the same server (see [`bench`]); a hidden
//! `cachet __child` runs work the lab starts in processes of its own (see
//! `lab::child`). This module owns argument parsing, logging, the runtime and
//! how errors reach the user.

mod bench;
mod inspect;
mod lab;
mod metrics_server;
mod stats;
mod target;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "cachet",
    version,
    about = "Tools for the cachet cache",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    // Boxed: the lab has many flags, and the other commands would pay for them.
    Lab(Box<lab::LabArgs>),
    Stats(stats::StatsArgs),
    Inspect(inspect::InspectArgs),
    Bench(bench::BenchArgs),
    /// Work the lab runs in a process of its own, to kill it mid-way
    #[command(name = "__child", hide = true)]
    Child(lab::child::ChildArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A child's warnings about the Redis settings repeat the lab's own.
    let default_filter = match cli.command {
        Command::Child(_) => "warn,cachet::write_behind::durability=error",
        _ => "warn",
    };
    // Library warnings (a store that stopped answering, say) go to stderr, so
    // that stdout stays machine-readable under --json; those a lab scenario
    // causes on purpose are labelled as expected.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(lab::expected::Labelled(tracing_subscriber::fmt::format()))
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Lab(args) => lab::run(*args).await,
            Command::Stats(args) => stats::run(args).await,
            Command::Inspect(args) => inspect::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Child(args) => lab::child::run(args).await,
        }
    });
    // Client connections may still hold background tasks; do not wait on them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Writes `s` to stdout and flushes it.
fn write_stdout(s: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// The error and its causes, one per line. cachet's errors never repeat
/// their cause in their own message, and a cause that repeats the line
/// before it (an error of another crate that both prints and returns its
/// cause) is left out, so each line is news.
fn error_chain(e: &anyhow::Error) -> String {
    let lines: Vec<String> = cachet::Report(e.as_ref()).messages().collect();
    lines.join("\n  caused by: ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(cachet::StoreError::unavailable(io)).context("cannot connect");
        assert_eq!(
            error_chain(&e),
            "cannot connect\n  caused by: store unreachable\n  caused by: refused"
        );
        // redis-rs's error around an I/O error prints the I/O error and
        // returns it as its source: one line.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let redis = redis::RedisError::from(io);
        assert_eq!(redis.to_string(), "refused");
        let e =
            anyhow::Error::new(cachet::StoreError::unavailable(redis)).context("cannot connect");
        assert_eq!(
            error_chain(&e),
            "cannot connect\n  caused by: store unreachable\n  caused by: refused"
        );
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
