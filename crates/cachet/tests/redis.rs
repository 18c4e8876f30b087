//! Redis-only behaviour: corrupt bytes, TTLs on every key, the commands never
//! sent, and degradation when the server goes away.

mod support;

use std::time::Duration;

use cachet::{Cache, Json};

use cachet::store::{Meta, envelope};
use support::Fx;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct User {
    id: u64,
    name: String,
}

type Res<T> = Result<T, std::io::Error>;

fn keys(server: &cachet_testkit::RedisServer) -> Vec<String> {
    let mut all = Vec::new();
    let mut cursor = "0".to_owned();
    for _ in 0..10_000 {
        let reply = server.command(&["SCAN", &cursor, "COUNT", "1000"]);
        let mut lines = reply.lines();
        cursor = lines.next().unwrap().to_owned();
        all.extend(lines.map(str::to_owned));
        if cursor == "0" {
            return all;
        }
    }
    panic!("SCAN did not finish");
}

#[tokio::test]
async fn corrupt_and_foreign_bytes_are_misses_then_replaced() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let cache: Cache<u64, User> = fx.builder("users").build().unwrap();
    let good = move || async move {
        Res::Ok(Some(User {
            id: 1,
            name: "Ada".into(),
        }))
    };

    // Not an envelope at all, and without a TTL: someone else's write.
    let key = cache.store_key(&1);
    assert_eq!(server.command(&["SET", key.as_str(), "garbage"]), "OK");
    assert_eq!(cache.get(&1).await.unwrap(), None);
    assert_eq!(cache.stats().decode_errors, 1);
    assert!(cache.get_or_load(&1, good).await.unwrap().is_some());
    assert_eq!(cache.peek(&1).await.unwrap().unwrap().name, "Ada");
    let pttl: i64 = server.command(&["PTTL", key.as_str()]).parse().unwrap();
    assert!(pttl > 0, "the replacement carries a TTL");

    // A valid envelope whose payload the codec cannot read (a changed type).
    let foreign = envelope::encode(&Meta::default(), b"\xff\xff\xff\xff");
    let key2 = cache.store_key(&2);
    server.command_bytes(&[b"SET", key2.as_str().as_bytes(), &foreign, b"PX", b"60000"]);
    assert_eq!(cache.get(&2).await.unwrap(), None);
    assert!(cache.get_or_load(&2, good).await.unwrap().is_some());
    assert!(cache.peek(&2).await.unwrap().is_some());
    // Each lookup that met the bad bytes counted: get and get_or_load, twice.
    assert_eq!(cache.stats().decode_errors, 4, "{:?}", cache.stats());

    // A cachet entry with one payload byte changed (a flipped bit, a bad
    // write) still decodes by the codec, to another value: the checksum
    // makes it a miss instead.
    let cache: Cache<u64, String> = fx.builder("changed").build().unwrap();
    cache.set(&3, "Ada".into()).await.unwrap();
    let key3 = cache.store_key(&3);
    // The entry ends with "Ada" and the 4-byte checksum: change the "A".
    let len: usize = server.command(&["STRLEN", key3.as_str()]).parse().unwrap();
    let at = (len - 4 - 3).to_string();
    assert_eq!(
        server.command(&["GETRANGE", key3.as_str(), &at, &(len - 5).to_string()]),
        "Ada"
    );
    assert_eq!(
        server.command(&["SETRANGE", key3.as_str(), &at, "E"]),
        len.to_string()
    );
    assert_eq!(cache.get(&3).await.unwrap(), None, "not \"Eda\"");
    assert_eq!(cache.stats().decode_errors, 1);
    let loaded = cache
        .get_or_load(&3, || async { Res::Ok(Some("Ada".to_owned())) })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("Ada"));
    assert_eq!(cache.peek(&3).await.unwrap().as_deref(), Some("Ada"));
}

