//! A store on Redis Sentinel: configuration errors, bounded connects, and the
//! invalidation bus following the primary across a failover. (A cache's
//! workload across failovers: `crates/cachet/tests/sentinel.rs`.)

use std::time::{Duration, Instant};

use cachet_core::{BusEvent, KeyLayout, Notice, Store, StoreErrorKind};
use cachet_redis::RedisStore;
use cachet_testkit::{RedisSentinels, ScriptedSentinel, eventually};
use tokio::sync::mpsc;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The longest wait for a state a test brings about.
const LIMIT: Duration = Duration::from_secs(10);

/// A store on the sentinels at `urls` that gives up quickly: calls within
/// 200 ms, connects within 500 ms.
fn quick_for(urls: Vec<String>, master: &str) -> cachet_redis::RedisStoreBuilder {
    RedisStore::sentinel_builder(urls, master)
        .response_timeout(Duration::from_millis(200))
        .connection_timeout(Duration::from_millis(500))
}

/// [`quick_for`] the sentinels' usual master.
fn quick(urls: Vec<String>) -> cachet_redis::RedisStoreBuilder {
    quick_for(urls, RedisSentinels::MASTER)
}

async fn next_event(events: &mut mpsc::Receiver<BusEvent>) -> BusEvent {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("no bus event within 10 s")
        .expect("subscription closed")
}

#[tokio::test]
async fn unreachable_sentinels_fail_within_the_connection_timeout() {
    let urls = [
        format!("redis://:sentinel-secret@127.0.0.1:{}/", free_port()),
        format!("redis://127.0.0.1:{}/", free_port()),
    ];
    let started = Instant::now();
    let e = RedisStore::sentinel_builder(urls.clone(), "mymaster")
        .node_auth("app", "node-secret")
        .connection_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.kind(),
            StoreErrorKind::Unavailable | StoreErrorKind::Timeout
        ),
        "{e:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let shown = format!(
        "{e} {e:?} {:?}",
        RedisStore::sentinel_builder(urls, "m").node_auth("a", "node-secret")
    );
    assert!(!shown.contains("secret"), "{shown}");
}

/// A sentinel that accepts connections and never answers: past the
/// connection timeout, the error names the master it was asked for.
#[tokio::test]
async fn a_silent_sentinel_fails_naming_the_master() {
    // Connections complete in the listener's backlog; nothing reads them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://127.0.0.1:{}/", silent.local_addr().unwrap().port());
    let e = RedisStore::sentinel_builder([url], "mymaster")
        .connection_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e:?}");
    let text = e.to_string();
    assert!(text.contains("\"mymaster\""), "{text}");
    assert!(text.contains("300ms"), "{text}");
}

#[tokio::test]
async fn sentinel_settings_are_checked() {
    let none: [&str; 0] = [];
    let e = RedisStore::connect_sentinel(&none, "mymaster")
        .await
        .unwrap_err();
    assert!(e.kind() == StoreErrorKind::Config, "{e:?}");
    let e = RedisStore::connect_sentinel(&["redis://127.0.0.1:1/", "rediss://127.0.0.1:2/"], "m")
        .await
        .unwrap_err();
    assert!(e.kind() == StoreErrorKind::Config, "{e:?}");
    // Credentials for data nodes only make sense when the sentinels name them.
    let e = RedisStore::builder("redis://127.0.0.1:1/")
        .node_auth("app", "pw")
        .connect()
        .await
        .unwrap_err();
    assert!(e.kind() == StoreErrorKind::Config, "{e:?}");
    let e = RedisStore::builder("redis://127.0.0.1:1/")
        .node_database(3)
        .connect()
        .await
        .unwrap_err();
    assert!(e.kind() == StoreErrorKind::Config, "{e:?}");
    assert!(e.to_string().contains("node_database"), "{e}");
}

