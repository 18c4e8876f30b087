//! The invalidation bus: notices of invalidations and writes, for near caches,
//! over Redis pub/sub.
//!
//! Each cache has a channel, `{prefix}{namespace}:sys:bus` (a channel, not a
//! key: it takes no memory when nobody listens). A store with the bus on sends a
//! notice after every invalidation, write, group and tag invalidation that
//! succeeds — from `Cache` calls, an outbox relay, a deferred-invalidation
//! worker alike. Notices are one line each (`k <entry key>`, `g <group
//! generation key>` or `t <tag generation key>`).
//!
//! On one server (or behind Sentinel), an `invalidate` or a write (`set`,
//! `set_versioned`) that finds no other notice sent with a write in the last
//! millisecond sends its own in the same round trip: a `PUBLISH` pipelined
//! after the `DEL`, or published by the write's script after it wrote. A lone
//! write's notice is out when the write returns, and costs no task wake-up.
//! Every other notice (those of a burst, of group and tag invalidations, and
//! all of them on a cluster, whose pipelines route by key) is queued for a
//! background task that batches them, one `PUBLISH` per channel and batch (at
//! most 512 notices): a notice after a quiet millisecond goes out at once,
//! with whatever is already queued; while notices keep coming, batches go out
//! at most once a millisecond, gathering what arrived meanwhile, and writers
//! only queue their notices (they do not wake the task). So a burst of writes
//! costs about two messages a millisecond, not one a write, and a write in a
//! burst no thread wake-up (`docs/decisions.md` has the measurements).
//!
//! Pub/sub is fire-and-forget: a subscriber that is disconnected misses
//! messages. Subscribers therefore report every loss and every recovery, and the
//! near cache empties itself on both. While connected, a subscriber pings every
//! heartbeat (1 s by default) and treats a ping that goes unanswered for a
//! heartbeat as a loss: a stalled server, which delivers no notice, is a loss
//! too.
//!
//! Why pub/sub rather than RESP3 client tracking (measured in
//! `docs/decisions.md`): tracking's default mode makes the server remember
//! every key each client read (about 70 bytes per key and reader, with no cap
//! on items), needs RESP3 on the data connection, is switched off silently by a
//! reconnect, and on Redis Cluster needs a tracking connection to every master;
//! its broadcast mode delivers the same keys as the bus. Pub/sub keeps no state
//! on the server, needs one subscription per cache on any node (`PUBLISH`
//! reaches every node of a cluster), and batches bursts into a few messages.
//! Its cost is delay: the notice leaves after the write returned, one round
//! trip later than a tracking push.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet_core::{BusEvent, GroupKey, Notice, StoreKey, TagKey};
use futures::StreamExt as _;
use redis::aio::ConnectionLike;
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use crate::RedisConnection;
use crate::sentinel::Nodes;

/// The most notices in one batch.
const BATCH: usize = 512;
/// The publishing task's tick while notices keep coming: it publishes once a
/// tick what arrived during it.
const LINGER: Duration = Duration::from_millis(1);
/// Ping period and timeout of a subscription, unless the store says
/// ([`RedisStoreBuilder::bus_heartbeat`](crate::RedisStoreBuilder::bus_heartbeat)).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long connecting and subscribing may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The channel of the cache whose keys start with `head`.
pub(crate) fn channel(head: &str) -> String {
    format!("{head}{CHANNEL_SUFFIX}")
}

/// What a cache's channel adds to its head.
const CHANNEL_SUFFIX: &str = ":sys:bus";

/// The sending side: a queue in front of the batching task, and the notices
/// that go out with their writes.
#[derive(Debug)]
pub(crate) struct Publisher {
    tx: mpsc::UnboundedSender<Queued>,
    /// `None` on a cluster, whose pipelines route each command by its key
    /// (and `PUBLISH` has none): there every notice is queued.
    inline: Option<Inline>,
}

/// The pace of the notices sent with their writes: at most one a [`LINGER`]
/// per store. A write after a quiet spell sends its notice in its own round
/// trip (pipelined after the write, or from the write's script), so it wakes
/// no task and the notice leaves with the write; the writes that follow
/// within the [`LINGER`] queue theirs for the batching task, as a burst does.
#[derive(Debug)]
struct Inline {
    epoch: std::time::Instant,
    /// Nanoseconds after `epoch` from which the next notice may go inline.
    next: AtomicU64,
    /// Inline notices the server refused, since the last flush.
    failed: AtomicU64,
}

