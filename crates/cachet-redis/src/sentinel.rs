//! Redis Sentinel: a store on the primary that the sentinels name, following
//! it across failovers.
//!
//! redis-rs's `SentinelClient` finds the primary: it asks the sentinels
//! (`SENTINEL MASTERS`, skipping a primary flagged down), takes their answers
//! in order, and checks with `ROLE` that the node it names is a primary. Each
//! lookup puts first the sentinel that answered a `PING` first, so that a
//! sentinel that accepts connections and never answers does not hold it up. [`Primary`] keeps one
//! multiplexed connection to it and asks again — in a background task, each
//! attempt bounded by the connection timeout — when that connection says the
//! primary is gone:
//!
//! - the connection broke (I/O error, dropped, refused): calls wait for the
//!   new connection, each within its response timeout;
//! - the node answered `READONLY` (a primary demoted to replica): as a break,
//!   so that writes go to the new primary instead of failing for ever;
//! - a reply timed out: the sentinels are asked, and the connection is
//!   replaced only if they name another primary (a slow primary keeps its
//!   connection; a hung one that was failed over is left).
//!
//! - a sentinel announces a failover (`+switch-master` on its pub/sub, which a
//!   background task follows): as a break. A requested failover leaves the
//!   old primary up, and taking writes, until the sentinels get round to
//!   demoting it (up to ten seconds later); without this the store would keep
//!   writing there, and lose those writes when it is demoted. The store then
//!   goes to the primary the announcement names, even if the sentinel it asks
//!   has not caught up yet and still names the old one. An announcement
//!   can go unheard (no subscription up, or the sentinel listened to hangs),
//!   so the store also asks the sentinels after each subscription attempt, and
//!   pings the sentinel it listens to every second.
//!
//! Subscriptions of the invalidation bus ask the sentinels at each (re)connect
//! ([`Nodes`]), so they follow the primary too.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use cachet_core::{StoreError, StoreErrorKind};
use futures::StreamExt as _;
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ErrorKind, RedisError, RedisResult, ServerErrorKind,
    TlsMode, Value,
};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use crate::redact_url;
use crate::tls::TlsOptions;

/// The sentinels to ask, the name of the primary they watch, and the ACL
/// credentials for the data nodes. Its `Debug` never shows a password.
#[derive(Clone)]
pub(crate) struct SentinelTarget {
    pub(crate) urls: Vec<String>,
    pub(crate) master: String,
    /// Username (empty: the default user) and password for the primary.
    pub(crate) node_auth: Option<(String, String)>,
    /// The database selected on the primary.
    pub(crate) node_db: i64,
}

impl fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("Sentinel")
            .field("sentinels", &urls)
            .field("master", &self.master)
            .field(
                "node_auth",
                &if self.node_auth.is_some() {
                    "<set>"
                } else {
                    "<none>"
                },
            )
            .field("node_db", &self.node_db)
            .finish()
    }
}

impl SentinelTarget {
    /// The same target with passwords taken out, for logs.
    pub(crate) fn redacted(&self) -> Self {
        Self {
            urls: self.urls.iter().map(|u| redact_url(u)).collect(),
            master: self.master.clone(),
            node_auth: self
                .node_auth
                .as_ref()
                .map(|(user, _)| (user.clone(), "***".to_owned())),
            node_db: self.node_db,
        }
    }

    /// A client like [`client`](Self::client) that asks first the sentinel
    /// that answered a `PING` first, the others in their order: redis-rs asks
    /// the sentinels at once but takes their answers in order, so a sentinel
    /// that accepts connections and never answers, asked first, would hold
    /// every lookup until the connection timeout. `None` when there is one
    /// sentinel, when none answers (the lookup then fails as it would), or
    /// when the first already answers first.
    async fn answering_first(&self, tls: &TlsOptions) -> Option<SentinelClient> {
        if self.urls.len() < 2 {
            return None;
        }
        let mut pings: futures::stream::FuturesUnordered<_> = self
            .urls
            .iter()
            .enumerate()
            .map(|(i, url)| async move {
                let client = tls.client(url).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                let pong: RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
                pong.ok().map(|_| i)
            })
            .collect();
        let mut first = None;
        while let Some(answer) = pings.next().await {
            if answer.is_some() {
                first = answer;
                break;
            }
        }
        let first = first.filter(|&i| i > 0)?;
        let mut ordered = self.clone();
        let url = ordered.urls.remove(first);
        ordered.urls.insert(0, url);
        match ordered.client(tls) {
            Ok(client) => Some(client),
            Err(e) => {
                tracing::debug!(master = %self.master, error = %e, "cannot reorder the sentinels");
                None
            }
        }
    }