/// Keys of another type where entries live, and a lease key without a TTL
/// (planted, or left by something else): an entry is replaced by the next
/// load, a TTL-less lease is taken over at once, and nothing fails or waits
/// its whole lease wait.
#[tokio::test]
async fn foreign_types_and_ttl_less_leases_are_replaced() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let cache: Cache<u64, String> = fx
        .builder("planted")
        .lease_wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let grouped: Cache<(u64, u64), String> = fx
        .builder("planted-groups")
        .group_by(|k: &(u64, u64)| k.0)
        .lease_wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let list = cache.store_key(&1);
    assert_eq!(server.command(&["RPUSH", list.as_str(), "x"]), "1");
    let glist = grouped.store_key(&(7, 1));
    assert_eq!(server.command(&["RPUSH", glist.as_str(), "x"]), "1");
    let stuck = cache.store_key(&2);
    assert_eq!(server.command(&["SET", &stuck.lease_key(), "no TTL"]), "OK");
    let gstuck = grouped.store_key(&(7, 2));
    assert_eq!(
        server.command(&["SET", &gstuck.lease_key(), "no TTL"]),
        "OK"
    );

    let load = |v: &str| {
        let v = v.to_owned();
        move || async move { Res::Ok(Some(v)) }
    };
    assert_eq!(cache.get(&1).await.unwrap(), None, "a list is no entry");
    let garbage = cache.store_key(&3);
    assert_eq!(server.command(&["SET", garbage.as_str(), "x"]), "OK");
    // Keys without a TTL, which cachet never writes: no entry's TTL either.
    for key in [1, 3] {
        assert_eq!(cache.ttl(&key).await.unwrap(), None, "key {key}");
    }
    assert_eq!(grouped.ttl(&(7, 1)).await.unwrap(), None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (key, value) in [(1, "one"), (2, "two")] {
        let got = tokio::time::timeout_at(deadline, cache.get_or_load(&key, load(value)));
        assert_eq!(
            got.await.expect("no lease wait").unwrap().as_deref(),
            Some(value)
        );
        assert_eq!(
            cache.peek(&key).await.unwrap().as_deref(),
            Some(value),
            "cached"
        );
    }
    for (key, value) in [((7, 1), "g-one"), ((7, 2), "g-two")] {
        let got = tokio::time::timeout_at(deadline, grouped.get_or_load(&key, load(value)));
        assert_eq!(
            got.await.expect("no lease wait").unwrap().as_deref(),
            Some(value)
        );
        assert_eq!(
            grouped.peek(&key).await.unwrap().as_deref(),
            Some(value),
            "cached"
        );
    }
    assert_eq!(cache.stats().store_errors + grouped.stats().store_errors, 0);
    assert_eq!(cache.stats().lease_waits + grouped.stats().lease_waits, 0);
    for key in [&list, &glist, &stuck, &gstuck] {
        let pttl: i64 = server.command(&["PTTL", key.as_str()]).parse().unwrap();
        assert!(pttl > 0, "{key} carries a TTL");
    }
}

/// The same planted keys met by a batch: its one `MGET` reads a list as a
/// miss, and the batch load replaces it and takes over the TTL-less lease.
#[tokio::test]
async fn a_batch_replaces_foreign_types_and_ttl_less_leases() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let cache: Cache<u64, String> = fx
        .builder("planted-batch")
        .lease_wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let list = cache.store_key(&1);
    assert_eq!(server.command(&["RPUSH", list.as_str(), "x"]), "1");
    let stuck = cache.store_key(&2);
    assert_eq!(server.command(&["SET", &stuck.lease_key(), "no TTL"]), "OK");

    assert_eq!(cache.get_many(&[1, 2, 3]).await.unwrap(), vec![None; 3]);
    let loader = |ids: Vec<u64>| async move {
        Res::Ok(
            ids.into_iter()
                .map(|id| (id, format!("v{id}")))
                .collect::<std::collections::HashMap<_, _>>(),
        )
    };
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        cache.get_or_load_many(&[1, 2, 3], loader),
    )
    .await
    .expect("no lease wait")
    .unwrap();
    let want: Vec<_> = (1..=3).map(|id| Some(format!("v{id}"))).collect();
    assert_eq!(got, want);
    assert_eq!(cache.get_many(&[1, 2, 3]).await.unwrap(), want, "cached");
    let s = cache.stats();
    assert_eq!((s.store_errors, s.lease_waits), (0, 0), "{s:?}");
    for key in [&list, &stuck] {
        let pttl: i64 = server.command(&["PTTL", key.as_str()]).parse().unwrap();
        assert!(pttl > 0, "{key} carries a TTL");
    }
}