/// A sentinel that accepts connections and never answers, listed first, does
/// not hold up finding the primary through the others.
#[tokio::test]
async fn a_mute_sentinel_listed_first_does_not_hold_up_the_others() {
    let sentinels = RedisSentinels::start();
    // Listening, never accepting: connects succeed, nothing ever answers.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut urls = vec![format!(
        "redis://127.0.0.1:{}/",
        mute.local_addr().unwrap().port()
    )];
    urls.extend(sentinels.sentinel_urls());
    // The default connection timeout (1 s): redis-rs gives up on the mute
    // one after its own, also 1 s.
    let store = RedisStore::sentinel_builder(urls, RedisSentinels::MASTER)
        .connect()
        .await
        .unwrap();
    let pong: String = redis::cmd("PING")
        .query_async(&mut store.connection())
        .await
        .unwrap();
    assert_eq!(pong, "PONG");
}

/// The store, and a connection of its own, use the database given.
#[tokio::test]
async fn the_primary_is_used_on_the_database_given() {
    let sentinels = RedisSentinels::start();
    let store = RedisStore::sentinel_builder(sentinels.sentinel_urls(), RedisSentinels::MASTER)
        .node_database(3)
        .connect()
        .await
        .unwrap();
    let db_of = |info: String| {
        info.split_whitespace()
            .find_map(|f| f.strip_prefix("db="))
            .map(str::to_owned)
    };
    let info: String = redis::cmd("CLIENT")
        .arg("INFO")
        .query_async(&mut store.connection())
        .await
        .unwrap();
    assert_eq!(db_of(info).as_deref(), Some("3"));
    let mut own = store.own_connection(Duration::from_secs(1)).await.unwrap();
    let info: String = redis::cmd("CLIENT")
        .arg("INFO")
        .query_async(&mut own)
        .await
        .unwrap();
    assert_eq!(db_of(info).as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_follows_the_primary_across_a_failover() {
    let mut sentinels = RedisSentinels::start();
    let connect = |master: &str| quick_for(sentinels.sentinel_urls(), master).connect();
    // A name the sentinels do not know is an error that names it.
    let e = connect("nosuchmaster").await.unwrap_err();
    assert!(e.kind() == StoreErrorKind::Unavailable, "{e:?}");
    assert!(e.to_string().contains("nosuchmaster"), "{e}");

    let (reader, writer) = (
        connect(RedisSentinels::MASTER).await.unwrap(),
        connect(RedisSentinels::MASTER).await.unwrap(),
    );
    let key = KeyLayout::new("cachet:", "sentinel-bus").unwrap().key("k");
    let bus = reader.bus().expect("RedisStore has a bus");
    let mut events = bus.subscribe_invalidations(key.head()).await.unwrap();
    assert!(matches!(next_event(&mut events).await, BusEvent::Connected));
    writer.invalidate(&key).await.unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        BusEvent::Notices(_)
    ));

    sentinels.node_mut(0).kill();
    let new = tokio::task::block_in_place(|| sentinels.wait_for_new_primary(0));
    // The subscription is lost with the old primary, and comes back.
    assert!(matches!(next_event(&mut events).await, BusEvent::Lost));
    assert!(matches!(next_event(&mut events).await, BusEvent::Connected));
    let channel = format!("{}:sys:bus", key.head());
    assert_eq!(
        sentinels.nodes()[new].command(&["PUBSUB", "NUMSUB", &channel]),
        format!("{channel}\n1"),
        "the subscription is on the new primary"
    );
    // The writer reaches the new primary too, and its notice arrives.
    let mut invalidated = false;
    for _ in 0..100 {
        if writer.invalidate(&key).await.is_ok() {
            invalidated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(invalidated, "the writer did not reach the new primary");
    match next_event(&mut events).await {
        BusEvent::Notices(notices) => {
            assert!(notices.contains(&Notice::Key(key.clone())), "{notices:?}");
        }
        other => panic!("expected notices, got {other:?}"),
    }
}

/// A failover the store does not hear of, because the sentinel whose
/// announcements it follows hangs, is still followed: the store's heartbeat on
/// that subscription finds the sentinel silent and asks the others. Writes
/// reach the new primary while the old one, not yet demoted by the sentinels
/// (seconds after a requested failover), still takes them, and would lose them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_followed_when_the_sentinel_listened_to_hangs() {
    let mut sentinels = RedisSentinels::start();
    let store = quick(sentinels.sentinel_urls()).connect().await.unwrap();
    let listened_to = || tokio::task::block_in_place(|| sentinels.listened_to());
    eventually("the store subscribes to a sentinel", LIMIT, || {
        std::future::ready(!listened_to().is_empty())
    })
    .await;
    let listened = listened_to();
    assert_eq!(
        listened.len(),
        1,
        "the store follows one sentinel's announcements"
    );
    let hung = listened[0];
    sentinels.pause_sentinel(hung);
    let asked = (hung + 1) % 3;
    sentinels.failover_via(asked);

    // The sentinel asked names the replica, which is the primary now.
    eventually("the sentinels fail over", LIMIT, || {
        std::future::ready(tokio::task::block_in_place(|| {
            sentinels.primary_named_by(asked) == Some(1)
                && sentinels.nodes()[1]
                    .command(&["ROLE"])
                    .starts_with("master")
        }))
    })
    .await;

    let reached = writes_reach(&store, &sentinels).await;
    sentinels.resume_sentinel(hung);
    assert_eq!(
        reached,
        Some(true),
        "writes reached the new primary only once the old one was demoted (Some(false)) or never (None)"
    );
}

/// After a sentinel announces a failover, the store goes to the primary the
/// announcement names, even when the sentinel it then asks has not caught up
/// and still names the old primary, which after a requested failover goes on
/// calling itself primary, and taking writes, until the sentinels demote it
/// (seconds later): those writes would be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_failover_is_followed_when_the_sentinel_asked_lags_behind() {
    let sentinels = RedisSentinels::start();
    let (old, new) = (sentinels.nodes()[0].port(), sentinels.nodes()[1].port());
    // The store knows only a sentinel that always names the old primary.
    let lagging = ScriptedSentinel::start(RedisSentinels::MASTER, old);
    let store = quick(vec![lagging.url()]).connect().await.unwrap();
    eventually("the store subscribes to the sentinel", LIMIT, || {
        std::future::ready(lagging.subscribers() > 0)
    })
    .await;
    assert_eq!(
        lagging.subscribers(),
        1,
        "the store follows the announcements"
    );

    sentinels.failover();
    assert_eq!(
        tokio::task::block_in_place(|| sentinels.wait_for_new_primary(0)),
        1
    );
    assert_eq!(lagging.announce(old, new), 1);

    let reached = writes_reach(&store, &sentinels).await;
    assert_eq!(
        reached,
        Some(true),
        "writes did not reach the announced primary while the old one took them"
    );
}

/// Writes through the store until one lands on the new primary (data node 1):
/// `Some(true)` if the old one (node 0) still called itself primary then,
/// `Some(false)` if it had been demoted; `None` if none landed in 1,000 tries
/// or 30 seconds.
async fn writes_reach(store: &RedisStore, sentinels: &RedisSentinels) -> Option<bool> {
    let still_primary =
        |node: &cachet_testkit::RedisServer| node.command(&["ROLE"]).starts_with("master");
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..1_000 {
        if Instant::now() > deadline {
            break;
        }
        let key = format!("probe:{i}");
        let written: Result<(), _> = redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut store.connection())
            .await;
        let (on_new, old_still_primary) = tokio::task::block_in_place(|| {
            let on_new = sentinels.nodes()[1].command(&["EXISTS", &key]) == "1";
            (on_new, still_primary(&sentinels.nodes()[0]))
        });
        if written.is_ok() && on_new {
            return Some(old_still_primary);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}