    /// A client that finds the primary through the sentinels. The sentinels'
    /// own credentials come from their URLs (the first that has any); the data
    /// nodes are reached over TLS when the sentinels are, with the same
    /// settings.
    fn client(&self, tls: &TlsOptions) -> Result<SentinelClient, StoreError> {
        if self.urls.is_empty() {
            return Err(StoreError::config(
                "a Sentinel store needs the URL of at least one sentinel",
            ));
        }
        let infos = self
            .urls
            .iter()
            .map(|url| tls.connection_info(url))
            .collect::<Result<Vec<_>, _>>()?;
        let over_tls =
            |i: &redis::ConnectionInfo| matches!(i.addr(), ConnectionAddr::TcpTls { .. });
        let tls_on = infos.iter().any(over_tls);
        if tls_on && !infos.iter().all(over_tls) {
            return Err(StoreError::config(
                "the sentinels' URLs mix redis:// and rediss://",
            ));
        }
        let invalid = |e: RedisError| {
            StoreError::config(format!(
                "invalid Sentinel configuration for master {:?}",
                self.master
            ))
            .with_source(crate::RedisCause(e))
        };
        let addrs = infos.iter().map(|i| i.addr().clone());
        let mut builder =
            SentinelClientBuilder::new(addrs, &self.master, SentinelServerType::Master)
                .map_err(invalid)?;
        if let Some(auth) = infos
            .iter()
            .map(redis::ConnectionInfo::redis_settings)
            .find(|r| r.password().is_some())
        {
            if let Some(user) = auth.username() {
                builder = builder.set_client_to_sentinel_username(user);
            }
            if let Some(password) = auth.password() {
                builder = builder.set_client_to_sentinel_password(password);
            }
        }
        if tls_on {
            builder = builder.set_client_to_redis_tls_mode(if tls.accept_invalid_certs {
                TlsMode::Insecure
            } else {
                TlsMode::Secure
            });
            if let Some(certs) = tls.certificates() {
                builder = builder
                    .set_client_to_sentinel_certificates(certs.clone())
                    .set_client_to_redis_certificates(certs);
            }
        }
        if self.node_db != 0 {
            builder = builder.set_client_to_redis_db(self.node_db);
        }
        if let Some((user, password)) = &self.node_auth {
            if !user.is_empty() {
                builder = builder.set_client_to_redis_username(user);
            }
            builder = builder.set_client_to_redis_password(password);
        }
        builder.build().map_err(invalid)
    }
}

/// The connection to the primary the sentinels name. Cloning is cheap; clones
/// share the connection.
#[derive(Clone)]
pub(crate) struct Primary(Arc<Shared>);

struct Shared {
    /// The sentinels and TLS settings, for connections of one's own.
    target: SentinelTarget,
    tls: TlsOptions,
    master: String,
    /// Asks the sentinels; one resolution at a time.
    sentinel: Mutex<SentinelClient>,
    config: AsyncConnectionConfig,
    connection_timeout: Duration,
    response_timeout: Duration,
    link: watch::Sender<Link>,
    /// Whether a background task is following the primary.
    following: AtomicBool,
    /// When a timeout last made the store ask the sentinels: a slow primary
    /// times out many calls, and each lookup opens a connection to check it.
    silence_checked: std::sync::Mutex<Option<Instant>>,
    /// The primary the last failover announcement named, until the sentinels
    /// asked name it too.
    announced: std::sync::Mutex<Option<Announced>>,
}

/// A primary named by a failover announcement (`+switch-master`).
#[derive(Clone, Debug)]
struct Announced {
    host: String,
    port: u16,
    at: Instant,
}