#[tokio::test]
async fn values_written_with_one_codec_are_misses_for_another() {
    let fx = Fx::redis().await;
    let postcard: Cache<u64, User> = fx.builder("users").build().unwrap();
    let json: Cache<u64, User> = fx.builder("users").codec(Json).build().unwrap();
    postcard
        .set(
            &1,
            User {
                id: 1,
                name: "Ada".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(json.get(&1).await.unwrap(), None);
    assert_eq!(json.stats().decode_errors, 1);
}

/// After a mixed workload, every key in Redis has a TTL, and the server never
/// received KEYS, FLUSHDB or FLUSHALL.
#[tokio::test]
async fn every_key_has_a_ttl_and_no_forbidden_command_is_sent() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let cache: Cache<u64, User> = fx.builder("users").build().unwrap();
    for id in 0..200u64 {
        cache
            .get_or_load(&id, move || async move {
                Res::Ok((id % 3 != 0).then(|| User {
                    id,
                    name: format!("u{id}"),
                }))
            })
            .await
            .unwrap();
        if id % 5 == 0 {
            cache.invalidate(&id).await.unwrap();
        }
        if id % 11 == 0 {
            cache
                .invalidate_twice(&id, Duration::from_secs(60))
                .await
                .unwrap();
        }
        if id % 7 == 0 {
            cache
                .set(
                    &id,
                    User {
                        id,
                        name: "set".into(),
                    },
                )
                .await
                .unwrap();
        }
    }
    // Leave a lease behind too: a load cancelled mid-way.
    let stuck = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(&9999, move || async move {
                    std::future::pending::<()>().await;
                    Res::Ok(None)
                })
                .await
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !server
        .command(&["EXISTS", &cache.store_key(&9999).lease_key()])
        .starts_with('1')
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never appeared"
        );
        tokio::task::yield_now().await;
    }
    let all = keys(server);
    assert!(all.len() > 100, "{} keys", all.len());
    let mut system = 0;
    for key in &all {
        let pttl: i64 = server.command(&["PTTL", key]).parse().unwrap();
        if key.contains(":sys:") {
            // System structures (the deferred-invalidation queue) may live without one.
            system += 1;
            continue;
        }
        assert!(pttl > 0, "{key} has PTTL {pttl}");
    }
    assert!(system > 0, "the workload queued deferred invalidations");
    stuck.abort();
    let stats = server.command(&["INFO", "commandstats"]);
    for forbidden in ["cmdstat_keys:", "cmdstat_flushdb:", "cmdstat_flushall:"] {
        assert!(!stats.contains(forbidden), "{forbidden} in\n{stats}");
    }
    assert!(
        stats.contains("cmdstat_evalsha:"),
        "scripts run by SHA:\n{stats}"
    );
}

/// Scripts are loaded again after the server forgets them (a restart, SCRIPT FLUSH).
#[tokio::test]
async fn scripts_survive_script_flush() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let cache: Cache<u64, u64> = fx.builder("n").build().unwrap();
    cache
        .get_or_load(&1, move || async move { Res::Ok(Some(1)) })
        .await
        .unwrap();
    assert_eq!(server.command(&["SCRIPT", "FLUSH"]), "OK");
    cache
        .get_or_load(&2, move || async move { Res::Ok(Some(2)) })
        .await
        .unwrap();
    assert_eq!(cache.peek(&2).await.unwrap(), Some(2));
}

