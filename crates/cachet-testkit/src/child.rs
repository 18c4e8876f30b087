//! Child processes to kill: the running test binary started again on one of its
//! ignored tests (the child's entry point), with its role and arguments in one
//! environment variable.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable that carries a child's role and arguments, as
/// `;`-separated `name=value` pairs.
const CHILD_ENV: &str = "CACHET_TEST_CHILD";
/// The longest [`TestChild::wait_for`] waits.
const WAIT: Duration = Duration::from_secs(30);

/// Sends signal `name` (`STOP`, `CONT`, …) to process `pid`.
///
/// # Panics
/// If the signal cannot be sent.
pub(crate) fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// The role and arguments given to this process by [`TestChild::spawn`], or
/// `None` when it is not such a child (a normal test run of the entry point).
pub fn child_args() -> Option<HashMap<String, String>> {
    let spec = std::env::var(CHILD_ENV).ok()?;
    Some(
        spec.split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// A child process running one ignored test of this test binary; killed and
/// reaped on drop.
#[derive(Debug)]
pub struct TestChild {
    child: Child,
    lines: mpsc::Receiver<String>,
    role: String,
}

impl TestChild {
    /// Runs the ignored test `entry` of this binary as a child whose
    /// [`child_args`] are `role=<role>` and `args`; its stdout is read line by
    /// line, its stderr inherited.
    ///
    /// # Panics
    /// When a value contains `;`, or the process cannot start.
    pub fn spawn(entry: &str, role: &str, args: &[(&str, &str)]) -> Self {
        let mut spec = format!("role={role}");
        for (name, value) in args {
            assert!(!value.contains(';'), "{value}");
            spec.push_str(&format!(";{name}={value}"));
        }
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", entry, "--nocapture", "--ignored"])
            .env(CHILD_ENV, spec)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            role: role.to_owned(),
        }
    }

    /// Waits (at most 30 s) for the child to print the line `marker`.
    ///
    /// # Panics
    /// When it does not, with what it printed.
    pub fn wait_for(&mut self, marker: &str) {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line == marker => return,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        let status = self.child.try_wait();
        panic!(
            "the {} child never printed {marker:?} (status {status:?}); its output:\n{}",
            self.role,
            seen.join("\n")
        );
    }

    /// SIGKILL, and reap.
    ///
    /// # Panics
    /// When the child had already ended by itself.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            !status.success(),
            "the {} child was killed: {status}",
            self.role
        );
    }
}

impl Drop for TestChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 10 ms until it holds.
///
/// # Panics
/// After `limit`, naming `what`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let step = Duration::from_millis(10);
    let max_rounds = limit.as_millis() / step.as_millis() + 2;
    for _ in 0..max_rounds {
        if check().await {
            return;
        }
        if start.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(step).await;
    }
    panic!("{what}: not after {limit:?}");
}