impl Announced {
    /// `host:port`, as a connection's address reads.
    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// How long an announced primary is preferred to the one the sentinels asked
/// name: longer than the sentinels take to agree, and to demote the old
/// primary after a requested failover (about ten seconds).
const ANNOUNCED_FOR: Duration = Duration::from_secs(30);

/// The current primary. `epoch` counts connections, so that a failure on an
/// old one does not break its successor.
#[derive(Clone)]
struct Link {
    epoch: u64,
    /// `host:port`.
    addr: String,
    client: Option<redis::Client>,
    /// `None` while the primary is being looked for again.
    conn: Option<MultiplexedConnection>,
}

/// What a reply says about the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// Gone: the connection broke, or the node is a replica now.
    Gone,
    /// Maybe gone: no reply in time.
    Silent,
}

/// Finds the primary through the sentinels and connects to it, within the
/// connection timeout.
pub(crate) async fn connect(
    target: &SentinelTarget,
    tls: &TlsOptions,
    response_timeout: Duration,
    connection_timeout: Duration,
) -> Result<Primary, StoreError> {
    let sentinel = target.client(tls)?;
    let (link, _) = watch::channel(Link {
        epoch: 0,
        addr: String::new(),
        client: None,
        conn: None,
    });
    let primary = Primary(Arc::new(Shared {
        target: target.clone(),
        tls: tls.clone(),
        master: target.master.clone(),
        sentinel: Mutex::new(sentinel),
        config: AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connection_timeout))
            .set_response_timeout(Some(response_timeout)),
        connection_timeout,
        response_timeout,
        link,
        following: AtomicBool::new(false),
        silence_checked: std::sync::Mutex::new(None),
        announced: std::sync::Mutex::new(None),
    }));
    primary.0.refresh(0).await?;
    tokio::spawn(watch_switches(Arc::downgrade(&primary.0)));
    Ok(primary)
}

impl Primary {
    /// Another connection to the primary the same sentinels name, following
    /// it on its own, with calls bounded by `response_timeout`: for a
    /// connection of one's own (write-behind's flushers, whose blocking reads
    /// must not hold the shared connection).
    pub(crate) async fn sibling(&self, response_timeout: Duration) -> Result<Self, StoreError> {
        let s = &self.0;
        connect(&s.target, &s.tls, response_timeout, s.connection_timeout).await
    }

    /// Sends through the current primary's connection (waiting for one while it
    /// is looked for), all within the response timeout, and starts looking for
    /// the primary again if the reply says it is gone.
    pub(crate) async fn call<T, F>(
        &self,
        send: impl FnOnce(MultiplexedConnection) -> F,
        verdict: impl FnOnce(&T) -> bool,
    ) -> RedisResult<T>
    where
        F: Future<Output = RedisResult<T>>,
    {
        let deadline = Instant::now() + self.0.response_timeout;
        let (epoch, conn) = self.0.ready(deadline).await?;
        let reply = tokio::time::timeout_at(deadline, send(conn))
            .await
            .unwrap_or_else(|_| Err(timed_out("no reply from the primary in time")));
        let verdict = match &reply {
            Ok(value) if verdict(value) => Verdict::Gone,
            Ok(_) => Verdict::Fine,
            Err(e) => verdict_of(e),
        };
        if verdict != Verdict::Fine {
            self.0.lost(epoch, verdict == Verdict::Gone);
        }
        reply
    }

    /// A client for the primary the sentinels name now (asking them within the
    /// connection timeout), for a connection of one's own.
    pub(crate) async fn fresh_client(&self) -> Result<redis::Client, StoreError> {
        let epoch = self.0.link.borrow().epoch;
        self.0.refresh(epoch).await?;
        self.current_client()
    }

    /// A client for the primary last found.
    fn current_client(&self) -> Result<redis::Client, StoreError> {
        self.0.link.borrow().client.clone().ok_or_else(|| {
            StoreError::unavailable(format!(
                "no primary found yet for Sentinel master {:?}",
                self.0.master
            ))
        })
    }
}