/// With Redis gone, reads fall through to the loader with bounded latency and
/// no error; writes report the failure; everything works again after a restart.
#[tokio::test]
async fn a_dead_server_degrades_to_the_source_and_recovers() {
    let mut fx = Fx::redis().await;
    let store = cachet::RedisStore::builder(fx.server().unwrap().url())
        .response_timeout(Duration::from_millis(200))
        .connection_timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let cache: Cache<u64, u64> = Cache::builder("n").store(store).build().unwrap();
    cache.set(&1, 1).await.unwrap();

    fx.server_mut().unwrap().kill();
    let v = tokio::time::timeout(
        Duration::from_secs(10),
        cache.get_or_load(&1, move || async move { Res::Ok(Some(10)) }),
    )
    .await
    .expect("bounded by the timeouts")
    .unwrap();
    assert_eq!(v, Some(10), "served by the loader");
    let e = cache.get(&1).await.unwrap_err();
    assert!(e.is_store(), "{e}");
    assert!(e.to_string().contains("key `1`"), "{e}");
    assert!(cache.invalidate(&1).await.unwrap_err().is_store());
    assert!(cache.stats().store_errors >= 3);

    fx.server_mut().unwrap().restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if cache.set(&2, 2).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cache.get(&2).await.unwrap(), Some(2));
}

/// A value over what the server accepts (`proto-max-bulk-len`, read at connect)
/// is refused before it is sent, naming the key, the size and the limit; the
/// connection every other call shares is never closed by the server, so
/// concurrent reads of other keys all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_value_is_refused_before_it_is_sent_and_disturbs_no_other_key() {
    let server = cachet_testkit::RedisServer::start_with(cachet_testkit::RedisServerOptions {
        extra_args: vec![("proto-max-bulk-len".into(), "1mb".into())],
        ..Default::default()
    });
    let store = cachet::RedisStore::connect(&server.url()).await.unwrap();
    let cache: Cache<u64, Vec<u8>> = Cache::builder("big").store(store).build().unwrap();
    for k in 0..10 {
        cache.set(&k, vec![7; 100]).await.unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (cache, stop) = (cache.clone(), std::sync::Arc::clone(&stop));
            tokio::spawn(async move {
                let (mut reads, mut errors) = (0u64, 0u64);
                for i in 0..1_000_000u64 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    match cache.get(&(i % 10)).await {
                        Ok(Some(_)) => reads += 1,
                        _ => errors += 1,
                    }
                }
                (reads, errors)
            })
        })
        .collect();

    let big = vec![1u8; 2 * 1024 * 1024];
    for _ in 0..5 {
        let e = cache.set(&99, big.clone()).await.unwrap_err();
        assert_eq!(e.kind(), cachet::ErrorKind::TooLarge, "{e}");
        let text = e.to_string();
        assert!(text.contains("key `99`"), "{text}");
        assert!(text.contains("bytes, over the limit of"), "{text}");
        // The server's limit, not one given to the builder.
        assert!(text.contains("proto-max-bulk-len"), "{text}");
        assert!(!text.contains("max_value_bytes"), "{text}");
        let size: usize = (text.split("the encoded value is ").nth(1))
            .and_then(|rest| rest.split(' ').next()?.parse().ok())
            .expect("the size");
        assert!(size > big.len(), "{text}");
        // Loaded: returned, not cached.
        let got = cache
            .get_or_load(&98, || async { Res::Ok(Some(vec![2u8; 2 * 1024 * 1024])) })
            .await
            .unwrap();
        assert_eq!(got.map(|v| v.len()), Some(2 * 1024 * 1024));
        assert_eq!(cache.peek(&98).await.unwrap(), None);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        let (reads, errors) = reader.await.unwrap();
        assert_eq!(errors, 0, "{reads} reads of other keys, {errors} failed");
    }
    // A limit of the cache's own, below the server's, wins.
    let store = cachet::RedisStore::connect(&server.url()).await.unwrap();
    let small: Cache<u64, Vec<u8>> = Cache::builder("big")
        .store(store)
        .max_value_bytes(1000)
        .build()
        .unwrap();
    small.set(&1, vec![0; 900]).await.unwrap();
    let e = small.set(&1, vec![0; 1000]).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("over the limit of 1000 bytes (max_value_bytes)"),
        "{e}"
    );
}

