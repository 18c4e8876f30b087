//! The store conformance suite on a real `redis-server`, one per test.

use std::sync::Arc;
use std::time::Duration;

use cachet_core::{KeyLayout, Store, StoreKey};
use cachet_redis::RedisStore;
use cachet_testkit::RedisServer;
use cachet_testkit::conformance::{BoxFuture, Harness, KeyTtl};

struct RedisHarness {
    store: RedisStore,
    server: RedisServer,
}

impl RedisHarness {
    async fn new() -> Self {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        Self { store, server }
    }
}

impl Harness for RedisHarness {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    fn layout(&self) -> KeyLayout {
        KeyLayout::new("cachet:", "conformance").unwrap()
    }

    fn advance(&self, by: Duration) -> BoxFuture<'_, ()> {
        // Redis expires keys on its own clock; the only way to let time pass is to wait.
        Box::pin(tokio::time::sleep(by))
    }

    fn ttl<'a>(&'a self, key: &'a StoreKey, lease: bool) -> BoxFuture<'a, KeyTtl> {
        let name = if lease {
            key.lease_key()
        } else {
            key.as_str().to_owned()
        };
        let reply = self.server.command(&["PTTL", &name]);
        Box::pin(async move {
            match reply.parse::<i64>() {
                Ok(-2) => KeyTtl::Absent,
                Ok(-1) => KeyTtl::Persistent,
                Ok(ms) => KeyTtl::Expires(Duration::from_millis(ms.unsigned_abs())),
                Err(_) => panic!("PTTL {name}: {reply}"),
            }
        })
    }

    fn write_raw<'a>(&'a self, key: &'a StoreKey, bytes: &'a [u8]) -> Option<BoxFuture<'a, ()>> {
        let text = std::str::from_utf8(bytes).expect("raw test bytes are UTF-8");
        assert_eq!(self.server.command(&["SET", key.as_str(), text]), "OK");
        Some(Box::pin(async {}))
    }
}

cachet_testkit::conformance_tests!(RedisHarness::new().await);

/// A stalled server delivers no notice: a subscription whose ping goes
/// unanswered for a heartbeat reports the loss while the server is still
/// paused, so that near caches stop serving what they hold.
#[tokio::test]
async fn a_paused_server_is_a_lost_subscription_within_two_heartbeats() {
    use cachet_core::BusEvent;

    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .eviction_check(false)
        .bus_heartbeat(Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let layout = KeyLayout::new("cachet:", "heartbeat").unwrap();
    let mut events = listening(&store, &layout).await;

    const PAUSE: Duration = Duration::from_millis(1500);
    let paused_at = tokio::time::Instant::now();
    server.command(&["CLIENT", "PAUSE", &PAUSE.as_millis().to_string(), "ALL"]);
    let next = tokio::time::timeout(PAUSE * 4, events.recv()).await;
    assert!(matches!(next, Ok(Some(BusEvent::Lost))), "{next:?}");
    // Two heartbeats are 100 ms; the pause is fifteen times that.
    let took = paused_at.elapsed();
    assert!(
        took < PAUSE,
        "the loss was reported after the pause ended: {took:?}"
    );
}

/// A subscription of `store` to the channel of `layout`'s cache, connected.
async fn listening(
    store: &RedisStore,
    layout: &KeyLayout,
) -> tokio::sync::mpsc::Receiver<cachet_core::BusEvent> {
    let bus = store.bus().expect("RedisStore has a bus");
    let mut events = bus
        .subscribe_invalidations(layout.key("k").head())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    assert!(
        matches!(first, Ok(Some(cachet_core::BusEvent::Connected))),
        "{first:?}"
    );
    events
}

/// A store on `server` with the library's defaults.
async fn store_on(server: &RedisServer) -> RedisStore {
    RedisStore::builder(server.url())
        .eviction_check(false)
        .connect()
        .await
        .unwrap()
}

/// The keys noticed on `events` until `want` came, or 10 s passed.
async fn noticed(
    events: &mut tokio::sync::mpsc::Receiver<cachet_core::BusEvent>,
    want: usize,
) -> Vec<String> {
    use cachet_core::{BusEvent, Notice};
    let mut keys = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while keys.len() < want {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(BusEvent::Notices(notices))) => {
                keys.extend(notices.into_iter().map(|n| match n {
                    Notice::Key(key) => key.as_str().to_owned(),
                    other => panic!("unexpected {other:?}"),
                }));
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    keys
}

/// A lone write's notice (`invalidate`, `set`, `set_versioned`) leaves in the
/// write's own round trip: it is out once the write returns, even if its process stops right then (here, its
/// runtime, with the task that publishes queued notices). Before, the notice
/// waited in that task's queue and was lost with it.
#[tokio::test]
async fn a_lone_writes_notice_is_out_when_the_write_returns() {
    let server = RedisServer::start();
    let layout = KeyLayout::new("cachet:", "inline").unwrap();
    let listener = store_on(&server).await;
    let mut events = listening(&listener, &layout).await;

    // Each write on a store and runtime of its own, dropped as the write returns.
    let (invalidated, set) = (layout.key("invalidated"), layout.key("set"));
    let versioned = layout.key("versioned");
    let writes = [
        (invalidated.clone(), "invalidate"),
        (set.clone(), "set"),
        (versioned.clone(), "set_versioned"),
    ];
    for (key, write) in writes {
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let store = store_on(&server).await;
                    write_once(&store, &key, write).await;
                });
            });
        });
    }
    assert_eq!(
        noticed(&mut events, 3).await,
        vec![invalidated.as_str(), set.as_str(), versioned.as_str()]
    );
}