impl Shared {
    /// The current connection and its epoch, waiting until `deadline` for one.
    async fn ready(&self, deadline: Instant) -> RedisResult<(u64, MultiplexedConnection)> {
        let current = |l: &Link| l.conn.clone().map(|c| (l.epoch, c));
        if let Some(ready) = current(&self.link.borrow()) {
            return Ok(ready);
        }
        let mut rx = self.link.subscribe();
        let waited = tokio::time::timeout_at(deadline, rx.wait_for(|l| l.conn.is_some())).await;
        match waited {
            Ok(Ok(link)) => current(&link).ok_or_else(|| timed_out("no primary")),
            _ => Err(timed_out(
                "no connection to the primary within the response timeout (looking for it through the sentinels)",
            )),
        }
    }

    /// The connection of `epoch` failed: forget it if it is `gone`, and look
    /// for the primary in the background unless that is under way (or, for a
    /// mere timeout, was done less than a second ago).
    fn lost(self: &Arc<Self>, epoch: u64, gone: bool) {
        if gone {
            self.link.send_if_modified(|l| {
                let drop = l.epoch == epoch && l.conn.is_some();
                if drop {
                    l.conn = None;
                }
                drop
            });
        } else {
            let mut checked = self
                .silence_checked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if checked.is_some_and(|at| at.elapsed() < SILENCE_CHECK_PERIOD) {
                return;
            }
            *checked = Some(Instant::now());
        }
        if self.link.borrow().epoch == epoch && !self.following.swap(true, Ordering::AcqRel) {
            tracing::debug!(master = %self.master, gone, "asking the sentinels for the primary");
            tokio::spawn(follow(Arc::downgrade(self), epoch));
        }
    }

    /// Asks the sentinels for the primary and connects to it unless the current
    /// connection is alive and to that node; skipped if another refresh has
    /// replaced the connection of `seen` meanwhile. One attempt, within the
    /// connection timeout.
    async fn refresh(&self, seen: u64) -> Result<(), StoreError> {
        let mut sentinel = self.sentinel.lock().await;
        let (epoch, addr, alive) = {
            let l = self.link.borrow();
            (l.epoch, l.addr.clone(), l.conn.is_some())
        };
        if epoch != seen && alive {
            return Ok(());
        }
        let found = crate::within_connect_timeout(self.connection_timeout, async {
            if let Some(ordered) = self.target.answering_first(&self.tls).await {
                *sentinel = ordered;
            }
            let client = sentinel.async_get_client().await?;
            let found = client.get_connection_info().addr().to_string();
            if let Some(announced) = self.announced_unlike(&found) {
                if alive && announced.addr() == addr {
                    return Ok(None);
                }
                if let Some((client, conn)) = self.announced_connection(&client, &announced).await?
                {
                    return Ok(Some((client, announced.addr(), conn)));
                }
            }
            if alive && found == addr {
                return Ok(None);
            }
            let conn = client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            Ok(Some((client, found, conn)))
        })
        .await
        .map_err(|e| {
            e.context(format_args!(
                "no primary for Sentinel master {:?}",
                self.master
            ))
        })?
        .map_err(|e: RedisError| self.resolve_err(e))?;
        if let Some((client, found, conn)) = found {
            if epoch > 0 {
                tracing::warn!(master = %self.master, from = %addr, to = %found,
                    "following the primary named by the sentinels");
            }
            self.link.send_replace(Link {
                epoch: epoch + 1,
                addr: found,
                client: Some(client),
                conn: Some(conn),
            });
        }
        Ok(())
    }

    /// The primary the last announcement named, locked.
    fn announced(&self) -> std::sync::MutexGuard<'_, Option<Announced>> {
        self.announced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes the primary a failover announcement names.
    fn announce(&self, host: &str, port: u16) {
        *self.announced() = Some(Announced {
            host: host.to_owned(),
            port,
            at: Instant::now(),
        });
    }

    /// The primary the last announcement named, if it is recent and the
    /// sentinels asked, which named `named`, have not caught up with it. A
    /// sentinel learns of a failover from the others, some time after the
    /// announcement; meanwhile it names the old primary, which after a requested
    /// failover still calls itself primary, and takes writes that its demotion
    /// then loses.
    fn announced_unlike(&self, named: &str) -> Option<Announced> {
        let mut announced = self.announced();
        let current = announced
            .as_ref()
            .filter(|a| a.at.elapsed() < ANNOUNCED_FOR && a.addr() != named)
            .cloned();
        if current.is_none() {
            *announced = None;
        }
        current
    }

