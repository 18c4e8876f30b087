//! Running the built `cachet` binary and reading what it prints.

use std::io::Read as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// No test run of the binary is allowed longer than this.
const TIMEOUT: Duration = Duration::from_secs(180);

/// Sizes that keep every scenario to a second or two while preserving the
/// differences the tests look for. The stale entries naive cache-aside leaves
/// are bounded by the loads in flight when writes stop, and a load is stale only
/// if its row is written during its delay; so the race gets more readers and a
/// longer delay than by default, which keeps a zero out of reach even for an
/// unoptimised binary on a busy machine.
pub(crate) const SMALL: &[&str] = &[
    "--readers",
    "16",
    "--hot-rows",
    "32",
    "--race-ms",
    "400",
    "--max-delay-ms",
    "50",
    "--callers",
    "200",
    "--load-ms",
    "20",
    "--lookups",
    "2000",
    "--missing-ids",
    "50",
    "--keys",
    "1000",
    "--ops",
    "10000",
    "--avalanche-keys",
    "300",
    "--avalanche-ttl-ms",
    "300",
    "--avalanche-ms",
    "700",
    "--vanish-keys",
    "300",
    "--vanish-ms",
    "400",
    "--tenants",
    "4",
    "--keys-per-tenant",
    "100",
    // The second delete of the race's double-delete row, far past the slowest
    // reader (see `race`), and the double-delete scenario's, short.
    "--second-delete-ms",
    "300",
    "--double-delete-keys",
    "50",
    "--double-delete-delay-ms",
    "300",
    "--near-keys",
    "100",
    "--near-ms",
    "800",
    "--near-read-rate",
    "2000",
    "--near-write-rate",
    "100",
    // Wide, so that a busy machine's slow notices cannot pass for staleness.
    "--near-bus-window-ms",
    "250",
    "--outage-keys",
    "200",
    "--outage-ms",
    "2000",
    "--outage-down-ms",
    "700",
    "--outage-read-rate",
    "1000",
    "--outage-write-rate",
    "100",
    "--wb-writes",
    "1000",
    "--wb-keys",
    "100",
    "--wb-writers",
    "16",
    "--wb-batch",
    "50",
    "--audit-reads",
    "20000",
    "--audit-bounds-ms",
    "300,1000",
    "--audit-max-ms",
    "2000",
    "--ra-ms",
    "1200",
    "--fs-ms",
    "1000",
    "--fs-down-ms",
    "400",
    "--wtr-keys",
    "100",
    "--chaos-ms",
    "3000",
];

/// The variables `cachet` reads flags from: unset in every test run unless a
/// test sets them, so that the test machine's environment (a `DATABASE_URL`
/// for the test databases, say) never changes what a run does.
pub(crate) const FLAG_VARIABLES: &[&str] = &[
    "CACHET_REDIS_URL",
    "CACHET_REDIS_CLUSTER",
    "CACHET_REDIS_SENTINEL",
    "CACHET_SENTINEL_MASTER",
    "CACHET_SENTINEL_DB",
    "CACHET_SENTINEL_NODE_USER",
    "CACHET_SENTINEL_NODE_PASSWORD",
    "CACHET_REDIS_CA",
    "CACHET_REDIS_CERT",
    "CACHET_REDIS_KEY",
    "DATABASE_URL",
];

/// A `cachet` command line under construction.
#[derive(Debug)]
pub(crate) struct Cachet {
    cmd: Command,
}

impl Cachet {
    /// `cachet lab`.
    pub(crate) fn lab() -> Self {
        Self::command("lab")
    }

    /// `cachet <subcommand>`.
    pub(crate) fn command(subcommand: &str) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachet"));
        cmd.arg(subcommand).env_remove("RUST_LOG");
        for name in FLAG_VARIABLES {
            cmd.env_remove(name);
        }
        Self { cmd }
    }

    /// Sets a variable of its environment.
    pub(crate) fn env(mut self, name: &str, value: &str) -> Self {
        self.cmd.env(name, value);
        self
    }

    /// The command, to run some other way.
    pub(crate) fn into_command(self) -> Command {
        self.cmd
    }

    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// Runs the command to completion (killing it after [`TIMEOUT`]).
    pub(crate) fn output(mut self) -> Output {
        let shown = format!("{:?}", self.cmd);
        let mut child = self
            .cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
        // Drain the pipes on threads so a chatty child never blocks on a full pipe.
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{shown} did not finish within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }

    /// Runs with `--json`, expects success, and parses each stdout line.
    pub(crate) fn rows(self) -> Rows {
        let output = self.args(["--json"]).output();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "cachet failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        );
        let rows = stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line:?}"))
            })
            .collect();
        Rows {
            rows,
            stderr: stderr.into_owned(),
        }
    }

    /// Runs, expects success, and returns stdout.
    pub(crate) fn stdout(self) -> String {
        let output = self.output();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "cachet failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        );
        assert!(!stderr.contains("panicked"), "cachet panicked:\n{stderr}");
        stdout
    }

    /// Runs with `--json`, expects success, and parses each stdout line.
    pub(crate) fn json(self) -> Vec<Value> {
        self.args(["--json"])
            .stdout()
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line:?}"))
            })
            .collect()
    }

    /// Runs and expects failure without a panic; returns stderr.
    pub(crate) fn failure(self) -> String {
        let output = self.output();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            !output.status.success(),
            "cachet succeeded but should have failed; stderr:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "cachet panicked:\n{stderr}");
        stderr
    }
}