impl Inline {
    fn new() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            next: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

/// A notice sent with its write: the caller adds [`channel`](Self::channel)
/// and [`line`](Self::line) to the write's round trip (as a `PUBLISH` after it,
/// or as a script's arguments), then reports a refusal with
/// [`Publisher::inline_failed`].
pub(crate) struct InlineNotice<'k> {
    tag: &'static str,
    key: &'k str,
    head: &'k str,
}

impl<'k> InlineNotice<'k> {
    /// The channel, as a command argument.
    pub(crate) fn channel(&self) -> impl redis::ToRedisArgs + 'k {
        Joined(self.head, CHANNEL_SUFFIX)
    }

    /// The notice's line, as a command argument.
    pub(crate) fn line(&self) -> impl redis::ToRedisArgs + 'k {
        Joined(self.tag, self.key)
    }
}

/// Two strings as one command argument, written straight into the command.
struct Joined<'a>(&'a str, &'a str);

impl redis::ToRedisArgs for Joined<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use bytes::BufMut as _;
        let mut arg = out.bufmut_for_next_arg(self.0.len() + self.1.len());
        arg.put_slice(self.0.as_bytes());
        arg.put_slice(self.1.as_bytes());
    }
}

/// What the batching task is sent.
enum Queued {
    /// A notice: its line's tag (`"k "`, `"g "` or `"t "`) and key, and the
    /// length of the key's head, which names the channel. The line and the
    /// channel are written in the batching task, once per batch for the
    /// channel: an invalidation only copies its key.
    Notice {
        tag: &'static str,
        key: Box<str>,
        head: usize,
    },
    /// Publish everything queued before this, then answer with how many
    /// notices could not be published since the previous flush.
    Flush(oneshot::Sender<u64>),
}

impl Publisher {
    /// Starts the batching task on the current tokio runtime.
    pub(crate) fn spawn(conn: RedisConnection) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let inline = (!conn.is_cluster()).then(Inline::new);
        tokio::spawn(publish(conn, rx));
        Self { tx, inline }
    }

    pub(crate) fn key(&self, key: &StoreKey) {
        self.notice("k ", key.as_str(), key.head());
    }

    /// The notice of `key` to send with its write, if no other went inline
    /// within the last [`LINGER`]; `None`: the caller queues it
    /// ([`key`](Self::key)) once the write succeeded.
    pub(crate) fn inline_key<'k>(&self, key: &'k StoreKey) -> Option<InlineNotice<'k>> {
        let inline = self.inline.as_ref()?;
        let now = u64::try_from(inline.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let next = inline.next.load(Ordering::Relaxed);
        if now < next {
            return None;
        }
        let linger = u64::try_from(LINGER.as_nanos()).unwrap_or(u64::MAX);
        (inline.next)
            .compare_exchange(
                next,
                now.saturating_add(linger),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .ok()?;
        Some(InlineNotice {
            tag: "k ",
            key: key.as_str(),
            head: key.head(),
        })
    }

    /// Counts an inline notice the server refused (reported by the next
    /// [`flush`](Self::flush)).
    pub(crate) fn inline_failed(&self, notice: &InlineNotice<'_>, error: &dyn std::fmt::Display) {
        if let Some(inline) = &self.inline {
            inline.failed.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(channel = %channel(notice.head), notices = 1, %error,
            "publishing invalidation notices failed");
    }

    pub(crate) fn group(&self, group: &GroupKey) {
        self.notice("g ", group.as_str(), group.head());
    }

    pub(crate) fn tag(&self, tag: &TagKey) {
        self.notice("t ", tag.as_str(), tag.head());
    }

    /// Queues the notice of `key`, whose head is `head` (a prefix of it).
    fn notice(&self, tag: &'static str, key: &str, head: &str) {
        debug_assert!(key.starts_with(head));
        let _ = self.tx.send(Queued::Notice {
            tag,
            key: key.into(),
            head: head.len(),
        });
    }

    /// Waits until every notice queued so far is published; the number that
    /// could not be (since the previous flush), or `None` if the batching task
    /// is gone (its runtime shut down).
    pub(crate) async fn flush(&self) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Queued::Flush(tx)).ok()?;
        let queued = rx.await.ok()?;
        let inline = (self.inline.as_ref()).map_or(0, |i| i.failed.swap(0, Ordering::Relaxed));
        Some(queued + inline)
    }
}