    /// A client for the announced primary, with the settings of `client` (for
    /// the primary the sentinels named), and a connection to it, if that node
    /// says it is a primary; `None`, and the announcement forgotten, if it says
    /// otherwise (a later failover).
    async fn announced_connection(
        &self,
        client: &redis::Client,
        announced: &Announced,
    ) -> RedisResult<Option<(redis::Client, MultiplexedConnection)>> {
        let info = client.get_connection_info().clone();
        let mut addr = info.addr().clone();
        match &mut addr {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                host.clone_from(&announced.host);
                *port = announced.port;
            }
            _ => return Ok(None),
        }
        let announced_client = redis::Client::open(info.set_addr(addr))?;
        let mut conn = announced_client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let role: Value = redis::cmd("ROLE").query_async(&mut conn).await?;
        let primary = matches!(&role, Value::Array(fields)
            if matches!(fields.first(), Some(Value::BulkString(r)) if r == b"master"));
        if !primary {
            *self.announced() = None;
            return Ok(None);
        }
        Ok(Some((announced_client, conn)))
    }

    fn resolve_err(&self, e: RedisError) -> StoreError {
        let what = format!(
            "no reachable primary for Sentinel master {:?}: {}",
            self.master,
            match e.kind() {
                ErrorKind::MasterNameNotFoundBySentinel => "no sentinel names one that is up",
                ErrorKind::EmptySentinelList => "no sentinel given",
                _ => "the sentinels or the primary they name cannot be reached",
            }
        );
        let kind = if e.is_timeout() {
            StoreErrorKind::Timeout
        } else {
            StoreErrorKind::Unavailable
        };
        StoreError::new(kind, what).with_source(crate::RedisCause(e))
    }
}

/// Looks for the primary until a connection to it is up, with backoff, for as
/// long as the store lives.
async fn follow(shared: Weak<Shared>, epoch: u64) {
    let mut backoff = Duration::from_millis(25);
    let mut failures = 0u32;
    loop {
        let Some(s) = shared.upgrade() else { return };
        match s.refresh(epoch).await {
            Ok(()) => {
                s.following.store(false, Ordering::Release);
                // A break reported while this ran found the task still busy:
                // look again for it, unless another task does.
                if s.link.borrow().conn.is_some() || s.following.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
            Err(e) => {
                failures += 1;
                // The first failure and then every tenth: a failover takes seconds.
                if failures % 10 == 1 {
                    tracing::warn!(master = %s.master, failures, error = %cachet_core::Report(&e),
                        "looking for the primary through the sentinels");
                }
            }
        }
        drop(s);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// How often timeouts at most make the store ask the sentinels.
const SILENCE_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// The sentinels' channel announcing failovers: `<master> <old ip> <old port>
/// <new ip> <new port>`.
const SWITCH_MASTER: &str = "+switch-master";

/// Follows the failover announcements of one sentinel at a time (the first
/// that answers), for as long as the store lives: an announcement for this
/// master breaks the connection, so that calls wait for the new primary.
///
/// An announcement can be missed: while no subscription is up, or when the
/// sentinel listened to hangs (its connection stays open and says nothing). So
/// the store asks the sentinels for the primary after each subscription and
/// after each failed attempt, and pings the sentinel listened to every
/// [`ANNOUNCEMENTS_HEARTBEAT`]: an unanswered ping ends the subscription, and
/// the next one goes to a sentinel that answers.
async fn watch_switches(shared: Weak<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(s) = shared.upgrade() else { return };
        let subscribing = crate::within_connect_timeout(s.connection_timeout, async {
            let client = s.sentinel.lock().await.async_get_sentinel_client().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(SWITCH_MASTER).await?;
            Ok::<_, RedisError>(pubsub)
        });
        let subscribed = subscribing.await;
        // Whether or not the subscription is up, a failover may have gone
        // unheard until now.
        let epoch = s.link.borrow().epoch;
        s.lost(epoch, false);
        let pubsub = match subscribed {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                if let Ok(Err(e)) = failed {
                    tracing::debug!(master = %s.master, error = %e, "cannot follow the sentinels' announcements");
                }
                drop(s);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let master = s.master.clone();
        drop(s);
        let (mut sink, mut messages) = pubsub.split();
        let mut heartbeat = tokio::time::interval(ANNOUNCEMENTS_HEARTBEAT);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let payload: String = message.get_payload().unwrap_or_default();
                    // `<master> <old ip> <old port> <new ip> <new port>`
                    let fields: Vec<&str> = payload.split(' ').collect();
                    if fields.first() != Some(&master.as_str()) {
                        continue;
                    }
                    let Some(s) = shared.upgrade() else { return };
                    tracing::info!(master = %s.master, announcement = %payload, "a sentinel announced a failover");
                    if let [_, _, _, host, port] = fields[..]
                        && let Ok(port) = port.parse()
                    {
                        s.announce(host, port);
                    }
                    let epoch = s.link.borrow().epoch;
                    s.lost(epoch, true);
                }
                _ = heartbeat.tick() => {
                    // Also how the task ends with the store.
                    if shared.strong_count() == 0 {
                        return;
                    }
                    let pong: Result<RedisResult<Value>, _> =
                        tokio::time::timeout(ANNOUNCEMENTS_HEARTBEAT, sink.ping()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        tracing::debug!(%master, "the sentinel listened to did not answer a ping");
                        break;
                    }
                }
            }
        }
    }
}

