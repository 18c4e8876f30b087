//! A throwaway `redis-server` for one test.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::TestPki;

/// Options for [`RedisServer::start_with`].
#[derive(Clone, Debug, Default)]
pub struct RedisServerOptions {
    /// Turn on the append-only file (`appendonly yes`, `appendfsync always`).
    pub append_only: bool,
    /// Extra `--name value` arguments for `redis-server`.
    pub extra_args: Vec<(String, String)>,
}

/// Whether a TLS server asks clients for a certificate (`tls-auth-clients`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client may present a certificate; one it presents must verify.
    Optional,
    /// A client without a valid certificate is refused (mutual TLS).
    Required,
}

/// The TLS side of a server: its files and its TLS port.
#[derive(Clone, Debug)]
struct TlsSetup {
    cert_file: PathBuf,
    key_file: PathBuf,
    ca_file: PathBuf,
    auth: ClientAuth,
    port: u16,
}

/// A `redis-server` process on a free loopback port with its own temporary
/// directory, started with `--save ""` and, unless asked, `--appendonly no`.
/// A TLS server ([`start_tls`](Self::start_tls)) listens on a second port for
/// TLS, and keeps the plain one for [`command`](Self::command).
///
/// Dropping it kills and reaps the process. If the thread is panicking at that
/// point (a failed assertion), the server's log is printed to stderr.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    options: RedisServerOptions,
    tls: Option<TlsSetup>,
}

impl RedisServer {
    /// How long to wait for a new server to answer `PING`.
    const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

    /// Starts a server with default options.
    ///
    /// # Panics
    /// If `redis-server` is not on `PATH` or does not answer within 10 seconds.
    pub fn start() -> Self {
        Self::start_with(RedisServerOptions::default())
    }

    /// Starts a server with the given options.
    ///
    /// # Panics
    /// If `redis-server` is not on `PATH` or does not answer within 10 seconds.
    pub fn start_with(options: RedisServerOptions) -> Self {
        Self::start_inner(options, None)
    }

    /// Starts a server that also speaks TLS on a port of its own, with the
    /// server certificate of `pki`, trusting its CA for client certificates.
    ///
    /// # Panics
    /// If `redis-server` (built with TLS) is not on `PATH` or does not answer
    /// within 10 seconds.
    pub fn start_tls(pki: &TestPki, auth: ClientAuth) -> Self {
        Self::start_tls_with(RedisServerOptions::default(), pki, auth)
    }

    /// [`start_tls`](Self::start_tls) with the given options.
    ///
    /// # Panics
    /// As [`start_tls`](Self::start_tls).
    pub fn start_tls_with(options: RedisServerOptions, pki: &TestPki, auth: ClientAuth) -> Self {
        let tls = TlsSetup {
            cert_file: pki.server.cert_file.clone(),
            key_file: pki.server.key_file.clone(),
            ca_file: pki.ca_file.clone(),
            auth,
            port: 0,
        };
        Self::start_inner(options, Some(tls))
    }

