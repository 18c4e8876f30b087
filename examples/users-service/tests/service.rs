//! Starts the service, drives reads from several threads and writes from
//! another over HTTP, and checks with `--cache cachet` that every read made
//! after a write settled agrees with the database, and that the database saw
//! fewer queries than the service answered requests.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

/// Users seeded.
const USERS: u64 = 2_000;
/// The keys written, which readers read most.
const HOT: u64 = 10;
/// Reader threads.
const READERS: u64 = 4;
/// Requests per reader: at least, and at most.
const MIN_READS: u64 = 800;
const MAX_READS: u64 = 20_000;
/// Writes (one thread).
const WRITES: u64 = 60;
/// How long after a write completes a read must see it.
const SETTLE: Duration = Duration::from_millis(200);
/// No run may take longer than this.
const DEADLINE: Duration = Duration::from_secs(120);

/// The service, in a child process, stopped with SIGTERM on drop.
struct Service {
    child: Child,
    base: String,
}

impl Service {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_users-service"))
            .args(["--listen", "127.0.0.1:0", "--users", &USERS.to_string()])
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("CACHET_REDIS_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the service starts");
        let mut line = String::new();
        // Returns at the first line, or at EOF if the service exits first.
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("users-service listening on ")
            .unwrap_or_else(|| panic!("expected the bound address on stdout, got {line:?}"))
            .to_owned();
        Self {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// SIGTERM, then the exit status (at most 20 s later).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// An HTTP client that returns every status as a response, and counts requests.
#[derive(Clone)]
struct Client {
    agent: ureq::Agent,
    base: String,
    requests: Arc<AtomicU64>,
}

impl Client {
    fn new(base: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Self {
            agent,
            base: base.to_owned(),
            requests: Arc::default(),
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut response = self
            .agent
            .get(format!("{}{path}", self.base).as_str())
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get(path);
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        (status, json)
    }

    fn send(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}{path}", self.base);
        let request = match method {
            "PUT" => self.agent.put(url.as_str()),
            _ => self.agent.post(url.as_str()),
        };
        let mut response = request
            .header("content-type", "application/json")
            .send(body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&body).unwrap())
    }

    fn email(&self, id: u64) -> String {
        let (status, user) = self.get_json(&format!("/users/{id}"));
        assert_eq!(status, 200, "user {id}: {user}");
        user["email"].as_str().unwrap().to_owned()
    }
}

/// The database, read directly: the source of truth the reads are checked against.
enum Truth {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Truth {
    fn email(&self, rt: &tokio::runtime::Runtime, id: u64) -> String {
        let id = i64::try_from(id).unwrap();
        rt.block_on(async {
            match self {
                Self::Sqlite(pool) => {
                    sqlx::query_scalar("SELECT email FROM users WHERE id = ?")
                        .bind(id)
                        .fetch_one(pool)
                        .await
                }
                Self::Postgres(pool) => {
                    sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
                        .bind(id)
                        .fetch_one(pool)
                        .await
                }
            }
        })
        .unwrap()
    }
}

/// What a run found.
#[derive(Debug, Default)]
struct Outcome {
    checks: u64,
    stale: Vec<String>,
}

/// Readers on a skewed key mix with a few batch reads, one writer on the hot
/// keys that checks each write `SETTLE` after it (through the service,
/// against the database) unless the key was written again meanwhile.
fn drive(client: &Client, truth: &Truth, rt: &tokio::runtime::Runtime) -> Outcome {
    let started = Instant::now();
    let writer_done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let client = client.clone();
            let writer_done = Arc::clone(&writer_done);
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(r);
                for i in 0..MAX_READS {
                    if (i >= MIN_READS && writer_done.load(Ordering::Relaxed))
                        || started.elapsed() > DEADLINE
                    {
                        break;
                    }
                    let pick = rng.random_range(0..100);
                    let id = match pick {
                        0..70 => rng.random_range(1..=HOT),
                        70..95 => rng.random_range(1..=USERS),
                        _ => rng.random_range(USERS + 1..=USERS + 50),
                    };
                    if i % 50 == 0 {
                        let ids = [id, 1, USERS + 7, 2];
                        let list = ids.map(|id| id.to_string()).join(",");
                        let (status, users) = client.get_json(&format!("/users?ids={list}"));
                        assert_eq!(status, 200, "{users}");
                        let users = users.as_array().unwrap();
                        assert_eq!(users.len(), ids.len());
                        for (want, got) in ids.iter().zip(users) {
                            if *want > USERS {
                                assert!(got.is_null(), "{got}");
                            } else {
                                assert_eq!(got["id"], *want, "{got}");
                            }
                        }
                        continue;
                    }
                    let (status, body) = client.get(&format!("/users/{id}"));
                    let expected = if id <= USERS { 200 } else { 404 };
                    assert_eq!(status, expected, "user {id}: {body}");
                }
            })
        })
        .collect();

    let mut outcome = Outcome::default();
    // (key, write number, when it completed)
    let mut pending: Vec<(u64, u64, Instant)> = Vec::new();
    let mut last_write = [0_u64; HOT as usize + 1];
    let mut check = |pending: &mut Vec<(u64, u64, Instant)>, last_write: &[u64], all: bool| {
        pending.retain(|&(id, n, at)| {
            if last_write[id as usize] != n {
                return false; // written again since: that write is checked instead
            }
            if !all && at.elapsed() < SETTLE {
                return true;
            }
            let served = client.email(id);
            let stored = truth.email(rt, id);
            outcome.checks += 1;
            if served != stored {
                outcome
                    .stale
                    .push(format!("user {id}: served {served}, database {stored}"));
            }
            false
        });
    };
    for n in 1..=WRITES {
        let id = 1 + (n * 7) % HOT;
        let email = format!("u{id}-w{n}@example.com");
        let (status, user) = client.send(
            "PUT",
            &format!("/users/{id}/email"),
            &format!(r#"{{"email": "{email}"}}"#),
        );
        assert_eq!(status, 200, "{user}");
        assert_eq!(user["email"], email.as_str());
        last_write[id as usize] = n;
        pending.push((id, n, Instant::now()));
        check(&mut pending, &last_write, false);
        thread::sleep(Duration::from_millis(15));
    }
    thread::sleep(SETTLE);
    check(&mut pending, &last_write, true);
    writer_done.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.join().expect("a reader failed");
    }
    assert!(started.elapsed() < DEADLINE, "the run took too long");

    // After the run, every hot key and a sample of others, once more.
    for id in (1..=HOT).chain((HOT + 1..=USERS).step_by(97)) {
        let (served, stored) = (client.email(id), truth.email(rt, id));
        outcome.checks += 1;
        if served != stored {
            outcome.stale.push(format!(
                "user {id} at the end: served {served}, database {stored}"
            ));
        }
    }
    outcome
}