/// The JSON rows of one run.
#[derive(Debug)]
pub(crate) struct Rows {
    pub(crate) rows: Vec<Value>,
    pub(crate) stderr: String,
}

impl Rows {
    /// The row of `scenario` whose strategy's slug is `slug` (its stable
    /// name; the strategy text may change).
    pub(crate) fn find(&self, scenario: &str, slug: &str) -> &Value {
        self.rows
            .iter()
            .find(|r| r["scenario"] == scenario && r["slug"] == slug)
            .unwrap_or_else(|| panic!("no {scenario} row with slug {slug:?} in {:#?}", self.rows))
    }

    /// An unsigned field of the row of `scenario` whose slug is `slug`.
    pub(crate) fn u64(&self, scenario: &str, slug: &str, field: &str) -> u64 {
        let row = self.find(scenario, slug);
        row[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} of {row} is not a count"))
    }

    /// The properties every full run must show, whatever the backends.
    pub(crate) fn assert_lab_properties(&self, lookups: u64, missing_ids: u64) {
        let scenarios: Vec<&str> = self
            .rows
            .iter()
            .map(|r| r["scenario"].as_str().unwrap())
            .collect();
        // The scenarios checked here, in their order; other scenarios and rows
        // (penetration's random-ID rows) have tests of their own.
        let mut order = scenarios.clone();
        order.dedup();
        order.retain(|s| ["race", "stampede", "penetration", "hit-rate"].contains(s));
        assert_eq!(
            order,
            ["race", "stampede", "penetration", "hit-rate"],
            "stderr:\n{}",
            self.stderr
        );
        for row in &self.rows {
            // Without a breaker, reads during a Redis outage may fail (reported,
            // not required); without fail-safe, reads during a source outage do;
            // naive cache-aside passes store errors to its callers (chaos), and
            // write-behind cannot queue a write while Redis is away (chaos).
            let scenario = row["scenario"].as_str().unwrap();
            let naive =
                ["outage", "fail-safe", "chaos"].contains(&scenario) && row["slug"] == "naive";
            let queue_away = scenario == "chaos" && row["slug"] == "write-behind";
            if !(naive || queue_away) {
                assert_eq!(row["errors"], 0, "errors in {row}");
            }
            for field in [
                "scenario",
                "strategy",
                "requests",
                "db_queries",
                "stale_entries",
                "errors",
                "p50_us",
                "p99_us",
                "hit_rate",
                "db_queries_saved",
                "loads",
            ] {
                assert!(row.get(field).is_some(), "{field} missing from {row}");
            }
        }

        assert!(
            self.u64("race", "naive", "stale_entries") > 0,
            "naive cache-aside left no stale entry: {:#?}",
            self.rows
        );
        assert_eq!(self.u64("race", "lease", "stale_entries"), 0);

        let protected = self.u64("stampede", "single-flight", "db_queries");
        let naive = self.u64("stampede", "naive", "db_queries");
        assert_eq!(protected, 1);
        assert!(
            naive >= 50 * protected,
            "stampede: naive sent only {naive} queries"
        );

        assert_eq!(self.u64("penetration", "naive", "db_queries"), lookups);
        let negative = self.u64("penetration", "negative", "db_queries");
        assert!(
            (1..=missing_ids).contains(&negative),
            "negative caching sent {negative} queries for {missing_ids} missing IDs"
        );

        let cached = self.find("hit-rate", "lease");
        let hit_rate = cached["hit_rate"].as_f64().unwrap();
        assert!(hit_rate > 0.5, "hit rate {hit_rate}");
        assert!(self.u64("hit-rate", "lease", "db_queries_saved") > 0);
        assert!(
            self.u64("hit-rate", "lease", "db_queries")
                < self.u64("hit-rate", "naive", "db_queries")
        );
    }
}