/// The ACL user docs/production.md describes is enough: reads, loads, writes,
/// invalidations, groups and a near cache work with it, without `CONFIG` or
/// `INFO`, and keys outside the prefix stay out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_user_is_enough() {
    let server = cachet_testkit::RedisServer::start();
    let acl = [
        "ACL",
        "SETUSER",
        "app",
        "on",
        ">app-pw",
        "resetkeys",
        "~cachet:*",
        "resetchannels",
        "&cachet:*",
        "-@all",
        "+@read",
        "+@write",
        "+@scripting",
        "+@pubsub",
        "+ping",
        "+time",
        "+wait",
    ];
    assert_eq!(server.command(&acl), "OK");
    let url = format!("redis://app:app-pw@127.0.0.1:{}/", server.port());
    let connect = || async {
        let store = cachet::RedisStore::connect(&url).await.unwrap();
        Cache::<u64, String>::builder("acl")
            .store(store)
            .group_by(|k: &u64| k % 2)
            .near_cache(cachet::NearCache::new(100, Duration::from_secs(60)))
            .build()
            .unwrap()
    };
    let (a, b) = (connect().await, connect().await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.stats().near_clears == 0 || b.stats().near_clears == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        tokio::task::yield_now().await;
    }
    let loaded = a
        .get_or_load(&1, || async { Res::Ok(Some("one".to_owned())) })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("one"));
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("one"));
    a.set(&2, "two".into()).await.unwrap();
    a.invalidate(&1).await.unwrap();
    a.invalidate_group(&0u64).await.unwrap();
    assert_eq!(a.get(&2).await.unwrap(), None);
    a.close(Duration::from_secs(5)).await.unwrap();
    assert_eq!(a.stats().store_errors, 0);
    assert_eq!(b.stats().store_errors, 0);
    let denied = server.command(&["ACL", "DRYRUN", "app", "GET", "other:key"]);
    assert!(denied.contains("no permissions"), "{denied}");
}

/// Counts the store calls of a cache: entry reads and reads of tag generations.
#[derive(Debug, Default)]
struct Count {
    gets: std::sync::atomic::AtomicU64,
    tag_reads: std::sync::atomic::AtomicU64,
}

impl cachet::store::StoreLayer for Count {
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: cachet::store::Op<'a>,
        call: cachet::store::StoreFuture<'a, T>,
    ) -> cachet::store::StoreFuture<'a, T> {
        use std::sync::atomic::Ordering::Relaxed;
        match op {
            cachet::store::Op::Get(_) => self.gets.fetch_add(1, Relaxed),
            cachet::store::Op::ReadTags(_) => self.tag_reads.fetch_add(1, Relaxed),
            _ => 0,
        };
        call
    }
}

/// The server's byte counters: (received from clients, sent to them).
fn net_bytes(server: &cachet_testkit::RedisServer) -> (u64, u64) {
    let info = server.command(&["INFO", "stats"]);
    let field = |name: &str| -> u64 {
        let line = info.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len() + 1..].trim().parse().unwrap()
    };
    (
        field("total_net_input_bytes"),
        field("total_net_output_bytes"),
    )
}