/// Gathers notices into batches and publishes them, until every sender is gone.
///
/// Parked, the task waits for a notice: the first one after a quiet spell wakes
/// it and goes out at once, with whatever is already queued. From then on it
/// ticks, every [`LINGER`], publishing at each tick what arrived since the last
/// one, until a tick finds nothing and it parks again. While it ticks, writers
/// only queue their notices and never wake it: that wake-up is most of what a
/// notice costs its writer (on a multi-threaded runtime, the wake-up of a
/// parked worker thread; `docs/performance.md`).
async fn publish<C: ConnectionLike + Send>(mut conn: C, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut failed = 0u64;
    let mut batch = Batch::default();
    while let Some(first) = rx.recv().await {
        // Ticks at a steady period from now (a `sleep` per tick would add the
        // timer's rounding up to the millisecond each time); a tick missed
        // while publishing is skipped, not made up.
        let mut ticks = tokio::time::interval(LINGER);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        ticks.tick().await;
        let mut next = Some(first);
        loop {
            let gathered = gather(next.take(), &mut rx, &mut batch);
            send(&mut conn, &batch, &mut failed).await;
            batch.clear();
            for done in gathered.flushes {
                let _ = done.send(std::mem::take(&mut failed));
            }
            if gathered.closed {
                return;
            }
            if gathered.notices == 0 {
                break;
            }
            ticks.tick().await;
        }
    }
}

/// Publishes the messages of `batch`, counting in `failed` the notices of
/// those that could not be.
async fn send<C: ConnectionLike + Send>(conn: &mut C, batch: &Batch, failed: &mut u64) {
    for message in batch.ready() {
        let sent: Result<i64, _> =
            crate::command("PUBLISH", 2, message.channel.len() + message.lines.len())
                .arg(&message.channel)
                .arg(&message.lines)
                .query_async(conn)
                .await;
        if let Err(e) = sent {
            // Subscribers whose connection is fine would miss these: their
            // near caches rely on their TTL for them.
            *failed += message.notices;
            tracing::warn!(channel = %message.channel, notices = message.notices,
                error = %cachet_core::Report(&e), "publishing invalidation notices failed");
        }
    }
}

/// What [`gather`] took from the queue.
struct Gathered {
    /// How many notices joined the batch.
    notices: usize,
    /// Flushes to answer once the batch is out.
    flushes: Vec<oneshot::Sender<u64>>,
    /// Whether every sender is gone (and the queue empty).
    closed: bool,
}

/// Adds `first` and what is queued to `batch`: at most [`BATCH`] notices, and
/// nothing queued after a flush (it is answered once this batch is out).
fn gather(
    first: Option<Queued>,
    rx: &mut mpsc::UnboundedReceiver<Queued>,
    batch: &mut Batch,
) -> Gathered {
    let mut gathered = Gathered {
        notices: 0,
        flushes: Vec::new(),
        closed: false,
    };
    let mut next = first;
    while gathered.notices < BATCH {
        let queued = match next.take().map_or_else(|| rx.try_recv(), Ok) {
            Ok(queued) => queued,
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                gathered.closed = true;
                break;
            }
        };
        match queued {
            Queued::Notice { tag, key, head } => {
                batch.add(tag, &key, head);
                gathered.notices += 1;
            }
            Queued::Flush(done) => {
                gathered.flushes.push(done);
                break;
            }
        }
    }
    gathered
}

/// The messages of one batch, one per channel (almost always a single one).
/// The task keeps it from batch to batch and empties it after each, keeping
/// the messages of the channels the batch used (their channel names and
/// buffers): a steady stream of notices to a few caches allocates nothing per
/// batch.
#[derive(Default)]
struct Batch {
    messages: Vec<Message>,
}

