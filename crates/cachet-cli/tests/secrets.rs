//! No password in what `cachet` prints, logs, or puts on a command line.

use std::io::Read as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cachet_testkit::RedisServer;

use crate::util::Cachet;

const PASSWORD: &str = "KNOWN_SECRET_PW";

/// A server that requires `PASSWORD`, and a URL with it.
fn protected_server() -> (RedisServer, String) {
    let server = RedisServer::start();
    assert_eq!(
        server.command(&["CONFIG", "SET", "requirepass", PASSWORD]),
        "OK"
    );
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/", server.port());
    (server, url)
}

/// The command line of process `pid`, its arguments joined by spaces.
fn command_line(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&cmdline).replace('\0', " "))
}

/// The command lines of the running children of `parent`.
fn children_command_lines(parent: u32) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces, so split after it.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let pid = path.file_name().and_then(|n| n.to_str()?.parse().ok());
        if let Some(cmdline) = pid.and_then(command_line) {
            out.push(cmdline);
        }
    }
    out
}

#[test]
fn no_password_in_child_command_lines_output_or_logs() {
    let (_server, url) = protected_server();
    let mut cmd = Cachet::lab()
        .args([
            "--scenario",
            "stampede",
            "--callers",
            "40",
            "--load-ms",
            "400",
        ])
        .args(["--redis-url", &url])
        .env("RUST_LOG", "trace")
        .into_command();
    let mut lab = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let stdout = drain(Box::new(lab.stdout.take().unwrap()));
    let stderr = drain(Box::new(lab.stderr.take().unwrap()));

    // Watch the lab's child processes while it runs. Between fork and exec a
    // child still shows its parent's command line, which holds the URL this
    // test passed: only what a child was started with counts.
    let own: String = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| format!("{} ", arg.to_string_lossy()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut children_seen = 0;
    let status = loop {
        for cmdline in children_command_lines(lab.id()) {
            if cmdline == own {
                continue;
            }
            if cmdline.contains("__child") {
                children_seen += 1;
            }
            assert!(
                !cmdline.contains(PASSWORD),
                "a child's command line shows the password: {cmdline}"
            );
        }
        if let Some(status) = lab.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = lab.kill();
            let _ = lab.wait();
            panic!("the lab did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(
        status.success(),
        "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        children_seen > 0,
        "never saw a child process of the lab\nstdout:\n{stdout}"
    );
    // The children ran: the row of the processes is there.
    assert!(stdout.contains("4 processes"), "{stdout}");
    // Trace logging is on, so this covers every log line of the libraries too.
    assert!(stderr.lines().count() > 10, "no trace output? {stderr}");
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(
            !text.contains(PASSWORD),
            "{name} shows the password:\n{text}"
        );
    }
}

#[test]
fn a_wrong_password_is_not_repeated_in_the_error() {
    let (server, _) = protected_server();
    let wrong = "WRONG_SECRET_GUESS";
    let url = format!("redis://:{wrong}@127.0.0.1:{}/", server.port());
    for command in ["stats", "lab"] {
        let mut cachet = Cachet::command(command).env("RUST_LOG", "trace");
        if command == "lab" {
            cachet = cachet.args(["--scenario", "stampede"]);
        }
        let output = cachet.args(["--redis-url", &url]).output();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command}: {stdout}\n{stderr}");
        assert!(stderr.contains("cannot connect"), "{command}: {stderr}");
        assert!(!stdout.contains(wrong), "{command}: {stdout}");
        assert!(!stderr.contains(wrong), "{command}: {stderr}");
    }
}

#[test]
fn urls_come_from_the_environment_and_help_never_shows_them() {
    let (_server, url) = protected_server();
    // `stats` connects with the URL of CACHET_REDIS_URL alone.
    let stdout = Cachet::command("stats")
        .env("CACHET_REDIS_URL", &url)
        .stdout();
    assert!(!stdout.contains(PASSWORD), "{stdout}");
    assert!(stdout.contains("maxmemory"), "{stdout}");

    let pg = format!("postgres://u:{PASSWORD}@127.0.0.1:1/db");
    for command in ["lab", "stats", "inspect"] {
        let help = Cachet::command(command)
            .env("CACHET_REDIS_URL", &url)
            .env("CACHET_REDIS_CLUSTER", &url)
            .env("DATABASE_URL", &pg)
            .args(["--help"])
            .stdout();
        assert!(!help.contains(PASSWORD), "{command} --help:\n{help}");
        assert!(
            help.contains("CACHET_REDIS_URL"),
            "{command} --help:\n{help}"
        );
        assert!(help.contains("--redis-ca"), "{command} --help:\n{help}");
    }
}
