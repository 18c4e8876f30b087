//! A sentinel whose answers the test decides: the primary it names, and the
//! failover announcements it publishes, whatever happened.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Speaks enough of the Sentinel protocol for a client to find a primary and
/// follow failover announcements: `PING`, `ROLE`, `SENTINEL MASTERS`, `SENTINEL
/// GET-MASTER-ADDR-BY-NAME`, `SUBSCRIBE` (and `PING` while subscribed); other
/// `CLIENT` commands are acknowledged, anything else is an error. It names
/// the primary it is told to ([`name_primary`](Self::name_primary)), as a
/// sentinel that has not heard of a failover yet would, and publishes
/// `+switch-master` only when told to ([`announce`](Self::announce)).
///
/// One thread per connection, on a free loopback port; all stop when it is
/// dropped.
#[derive(Debug)]
pub struct ScriptedSentinel {
    port: u16,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    master: String,
    /// The port (on 127.0.0.1) of the primary it names.
    primary: AtomicU16,
    /// The connections subscribed to `+switch-master`.
    subscribers: Mutex<Vec<TcpStream>>,
    stopped: AtomicBool,
}

impl ScriptedSentinel {
    /// A sentinel naming `127.0.0.1:primary` as the primary of `master`.
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub fn start(master: &str, primary: u16) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let port = listener.local_addr().expect("the bound address").port();
        let shared = Arc::new(Shared {
            master: master.to_owned(),
            primary: AtomicU16::new(primary),
            ..Shared::default()
        });
        let accepting = Arc::clone(&shared);
        std::thread::spawn(move || {
            while !accepting.stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let serving = Arc::clone(&accepting);
                        std::thread::spawn(move || serve(&serving, stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { port, shared }
    }

    /// Its `redis://127.0.0.1:P/` URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Names `127.0.0.1:primary` as the primary from now on.
    pub fn name_primary(&self, primary: u16) {
        self.shared.primary.store(primary, Ordering::Relaxed);
    }

    /// How many connections are subscribed to its announcements.
    pub fn subscribers(&self) -> usize {
        self.shared.subscribers.lock().unwrap().len()
    }

    /// Publishes `+switch-master <master> 127.0.0.1 <from> 127.0.0.1 <to>` to
    /// every subscriber; how many there were.
    pub fn announce(&self, from: u16, to: u16) -> usize {
        let payload = format!("{} 127.0.0.1 {from} 127.0.0.1 {to}", self.shared.master);
        let message = array(&["message", "+switch-master", &payload]);
        let mut subscribers = self.shared.subscribers.lock().unwrap();
        subscribers.retain_mut(|s| s.write_all(message.as_bytes()).is_ok());
        subscribers.len()
    }
}

impl Drop for ScriptedSentinel {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        for s in self.shared.subscribers.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Answers one connection's commands until it closes or the sentinel stops.
fn serve(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut subscribed = false;
    while !shared.stopped.load(Ordering::Relaxed) {
        let command = match read_command(&mut reader) {
            Ok(Some(command)) => command,
            Ok(None) => return,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        };
        let words: Vec<String> = command.iter().map(|w| w.to_ascii_uppercase()).collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let primary = shared.primary.load(Ordering::Relaxed).to_string();
        let reply = match words.as_slice() {
            ["PING", ..] if subscribed => array(&["pong", ""]),
            ["PING", ..] => "+PONG\r\n".to_owned(),
            ["SENTINEL", "MASTERS"] => format!(
                "*1\r\n{}",
                array(&[
                    "name",
                    &shared.master,
                    "ip",
                    "127.0.0.1",
                    "port",
                    &primary,
                    "flags",
                    "master",
                ])
            ),
            ["SENTINEL", "GET-MASTER-ADDR-BY-NAME", _] => array(&["127.0.0.1", &primary]),
            ["SUBSCRIBE", ..] => {
                let channel = command.get(1).map_or("", String::as_str);
                if let Ok(s) = out.try_clone() {
                    shared.subscribers.lock().unwrap().push(s);
                }
                subscribed = true;
                format!("*3\r\n$9\r\nsubscribe\r\n{}:1\r\n", bulk(channel))
            }
            ["ROLE"] => format!("*2\r\n{}{}", bulk("sentinel"), array(&[&shared.master])),
            ["CLIENT", ..] => "+OK\r\n".to_owned(),
            _ => format!("-ERR unknown command '{}'\r\n", command.join(" ")),
        };
        // A subscriber's writes come from `announce` too: one at a time.
        let _guard = subscribed.then(|| shared.subscribers.lock().unwrap());
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// One command (an array of bulk strings); `None` at the end of the stream.
fn read_command(r: &mut impl BufRead) -> std::io::Result<Option<Vec<String>>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let Some(n) = line.trim_end().strip_prefix('*') else {
        return Ok(Some(line.split_whitespace().map(str::to_owned).collect()));
    };
    let n: usize = n.parse().unwrap_or(0);
    let mut words = Vec::with_capacity(n);
    for _ in 0..n {
        let mut header = String::new();
        r.read_line(&mut header)?;
        let len: usize = header
            .trim_end()
            .trim_start_matches('$')
            .parse()
            .unwrap_or(0);
        let mut buf = vec![0; len + 2];
        r.read_exact(&mut buf)?;
        buf.truncate(len);
        words.push(String::from_utf8_lossy(&buf).into_owned());
    }
    Ok(Some(words))
}

fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

fn array(items: &[&str]) -> String {
    let mut out = format!("*{}\r\n", items.len());
    for item in items {
        out.push_str(&bulk(item));
    }
    out
}