/// How often the sentinel whose announcements the store follows is pinged, and
/// how long it has to answer.
const ANNOUNCEMENTS_HEARTBEAT: Duration = Duration::from_secs(1);

/// What an error says about the primary.
fn verdict_of(e: &RedisError) -> Verdict {
    if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) {
        Verdict::Gone
    } else if e.is_timeout() {
        Verdict::Silent
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        Verdict::Gone
    } else {
        Verdict::Fine
    }
}

/// Whether a reply is (or holds) a `READONLY` error: the node is a replica.
pub(crate) fn is_readonly(value: &Value) -> bool {
    match value {
        Value::ServerError(e) => e.kind() == Some(ServerErrorKind::ReadOnly),
        _ => false,
    }
}

fn timed_out(what: &'static str) -> RedisError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what).into()
}

/// Where connections of one's own go (the bus's subscriptions, write-behind's
/// flushers): a fixed server, or the primary the sentinels name at each
/// connect.
#[derive(Clone)]
pub(crate) enum Nodes {
    Fixed(Box<redis::Client>),
    Primary(Primary),
}

impl Nodes {
    /// A client to connect with now.
    pub(crate) async fn client(&self) -> Result<redis::Client, StoreError> {
        match self {
            Self::Fixed(client) => Ok(client.as_ref().clone()),
            Self::Primary(primary) => primary.fresh_client().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaks_and_readonly_replies_mean_the_primary_is_gone() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(verdict_of(&io), Verdict::Gone);
        assert_eq!(verdict_of(&timed_out("slow")), Verdict::Silent);
        let readonly =
            redis::parse_redis_value(b"-READONLY You can't write against a read only replica.\r\n")
                .unwrap();
        assert!(is_readonly(&readonly));
        let Value::ServerError(e) = readonly else {
            panic!("{readonly:?}")
        };
        assert_eq!(verdict_of(&RedisError::from(e)), Verdict::Gone);
        let other = redis::parse_redis_value(b"-ERR unknown command\r\n").unwrap();
        assert!(!is_readonly(&other));
        let Value::ServerError(e) = other else {
            panic!("{other:?}")
        };
        assert_eq!(verdict_of(&RedisError::from(e)), Verdict::Fine);
    }

    #[test]
    fn targets_never_show_a_password() {
        let t = SentinelTarget {
            urls: vec!["redis://:sentinelpw@a:26379/".into()],
            master: "mymaster".into(),
            node_auth: Some(("app".into(), "nodepw".into())),
            node_db: 2,
        };
        for shown in [format!("{t:?}"), format!("{:?}", t.redacted())] {
            assert!(!shown.contains("pw"), "{shown}");
            assert!(shown.contains("mymaster"), "{shown}");
            assert!(shown.contains("node_db: 2"), "{shown}");
        }
    }
}