/// The endpoints' answers outside the load: 404s, 400s, batch order, groups, metrics.
fn check_endpoints(client: &Client) {
    assert_eq!(client.get("/users/0").0, 404);
    assert_eq!(client.get(&format!("/users/{}", USERS + 1)).0, 404);
    assert_eq!(client.get("/users/x").0, 400);
    let (status, users) = client.get_json(&format!("/users?ids=3,{},1,3", USERS + 1));
    assert_eq!(status, 200);
    let ids: Vec<Value> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].clone())
        .collect();
    assert_eq!(ids, [3.into(), Value::Null, 1.into(), 3.into()]);
    assert_eq!(client.get_json("/users?ids=").1, Value::Array(vec![]));
    assert_eq!(
        client
            .send(
                "PUT",
                &format!("/users/{}/email", USERS + 1),
                r#"{"email": "a@b"}"#
            )
            .0,
        404
    );
    assert_eq!(
        client.send("PUT", "/users/1/email", r#"{"mail": 1}"#).0,
        400
    );

    // A tenant's invalidation drops its users' entries: they load again.
    let tenant_user = 16 * 3 + 5; // tenant 5
    client.email(tenant_user);
    let before = stats(client)["db_reads"].as_u64().unwrap();
    client.email(tenant_user);
    assert_eq!(stats(client)["db_reads"], before, "a hit");
    let (status, answer) = client.send("POST", "/tenants/5/invalidate", "");
    assert_eq!(status, 200, "{answer}");
    client.email(tenant_user);
    assert_eq!(stats(client)["db_reads"], before + 1, "loaded again");
    assert_eq!(client.send("POST", "/tenants/16/invalidate", "").0, 404);

    let (status, metrics) = client.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("cachet_hits_total"), "{metrics}");
}

fn stats(client: &Client) -> Value {
    let (status, stats) = client.get_json("/stats");
    assert_eq!(status, 200);
    stats
}

/// The checks shared by both databases (the service keeps running); returns
/// the final stats.
fn exercise(service: &Service, truth: &Truth, rt: &tokio::runtime::Runtime) -> Value {
    let client = Client::new(&service.base);
    check_endpoints(&client);
    let outcome = drive(&client, truth, rt);
    let stats = stats(&client);
    let requests = client.requests.load(Ordering::Relaxed);
    let queries = stats["db_queries"].as_u64().unwrap();
    println!(
        "{requests} requests, {queries} database queries, {} checks; stats {stats}",
        outcome.checks
    );
    assert_eq!(stats["mode"], "cachet");
    assert!(outcome.checks >= HOT, "{outcome:?}");
    assert!(
        outcome.stale.is_empty(),
        "reads disagreeing with the database after their write settled: {:?}",
        outcome.stale
    );
    assert!(
        queries < requests,
        "{queries} database queries for {requests} requests"
    );
    stats
}

fn stop(service: &mut Service) {
    let status = service.stop().expect("the service stops on SIGTERM");
    assert!(status.success(), "{status}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn cachet_serves_no_stale_reads_on_sqlite() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.db");
    let path = path.to_str().unwrap();
    let mut service = Service::start(&[
        "--cache",
        "cachet",
        "--sqlite",
        path,
        "--db-latency-ms",
        "2",
    ]);
    let truth = Truth::Sqlite(rt.block_on(SqlitePool::connect(path)).unwrap());
    exercise(&service, &truth, &rt);
    stop(&mut service);
}

#[test]
fn cachet_serves_no_stale_reads_on_postgres_with_the_outbox() {
    let rt = runtime();
    let db = rt.block_on(cachet_testkit::PgDatabase::create());
    let mut service = Service::start(&[
        "--cache",
        "cachet",
        "--database-url",
        db.url(),
        "--db-latency-ms",
        "2",
    ]);
    let truth = Truth::Postgres(rt.block_on(PgPool::connect(db.url())).unwrap());
    exercise(&service, &truth, &rt);
    // Each successful write recorded one outbox row, which the relay delivers.
    let client = Client::new(&service.base);
    let delivered = || {
        stats(&client)["outbox_relay"]["delivered"]
            .as_u64()
            .unwrap()
    };
    let until = Instant::now() + Duration::from_secs(10);
    while delivered() < WRITES && Instant::now() < until {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(delivered(), WRITES);
    stop(&mut service);
    if let Truth::Postgres(pool) = truth {
        rt.block_on(pool.close());
    }
}