/// What a tagged hit costs on Redis, measured: the store calls of a hit (a
/// counting layer) and the bytes on the wire (the server's own counters), for
/// entries with 0, 1, 3 and 8 tags. The extra bytes are checked against the
/// RESP sizes of the one `MGET` a tagged hit adds and of the tags in the
/// entry, so the cost the docs of `tags_by` state is the cost paid.
#[tokio::test]
async fn a_tagged_hit_costs_one_mget_and_its_tags_bytes() {
    use std::sync::atomic::Ordering::Relaxed;
    const HITS: u64 = 200;
    let server = cachet_testkit::RedisServer::start();
    let store = cachet::RedisStore::connect(&server.url()).await.unwrap();
    let mut untagged_bytes = 0.0;
    for n in [0usize, 1, 3, 8] {
        let count =
            std::sync::Arc::new(cachet::store::Layered::new(Count::default(), store.clone()));
        let tags: Vec<String> = (1..=n).map(|i| format!("t{i}")).collect();
        let of = tags.clone();
        let cache: Cache<u64, User> = Cache::builder(format!("cost{n}"))
            .store(std::sync::Arc::clone(&count))
            .circuit_breaker(None)
            .tags_by(move |_: &u64, _: &User| of.clone())
            .build()
            .unwrap();
        let user = User {
            id: 1,
            name: "a name".into(),
        };
        cache.set(&1, user.clone()).await.unwrap();
        let (gets, tag_reads) = (
            count.layer().gets.load(Relaxed),
            count.layer().tag_reads.load(Relaxed),
        );
        let (in0, out0) = net_bytes(&server);
        for _ in 0..HITS {
            assert_eq!(cache.get(&1).await.unwrap().as_ref(), Some(&user));
        }
        let (in1, out1) = net_bytes(&server);
        assert_eq!(
            count.layer().gets.load(Relaxed) - gets,
            HITS,
            "one GET a hit"
        );
        let mgets = count.layer().tag_reads.load(Relaxed) - tag_reads;
        assert_eq!(
            mgets,
            if n == 0 { 0 } else { HITS },
            "{n} tags: one MGET a hit"
        );
        // The INFO call between the counters adds a few bytes of its own.
        let per_hit = ((in1 - in0) + (out1 - out0)) as f64 / HITS as f64;
        eprintln!("{n} tags: {per_hit:.1} bytes on the wire per hit ({mgets} MGETs)");
        if n == 0 {
            untagged_bytes = per_hit;
            continue;
        }
        // RESP: `*<n+1>\r\n$4\r\nMGET\r\n` then `$<len>\r\n<key>\r\n` per key;
        // the reply `*<n>\r\n` then `$16\r\n<16 digits>\r\n` per generation;
        // the entry carries 1 byte, then 9 bytes and the name per tag.
        let keys: usize = (tags.iter())
            .map(|t| {
                let key = cache.layout().tag_key(t.as_str());
                let len = key.as_str().len();
                len.to_string().len() + 3 + len + 2
            })
            .sum();
        let request = format!("*{}\r\n$4\r\nMGET\r\n", n + 1).len() + keys;
        let reply = format!("*{n}\r\n").len() + n * "$16\r\n0123456789012345\r\n".len();
        let envelope = 1 + tags.iter().map(|t| 9 + t.len()).sum::<usize>();
        let expected = (request + reply + envelope) as f64;
        let extra = per_hit - untagged_bytes;
        eprintln!("{n} tags: {extra:.1} bytes more than untagged, {expected} expected");
        assert!(
            (extra - expected).abs() < 2.0,
            "{n} tags: {extra} bytes more, {expected} expected"
        );
    }
}

/// An entry stores only the header fields it sets: a loaded 100-byte value
/// of a cache with a TTL alone takes 2 bytes of header and 4 of checksum, and
/// about the memory of a plain `SET` of the value (within 15 %). With a soft
/// expiry, the entry also keeps its soft expiry and its load time.
#[tokio::test]
async fn an_entry_stores_only_the_header_fields_it_sets() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let value = "v".repeat(100);
    let plain: Cache<u64, String> = fx.builder("users").build().unwrap();
    let soft: Cache<u64, String> = fx
        .builder("soft")
        .stale_while_revalidate(Duration::from_secs(10))
        .build()
        .unwrap();
    for cache in [&plain, &soft] {
        let v = value.clone();
        let loaded = cache
            .get_or_load(&12345, move || async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Res::Ok(Some(v))
            })
            .await
            .unwrap();
        assert_eq!(loaded.as_deref(), Some(value.as_str()));
    }
    let strlen = |key: &str| -> usize { server.command(&["STRLEN", key]).parse().unwrap() };
    // postcard: 1 length byte, then the 100 bytes.
    let payload = 1 + value.len();
    assert_eq!(strlen(plain.store_key(&12345).as_str()), 2 + payload + 4);
    // Soft expiry (8 bytes) and load time (4).
    assert_eq!(
        strlen(soft.store_key(&12345).as_str()),
        2 + 8 + 4 + payload + 4
    );

    server.command(&["SET", "users:12345", &value]);
    let usage = |key: &str| -> u64 {
        server
            .command(&["MEMORY", "USAGE", key, "SAMPLES", "0"])
            .parse()
            .unwrap()
    };
    let (entry, set) = (
        usage(plain.store_key(&12345).as_str()),
        usage("users:12345"),
    );
    assert!(
        entry * 100 <= set * 115,
        "an entry takes {entry} B, a plain SET of the value {set} B"
    );
}