/// One `PUBLISH`: a channel, and its notices' lines, newline-separated.
struct Message {
    channel: String,
    lines: String,
    notices: u64,
}

impl Batch {
    /// Adds the notice of `key`, whose first `head` bytes name its channel.
    fn add(&mut self, tag: &str, key: &str, head: usize) {
        let head = &key[..head];
        let of_head = |m: &Message| m.channel.strip_suffix(CHANNEL_SUFFIX) == Some(head);
        let i = match self.messages.iter().position(of_head) {
            Some(i) => i,
            None => {
                self.messages.push(Message {
                    channel: channel(head),
                    lines: String::new(),
                    notices: 0,
                });
                self.messages.len() - 1
            }
        };
        let message = &mut self.messages[i];
        if message.notices > 0 {
            message.lines.push('\n');
        }
        message.lines.push_str(tag);
        message.lines.push_str(key);
        message.notices += 1;
    }

    /// The messages to publish: those with notices.
    fn ready(&self) -> impl Iterator<Item = &Message> {
        self.messages.iter().filter(|m| m.notices > 0)
    }

    /// Empties the batch for the next one. The messages of channels that had
    /// no notice in this batch go; the others stay, empty, with their buffers.
    fn clear(&mut self) {
        self.messages.retain(|m| m.notices > 0);
        for message in &mut self.messages {
            message.lines.clear();
            message.notices = 0;
        }
    }
}

/// Parses one published message.
pub(crate) fn parse(payload: &str) -> Vec<Notice> {
    payload
        .lines()
        .filter_map(|line| match line.split_once(' ') {
            Some(("k", key)) => StoreKey::parse(key).map(Notice::Key),
            Some(("g", key)) => GroupKey::parse(key).map(Notice::Group),
            Some(("t", key)) => TagKey::parse(key).map(Notice::Tag),
            _ => None,
        })
        .collect()
}

/// Subscribes to `head`'s channel on the server of `nodes` (with Sentinel, the
/// primary named at each connect), keeping the subscription up until the
/// receiver is dropped.
pub(crate) fn subscribe(nodes: Nodes, head: &str, heartbeat: Duration) -> mpsc::Receiver<BusEvent> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(follow(nodes, channel(head), tx, heartbeat));
    rx
}