/// One write of `key`: `invalidate`, `set` or `set_versioned` (version 1).
async fn write_once(store: &RedisStore, key: &StoreKey, write: &str) {
    use cachet_core::{Entry, Meta, Payload, VersionedSet as _};
    let ttl = Duration::from_secs(60);
    match write {
        "invalidate" => store.invalidate(key).await.unwrap(),
        "set" => store.set(key, Entry::negative(), ttl).await.unwrap(),
        _ => {
            let entry = Entry {
                meta: Meta {
                    version: 1,
                    ..Meta::default()
                },
                payload: Payload::Bytes(bytes::Bytes::from_static(b"v1")),
            };
            let written = store.set_versioned(key, entry, ttl).await.unwrap();
            assert_eq!(written, cachet_core::Versioned::Written);
        }
    }
}

/// Writes in a burst send their notices with the write at most once a
/// millisecond and queue the others for the publishing task: every key is
/// noticed, inline and batched notices mixed, and none failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_of_a_burst_is_noticed() {
    use cachet_core::Entry;
    use std::collections::HashSet;

    let server = RedisServer::start();
    let layout = KeyLayout::new("cachet:", "burst").unwrap();
    let store = store_on(&server).await;
    let mut events = listening(&store, &layout).await;

    let keys: Vec<StoreKey> = (0..400).map(|i| layout.key(&i.to_string())).collect();
    let writes = keys.iter().enumerate().map(|(i, key)| {
        let store = store.clone();
        async move {
            if i % 2 == 0 {
                store.invalidate(key).await
            } else {
                store
                    .set(key, Entry::negative(), Duration::from_secs(60))
                    .await
            }
        }
    });
    for written in futures::future::join_all(writes).await {
        written.unwrap();
    }
    assert_eq!(store.flush().await.unwrap(), 0, "no notice failed");

    let noticed: HashSet<String> = noticed(&mut events, keys.len()).await.into_iter().collect();
    let expected: HashSet<String> = keys.iter().map(|k| k.as_str().to_owned()).collect();
    assert_eq!(noticed, expected);
}

/// A notice the server refuses (here, an ACL user without `PUBLISH`) does not
/// fail the write it goes with, in the `DEL`'s pipeline or in the `SET`
/// script alike: the write is done, and the next flush counts the notice as
/// not published.
#[tokio::test]
async fn a_refused_notice_does_not_fail_its_write() {
    use cachet_core::Read;

    let server = RedisServer::start();
    let acl = [
        "ACL", "SETUSER", "nopub", "on", ">pw", "~*", "&*", "+@all", "-publish",
    ];
    assert_eq!(server.command(&acl), "OK");
    let url = format!("redis://nopub:pw@127.0.0.1:{}/", server.port());
    let layout = KeyLayout::new("cachet:", "refused").unwrap();
    let (invalidated, set) = (layout.key("invalidated"), layout.key("set"));
    let versioned = layout.key("versioned");
    server.command(&["SET", invalidated.as_str(), "old"]);
    // Each write on a store of its own: each sends its notice inline.
    for (key, write) in [
        (&invalidated, "invalidate"),
        (&set, "set"),
        (&versioned, "set_versioned"),
    ] {
        let store = RedisStore::builder(&url)
            .eviction_check(false)
            .connect()
            .await
            .unwrap();
        write_once(&store, key, write).await;
        assert_eq!(
            store.flush().await.unwrap(),
            1,
            "{write}: one notice refused"
        );
        assert_eq!(store.flush().await.unwrap(), 0, "{write}: counted once");
    }
    assert_eq!(server.command(&["EXISTS", invalidated.as_str()]), "0");
    let store = store_on(&server).await;
    for key in [&set, &versioned] {
        assert!(
            matches!(store.get(key).await.unwrap(), Read::Hit(_)),
            "{key}"
        );
    }
}

/// A server that wants a password the URL does not give fails `connect`,
/// saying so and naming the server, instead of a store whose every call
/// fails; with the password, the store connects and works.
#[tokio::test]
async fn a_missing_password_fails_connect() {
    let server = RedisServer::start();
    assert_eq!(
        server.command(&["CONFIG", "SET", "requirepass", "hunter2"]),
        "OK"
    );
    let e = RedisStore::connect(&server.url()).await.unwrap_err();
    let text = e.to_string();
    assert_eq!(e.kind(), cachet_core::StoreErrorKind::Config, "{text}");
    assert!(text.contains("NOAUTH"), "{text}");
    assert!(text.contains(&server.url()), "{text}");
    let url = format!("redis://:hunter2@127.0.0.1:{}/", server.port());
    let store = RedisStore::connect(&url).await.unwrap();
    let key = KeyLayout::new("cachet:", "auth").unwrap().key("1");
    assert!(matches!(
        store.get(&key).await.unwrap(),
        cachet_core::Read::Miss
    ));
}

/// Each level of an error's chain says something of its own: printed cause
/// by cause (as `anyhow`'s `{:#}` does), no cause is shown twice.
#[tokio::test]
async fn an_error_chain_shows_each_cause_once() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let e = RedisStore::connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .unwrap_err();
    let mut levels = vec![e.to_string()];
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        levels.push(s.to_string());
        source = s.source();
    }
    assert!(levels.len() >= 2, "{levels:?}");
    for pair in levels.windows(2) {
        assert!(
            !pair[0].contains(&pair[1]),
            "{:?} shows its cause {:?} again",
            pair[0],
            pair[1]
        );
    }
}
