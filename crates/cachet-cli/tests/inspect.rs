//! `cachet stats` and `cachet inspect` against a server holding entries
//! written through `cachet::Cache`.

use std::time::Duration;

use cachet::{Cache, RedisStore};
use cachet_testkit::RedisServer;
use serde_json::Value;

use crate::util::Cachet;

const LOAD_TIME: Duration = Duration::from_millis(5);

/// Writes through the library: a versioned value with a soft expiry, a
/// negative entry, and a grouped entry orphaned by its group's invalidation.
async fn write_entries(url: &str) {
    let store = RedisStore::connect(url).await.unwrap();
    let users: Cache<u64, String> = Cache::builder("users")
        .ttl(Duration::from_secs(60))
        .jitter(0.0)
        .stale_while_revalidate(Duration::from_secs(30))
        .version_by(|v: &String| v.len() as u64)
        .store(store.clone())
        .build()
        .unwrap();
    let ada = users
        .get_or_load(&42, || async {
            tokio::time::sleep(LOAD_TIME).await;
            Ok::<_, std::io::Error>(Some("Ada Lovelace".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(ada.as_deref(), Some("Ada Lovelace"));
    assert_eq!(users.store_key(&42).as_str(), "cachet:users:v:{42}");
    let nobody = users
        .get_or_load(&7, || async { Ok::<_, std::io::Error>(None) })
        .await
        .unwrap();
    assert_eq!(nobody, None);

    let orders: Cache<u64, String> = Cache::builder("orders")
        .group_by(|id: &u64| id % 2)
        .store(store)
        .build()
        .unwrap();
    for id in [3, 4] {
        orders
            .get_or_load(&id, move || async move {
                Ok::<_, std::io::Error>(Some(format!("order {id}")))
            })
            .await
            .unwrap();
    }
    assert_eq!(orders.store_key(&3).as_str(), "cachet:orders:v:{1}3");
    orders.invalidate_group(&1_u64).await.unwrap();
}

fn inspect(url: &str, args: &[&str]) -> Value {
    let mut lines = Cachet::command("inspect")
        .args(args)
        .args(["--redis-url", url])
        .json();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    lines.remove(0)
}

fn inspect_text(url: &str, args: &[&str]) -> String {
    Cachet::command("inspect")
        .args(args)
        .args(["--redis-url", url])
        .stdout()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn inspect_shows_entries_as_the_cache_wrote_them() {
    let redis = RedisServer::start();
    let url = redis.url();
    write_entries(&url).await;
    redis.command(&[
        "SET",
        "cachet:users:v:{9}",
        "plain text that some other program wrote here",
    ]);
    redis.command(&["RPUSH", "cachet:users:v:{10}", "x"]);

    let u = url.clone();
    tokio::task::spawn_blocking(move || {
        let url = u.as_str();
        // A value: its version, load time, soft expiry and TTLs.
        let v = inspect(url, &["cachet:users:v:{42}"]);
        assert_eq!(v["exists"], true, "{v}");
        assert_eq!(v["state"], "current", "{v}");
        let e = &v["envelope"];
        assert_eq!(e["format_version"], 2, "{v}");
        assert_eq!(e["negative"], false, "{v}");
        assert_eq!(e["version"], 12, "{v}");
        assert_eq!(e["generation"], 0, "{v}");
        assert!(e["load_time_us"].as_u64().unwrap() >= 5_000, "{v}");
        let soft_in = e["soft_expiry_in_ms"].as_i64().unwrap();
        assert!((50_000..=60_000).contains(&soft_in), "{v}");
        assert!(e["soft_expiry_utc"].as_str().unwrap().ends_with('Z'), "{v}");
        // The store keeps it for the stale window on top of the TTL.
        let ttl = v["ttl_ms"].as_u64().unwrap();
        assert!((80_000..=90_000).contains(&ttl), "{v}");
        assert!(v["lease_ttl_ms"].is_null(), "{v}");
        assert!(v["payload_bytes"].as_u64().unwrap() > 0, "{v}");
        assert!(v.get("payload_hex").is_none(), "{v}");

        // The same entry by namespace and key, as text; the payload only on request.
        let text = inspect_text(url, &["--namespace", "users", "--key", "42"]);
        for line in [
            "key           cachet:users:v:{42}",
            "negative      no",
            "version       12",
            "state         current",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        let ada_hex = "416461204c6f76656c616365";
        assert!(!text.contains(ada_hex), "{text}");
        let text = inspect_text(url, &["cachet:users:v:{42}", "--payload"]);
        assert!(text.contains(ada_hex), "{text}");

        // A cached "not found".
        let v = inspect(url, &["--namespace", "users", "--key", "7"]);
        assert_eq!(v["envelope"]["negative"], true, "{v}");
        assert_eq!(v["payload_bytes"], 0, "{v}");
        let ttl = v["ttl_ms"].as_u64().unwrap();
        assert!(ttl > 0 && ttl <= 10_000, "{v}");

        // A grouped entry after its group moved on: orphaned.
        let v = inspect(url, &["cachet:orders:v:{1}3"]);
        assert_eq!(v["state"], "orphaned", "{v}");
        let filled = v["envelope"]["generation"].as_u64().unwrap();
        let now = v["group"]["generation"].as_u64().unwrap();
        assert!(filled > 0 && now != filled, "{v}");
        assert_eq!(v["group"]["generation_key"], "cachet:orders:sys:gen:{1}");
        // Its neighbour in the other group is current.
        let v = inspect(
            url,
            &["--namespace", "orders", "--group", "0", "--key", "4"],
        );
        assert_eq!(v["key"], "cachet:orders:v:{0}4", "{v}");
        assert_eq!(v["state"], "current", "{v}");

        // Bytes that are not an entry, another type, nothing: reported, exit 0.
        let v = inspect(url, &["cachet:users:v:{9}"]);
        assert_eq!(v["state"], "not an entry", "{v}");
        assert!(
            v["decode_error"]
                .as_str()
                .unwrap()
                .contains("format version"),
            "{v}"
        );
        assert_eq!(v["persistent"], true, "{v}");
        let text = inspect_text(url, &["cachet:users:v:{9}"]);
        assert!(text.contains("does not decode"), "{text}");
        assert!(text.contains("no TTL"), "{text}");
        let text = inspect_text(url, &["cachet:users:v:{10}"]);
        assert!(text.contains("holds a list"), "{text}");
        let v = inspect(url, &["cachet:users:v:{404}"]);
        assert_eq!(v["exists"], false, "{v}");
        assert_eq!(v["state"], "missing", "{v}");
        assert!(v["ttl_ms"].is_null(), "{v}");

        // Input that names no entry: an error, not a panic.
        let stderr = Cachet::command("inspect")
            .args(["users:42", "--redis-url", url])
            .failure();
        assert!(stderr.contains("not a cachet entry key"), "{stderr}");
        // With an example whose braces are the key's own.
        assert!(stderr.contains("`cachet:users:v:{42}`"), "{stderr}");
        let stderr = Cachet::command("inspect")
            .args(["--namespace", "sys", "--key", "1", "--redis-url", url])
            .failure();
        assert!(stderr.contains("invalid namespace"), "{stderr}");
    })
    .await
    .unwrap();
}

#[test]
fn inspect_reports_a_lease_key_without_a_ttl_as_not_cachets() {
    let redis = RedisServer::start();
    let url = redis.url();
    redis.command(&["SET", "cachet:users:l:{noexp}", "tok"]);
    redis.command(&["SET", "cachet:users:v:{noexp}", "abc"]);
    redis.command(&["SET", "cachet:users:l:{held}", "tok", "PX", "60000"]);

    let text = inspect_text(&url, &["cachet:users:v:{noexp}"]);
    assert!(
        text.contains("lease         not cachet's: the lease key has no TTL"),
        "{text}"
    );
    assert!(!text.contains("held"), "{text}");
    let v = inspect(&url, &["cachet:users:v:{noexp}"]);
    assert!(v["lease_ttl_ms"].is_null(), "{v}");
    assert_eq!(v["lease_persistent"], true, "{v}");

    // A lease cachet took: held, with its TTL.
    let text = inspect_text(&url, &["cachet:users:v:{held}"]);
    assert!(text.contains("lease         held, expires in"), "{text}");
    let v = inspect(&url, &["cachet:users:v:{held}"]);
    let lease = v["lease_ttl_ms"].as_u64().unwrap();
    assert!(lease > 0 && lease <= 60_000, "{v}");
    assert_eq!(v["lease_persistent"], false, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn inspect_reports_a_generation_key_of_another_type() {
    let redis = RedisServer::start();
    let url = redis.url();
    write_entries(&url).await;
    // The generation of the group of `cachet:orders:v:{0}4`, a current entry,
    // replaced by a hash; and one of a group without entries.
    redis.command(&["DEL", "cachet:orders:sys:gen:{0}"]);
    redis.command(&["HSET", "cachet:orders:sys:gen:{0}", "a", "b"]);
    redis.command(&["HSET", "cachet:users:sys:gen:{g2}", "a", "b"]);
    redis.command(&["SET", "cachet:users:sys:gen:{g3}", "abc"]);

    tokio::task::spawn_blocking(move || {
        let url = url.as_str();
        // The cache counts a generation of another type as none and replaces
        // it: the entry is never read again.
        let v = inspect(url, &["cachet:orders:v:{0}4"]);
        assert_eq!(v["state"], "orphaned", "{v}");
        assert!(v["envelope"]["generation"].as_u64().unwrap() > 0, "{v}");
        let group = &v["group"];
        assert_eq!(group["generation_key"], "cachet:orders:sys:gen:{0}", "{v}");
        assert!(group["generation"].is_null(), "{v}");
        assert!(group["generation_raw"].is_null(), "{v}");
        assert_eq!(group["generation_type"], "hash", "{v}");
        let text = inspect_text(url, &["cachet:orders:v:{0}4"]);
        for line in [
            "group         0 (cachet:orders:sys:gen:{0}): no generation: the key holds a hash",
            "state         orphaned: the group's generation key holds a hash",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }

        // No entry, a foreign generation: still looked at, exit 0.
        let text = inspect_text(url, &["cachet:users:v:{g2}k"]);
        assert!(text.contains("the key holds a hash"), "{text}");
        assert!(text.contains("state         missing"), "{text}");
        let v = inspect(url, &["cachet:users:v:{g2}k"]);
        assert_eq!(v["group"]["generation_type"], "hash", "{v}");
        assert_eq!(v["state"], "missing", "{v}");

        // A string that is not a number, and a group whose key is gone.
        let v = inspect(url, &["cachet:users:v:{g3}k"]);
        assert_eq!(v["group"]["generation_raw"], "abc", "{v}");
        assert_eq!(v["group"]["generation_type"], "string", "{v}");
        let text = inspect_text(url, &["cachet:users:v:{g3}k"]);
        assert!(text.contains("generation \"abc\" (not a number)"), "{text}");
        let v = inspect(url, &["cachet:users:v:{g4}k"]);
        assert_eq!(v["group"]["generation_type"], "none", "{v}");
        assert!(v["group"]["generation_raw"].is_null(), "{v}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn stats_show_memory_eviction_and_hits() {
    let redis = RedisServer::start();
    let url = redis.url();
    write_entries(&url).await;
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]);
    redis.command(&["CONFIG", "SET", "maxmemory", "104857600"]);

    tokio::task::spawn_blocking(move || {
        let lines = Cachet::command("stats").args(["--redis-url", &url]).json();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        let v = &lines[0];
        assert_eq!(v["maxmemory"], 104_857_600, "{v}");
        assert_eq!(v["maxmemory_policy"], "volatile-lru", "{v}");
        assert!(v["used_memory"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["evicted_keys"], 0, "{v}");
        assert!(
            v["keyspace_hits"].is_u64() && v["keyspace_misses"].is_u64(),
            "{v}"
        );
        assert!(v["keyspace_hit_rate"].is_f64(), "{v}");
        let warnings = v["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 1, "{v}");
        assert!(
            warnings[0].as_str().unwrap().contains("volatile-lru"),
            "{v}"
        );

        let text = Cachet::command("stats")
            .args(["--redis-url", &url])
            .stdout();
        for line in [
            "maxmemory         100.0 MiB (104857600 bytes)",
            "maxmemory-policy  volatile-lru",
            "evicted keys      0",
            "keyspace hits     ",
            "hit rate          ",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        let warned: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("warning: "))
            .collect();
        assert_eq!(warned.len(), 1, "{text}");
        assert!(warned[0].contains("volatile-lru"), "{text}");
    })
    .await
    .unwrap();
}