async fn follow(nodes: Nodes, channel: String, tx: mpsc::Sender<BusEvent>, heartbeat: Duration) {
    let mut backoff = Duration::from_millis(50);
    while !tx.is_closed() {
        match listen(&nodes, &channel, &tx, heartbeat).await {
            Listened::ReceiverGone => return,
            Listened::Lost { was_connected } => {
                if was_connected {
                    backoff = Duration::from_millis(50);
                    if tx.send(BusEvent::Lost).await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

enum Listened {
    ReceiverGone,
    Lost { was_connected: bool },
}

/// One subscription, until it breaks.
async fn listen(
    nodes: &Nodes,
    channel: &str,
    tx: &mpsc::Sender<BusEvent>,
    heartbeat: Duration,
) -> Listened {
    let lost = Listened::Lost {
        was_connected: false,
    };
    let client = match nodes.client().await {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!(%channel, error = %cachet_core::Report(&e), "invalidation bus: no server");
            return lost;
        }
    };
    let pubsub = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => {
            tracing::debug!(%channel, error = %cachet_core::Report(&e), "invalidation bus: cannot connect");
            return lost;
        }
        Err(_) => return lost,
    };
    let (mut sink, mut stream) = pubsub.split();
    match tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(channel)).await {
        Ok(Ok(())) => {}
        _ => return lost,
    }
    if tx.send(BusEvent::Connected).await.is_err() {
        return Listened::ReceiverGone;
    }
    let lost = Listened::Lost {
        was_connected: true,
    };
    let mut ping = tokio::time::interval(heartbeat);
    ping.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { return lost };
                let payload: String = message.get_payload().unwrap_or_default();
                let notices = parse(&payload);
                if !notices.is_empty() && tx.send(BusEvent::Notices(notices)).await.is_err() {
                    return Listened::ReceiverGone;
                }
            }
            _ = ping.tick() => {
                let pong: Result<Result<redis::Value, _>, _> =
                    tokio::time::timeout(heartbeat, sink.ping()).await;
                if !matches!(pong, Ok(Ok(_))) {
                    tracing::debug!(%channel, "invalidation bus: ping unanswered");
                    return lost;
                }
            }
            () = tx.closed() => return Listened::ReceiverGone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_core::KeyLayout;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    /// A connection that answers every `PUBLISH` at once and records when it
    /// came and how many notices it carried.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(tokio::time::Instant, usize)>>>);

    impl Recorder {
        fn published(&self) -> Vec<(tokio::time::Instant, usize)> {
            self.0.lock().unwrap().clone()
        }
    }

    impl ConnectionLike for Recorder {
        fn req_packed_command<'a>(
            &'a mut self,
            cmd: &'a redis::Cmd,
        ) -> redis::RedisFuture<'a, redis::Value> {
            let lines = match cmd.args_iter().nth(2) {
                Some(redis::Arg::Simple(lines)) => lines.split(|b| *b == b'\n').count(),
                _ => panic!("not a PUBLISH"),
            };
            self.0
                .lock()
                .unwrap()
                .push((tokio::time::Instant::now(), lines));
            Box::pin(async { Ok(redis::Value::Int(0)) })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a redis::Pipeline,
            _: usize,
            _: usize,
        ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
            unreachable!("the bus sends no pipeline")
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    /// A future counted each time it is polled: each time its task was woken.
    struct Polls<F> {
        inner: Pin<Box<F>>,
        polls: Arc<AtomicUsize>,
    }

    impl<F: Future> Future for Polls<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.inner.as_mut().poll(cx)
        }
    }

    fn notice(i: usize) -> Queued {
        Queued::Notice {
            tag: "k ",
            key: format!("app:c:v:{i}").into(),
            head: "app:c".len(),
        }
    }

    /// Writers in a burst queue their notices without waking the publishing
    /// task: it wakes once a tick, publishes what came, and parks after a
    /// tick without notices; a notice after that goes out at once.
    #[tokio::test(start_paused = true)]
    async fn writers_in_a_burst_do_not_wake_the_publishing_task() {
        let recorder = Recorder::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let polls = Arc::new(AtomicUsize::new(0));
        tokio::spawn(Polls {
            inner: Box::pin(publish(recorder.clone(), rx)),
            polls: Arc::clone(&polls),
        });
        let start = tokio::time::Instant::now();
        // 50 ms of writes, three each 1 ms.
        let ticks = 50;
        for tick in 0..ticks {
            for i in 0..3 {
                tx.send(notice(tick * 3 + i)).unwrap();
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(LINGER).await;
        }
        let during = polls.load(Ordering::Relaxed);
        // The last notices go out at the next tick; the one after finds
        // nothing and parks the task.
        tokio::time::sleep(LINGER * 20).await;
        let published = recorder.published();
        assert_eq!(
            published.iter().map(|(_, n)| n).sum::<usize>(),
            ticks * 3,
            "every notice published"
        );
        for pair in published.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= LINGER, "at most a batch a tick");
        }
        // Woken once a tick (by its timer), not by the writers too: at least
        // twice a tick when each batch's first notice woke it.
        assert!(
            during <= ticks + 3,
            "the task was polled {during} times in {ticks} ticks of writes"
        );
        let parked = polls.load(Ordering::Relaxed);
        tokio::time::sleep(LINGER * 100).await;
        assert_eq!(polls.load(Ordering::Relaxed), parked, "parked when idle");
        // Sparse notices wake it, and each goes out at once.
        for i in 0..5 {
            let sent_at = tokio::time::Instant::now();
            tx.send(notice(i)).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let last = *recorder.published().last().unwrap();
            assert_eq!(last, (sent_at, 1), "sparse notice {i} published at once");
            tokio::time::sleep(LINGER * 3).await;
        }
        assert!(tokio::time::Instant::now() - start >= LINGER * ticks as u32);
    }

    #[test]
    fn at_most_one_notice_a_linger_goes_with_its_write() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let publisher = Publisher {
            tx: tx.clone(),
            inline: Some(Inline::new()),
        };
        let key = KeyLayout::new("cachet:", "users").unwrap().key("a b");
        let notice = publisher.inline_key(&key).expect("the first goes inline");
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(notice.channel()).arg(notice.line());
        let args: Vec<String> = (publish.args_iter())
            .map(|a| match a {
                redis::Arg::Simple(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
                _ => panic!("not a plain argument"),
            })
            .collect();
        assert_eq!(args[1], "cachet:users:sys:bus");
        assert_eq!(parse(&args[2]), vec![Notice::Key(key.clone())]);

        assert!(publisher.inline_key(&key).is_none(), "queued within LINGER");
        std::thread::sleep(LINGER);
        assert!(publisher.inline_key(&key).is_some(), "inline after LINGER");

        // On a cluster, every notice is queued.
        let cluster = Publisher { tx, inline: None };
        assert!(cluster.inline_key(&key).is_none());
    }

    #[test]
    fn messages_parse_back() {
        let layout = KeyLayout::new("cachet:", "users").unwrap();
        let k = layout.key("a b\nc");
        let g = layout.group_key("acme");
        let t = layout.tag_key("red");
        let payload = format!(
            "k {}\ng {}\nx junk\nk not-a-key\nt {}\nt not-a-tag",
            k.as_str(),
            g.as_str(),
            t.as_str()
        );
        assert_eq!(
            parse(&payload),
            vec![Notice::Key(k), Notice::Group(g), Notice::Tag(t)]
        );
        assert_eq!(channel("cachet:users"), "cachet:users:sys:bus");
    }

    #[test]
    fn a_batch_is_one_message_per_channel_that_parses_back_in_order() {
        let users = KeyLayout::new("cachet:", "users").unwrap();
        let orders = KeyLayout::new("cachet:", "orders").unwrap();
        let (k1, k2) = (users.key("a b\nc"), users.key(&7_u64));
        let (g, t) = (users.group_key("acme"), orders.tag_key("red"));
        let k3 = orders.key("x");
        let mut batch = Batch::default();
        batch.add("k ", k1.as_str(), k1.head().len());
        batch.add("t ", t.as_str(), t.head().len());
        batch.add("g ", g.as_str(), g.head().len());
        batch.add("k ", k2.as_str(), k2.head().len());
        batch.add("k ", k3.as_str(), k3.head().len());
        let messages: Vec<(&str, u64, Vec<Notice>)> = batch
            .messages
            .iter()
            .map(|m| (m.channel.as_str(), m.notices, parse(&m.lines)))
            .collect();
        assert_eq!(
            messages,
            vec![
                (
                    "cachet:users:sys:bus",
                    3,
                    vec![Notice::Key(k1), Notice::Group(g), Notice::Key(k2)]
                ),
                (
                    "cachet:orders:sys:bus",
                    2,
                    vec![Notice::Tag(t), Notice::Key(k3)]
                ),
            ]
        );
    }

    #[test]
    fn a_cleared_batch_keeps_only_the_channels_it_used_and_starts_empty() {
        let users = KeyLayout::new("cachet:", "users").unwrap();
        let orders = KeyLayout::new("cachet:", "orders").unwrap();
        let (u1, u2, o) = (users.key("1"), users.key("2"), orders.key("x"));
        let ready = |batch: &Batch| -> Vec<(String, u64, Vec<Notice>)> {
            batch
                .ready()
                .map(|m| (m.channel.clone(), m.notices, parse(&m.lines)))
                .collect()
        };
        let mut batch = Batch::default();
        batch.add("k ", u1.as_str(), u1.head().len());
        batch.add("k ", o.as_str(), o.head().len());
        batch.clear();
        assert_eq!(ready(&batch), vec![]);
        assert_eq!(batch.messages.len(), 2, "both channels were used");

        // A batch with notices for one channel only.
        batch.add("k ", u2.as_str(), u2.head().len());
        assert_eq!(
            ready(&batch),
            vec![(
                "cachet:users:sys:bus".to_owned(),
                1,
                vec![Notice::Key(u2.clone())]
            )]
        );
        assert_eq!(batch.messages[0].lines, format!("k {}", u2.as_str()));
        batch.clear();
        assert_eq!(batch.messages.len(), 1, "the idle channel went");
        assert_eq!(batch.messages[0].channel, "cachet:users:sys:bus");
    }
}