    fn start_inner(options: RedisServerOptions, tls: Option<TlsSetup>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cachet-redis-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            options,
            tls,
        };
        // A port chosen by the OS can be taken by someone else before the server
        // binds it; try a few.
        let mut last_log = String::new();
        for _ in 0..5 {
            server.port = free_port();
            if let Some(tls) = &mut server.tls {
                tls.port = free_port();
            }
            match server.spawn() {
                Ok(()) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("redis-server did not start after 5 attempts; last log:\n{last_log}");
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// A `redis://` URL for the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's TLS port on 127.0.0.1.
    ///
    /// # Panics
    /// If the server was not started with TLS.
    pub fn tls_port(&self) -> u16 {
        self.tls.as_ref().expect("a server started with TLS").port
    }

    /// A `rediss://127.0.0.1:P/` URL for the server's TLS port.
    ///
    /// # Panics
    /// If the server was not started with TLS.
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_port())
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the server (SIGKILL) and reaps it. It can be started again on the
    /// same port with [`RedisServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory after [`kill`](Self::kill).
    ///
    /// # Panics
    /// If it does not answer within 10 seconds.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.spawn() {
            panic!("redis-server did not restart on port {}:\n{log}", self.port);
        }
    }

    /// Stops the server (`SIGSTOP`): its connections stay open and it answers
    /// nothing, however long, until [`resume`](Self::resume).
    ///
    /// # Panics
    /// If the server is not running or the signal cannot be sent.
    pub fn pause(&self) {
        crate::child::signal(self.pid(), "STOP");
    }

    /// Lets a server stopped by [`pause`](Self::pause) run again (`SIGCONT`).
    ///
    /// # Panics
    /// If the server is not running or the signal cannot be sent.
    pub fn resume(&self) {
        crate::child::signal(self.pid(), "CONT");
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running redis-server").id()
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends one command and returns the raw reply as text, for test assertions
    /// that must not depend on the client under test. Arrays come back one
    /// element per line.
    ///
    /// # Panics
    /// If the server cannot be reached.
    pub fn command(&self, args: &[&str]) -> String {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.command_bytes(&args)
    }

    /// [`command`](Self::command) with binary arguments.
    ///
    /// # Panics
    /// If the server cannot be reached.
    pub fn command_bytes(&self, args: &[&[u8]]) -> String {
        command_at(self.port, args)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawns the process and waits until it answers; on failure returns its log.
    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--daemonize")
            .arg("no");
        if self.options.append_only {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(tls) = &self.tls {
            cmd.arg("--tls-port")
                .arg(tls.port.to_string())
                .arg("--tls-cert-file")
                .arg(&tls.cert_file)
                .arg("--tls-key-file")
                .arg(&tls.key_file)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca_file)
                .arg("--tls-auth-clients")
                .arg(match tls.auth {
                    ClientAuth::Optional => "optional",
                    ClientAuth::Required => "yes",
                });
        }
        for (name, value) in &self.options.extra_args {
            cmd.arg(format!("--{name}")).arg(value);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run redis-server (is it installed?): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Self::STARTUP_TIMEOUT;
        let mut backoff = Duration::from_millis(5);
        while Instant::now() < deadline {
            if !self.is_running() {
                break;
            }
            if ping(self.addr()) {
                return Ok(());
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
        let mut stderr = String::new();
        if let Some(child) = &mut self.child
            && let Some(mut e) = child.stderr.take()
        {
            let _ = child.kill();
            let _ = e.read_to_string(&mut stderr);
        }
        self.kill();
        Err(format!("{}{stderr}", self.log()))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server on port {} log ----\n{}---- end of log ----",
                self.port,
                self.log()
            );
        }
    }
}

/// Sends one command to the server on 127.0.0.1:`port` and returns the raw
/// reply as text (see [`RedisServer::command`]).
pub(crate) fn command_at(port: u16, args: &[&[u8]]) -> String {
    try_command_at(port, args).expect("send a command to a test redis-server")
}

/// [`command_at`], or `None` when the server cannot be reached.
pub(crate) fn try_command_at(port: u16, args: &[&[u8]]) -> Option<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    stream.write_all(&req).ok()?;
    Some(read_reply(&mut stream))
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

pub(crate) fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Reads one RESP reply and renders it as text: simple strings, errors and
/// integers as they are, bulk strings as their content, arrays one element per line.
fn read_reply(stream: &mut TcpStream) -> String {
    let mut reader = std::io::BufReader::new(stream);
    let mut out = String::new();
    read_value(&mut reader, &mut out);
    out
}

fn read_value(r: &mut impl std::io::BufRead, out: &mut String) {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (tag, rest) = line.split_at(1);
    match tag {
        "+" | "-" | ":" => out.push_str(rest),
        "$" => {
            let len: i64 = rest.parse().unwrap_or(-1);
            if len >= 0 {
                let mut buf = vec![0; usize::try_from(len).unwrap_or(0) + 2];
                let _ = r.read_exact(&mut buf);
                buf.truncate(buf.len() - 2);
                out.push_str(&String::from_utf8_lossy(&buf));
            }
        }
        "*" => {
            let n: i64 = rest.parse().unwrap_or(0);
            for i in 0..n {
                if i > 0 {
                    out.push('\n');
                }
                read_value(r, out);
            }
        }
        _ => out.push_str(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_restarts() {
        let mut server = RedisServer::start();
        assert_eq!(server.command(&["PING"]), "PONG");
        assert_eq!(server.command(&["SET", "a", "b"]), "OK");
        assert_eq!(server.command(&["GET", "a"]), "b");
        assert_eq!(
            server.command(&["CONFIG", "GET", "appendonly"]),
            "appendonly\nno"
        );
        server.kill();
        assert!(!ping(server.addr()));
        server.restart();
        assert_eq!(server.command(&["PING"]), "PONG");
        // Nothing is persisted across restarts.
        assert_eq!(server.command(&["EXISTS", "a"]), "0");
    }

    #[test]
    fn two_servers_are_isolated() {
        let a = RedisServer::start();
        let b = RedisServer::start();
        assert_ne!(a.port(), b.port());
        a.command(&["SET", "k", "1"]);
        assert_eq!(b.command(&["EXISTS", "k"]), "0");
    }
}
