//! The persistence check: what a Redis crash can lose is classified from the
//! server's settings, warned about, and an ACL that forbids `CONFIG` does not
//! stop anything.

use crate::support;

use cachet::write_behind::Durability;
use cachet_testkit::{RedisServer, RedisServerOptions};
use support::{Item, builder, cache, store};

/// Builds a write-behind on `url` and returns its verdict and what this crate
/// logged at `warn` level or above.
async fn check(url: &str) -> (Durability, String) {
    let captured = cachet_testkit::Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let c = captured.clone();
            move || c.clone()
        })
        .with_ansi(false)
        .with_env_filter("cachet::write_behind=warn")
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let store = store(url).await;
    let wb = builder(store.clone(), &cache(store)).build().await.unwrap();
    let _ = wb.write_behind(&1, Item::new(1, "x")).await.unwrap();
    (wb.durability().clone(), captured.text())
}

#[tokio::test(flavor = "current_thread")]
async fn without_the_append_only_file_the_risk_is_reported() {
    let server = RedisServer::start();
    let (durability, log) = check(&server.url()).await;
    assert_eq!(durability, Durability::SinceLastSnapshot);
    assert_eq!(durability.may_lose_writes(), Some(true));
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("can be lost on a Redis crash")
            && warnings[0].contains("appendonly no")
            && warnings[0].contains("appendfsync always or wait_replicas"),
        "{log}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn everysec_is_reported_as_about_one_second() {
    let server = RedisServer::start_with(RedisServerOptions {
        extra_args: vec![
            ("appendonly".into(), "yes".into()),
            ("appendfsync".into(), "everysec".into()),
        ],
        ..RedisServerOptions::default()
    });
    let (durability, log) = check(&server.url()).await;
    assert_eq!(durability, Durability::EverySecond);
    assert!(log.contains("up to about one second"), "{log}");
}

#[tokio::test(flavor = "current_thread")]
async fn with_appendfsync_always_nothing_is_at_risk_and_nothing_is_said() {
    let server = RedisServer::start_with(RedisServerOptions {
        append_only: true,
        ..RedisServerOptions::default()
    });
    let (durability, log) = check(&server.url()).await;
    assert_eq!(durability, Durability::Always);
    assert_eq!(durability.may_lose_writes(), Some(false));
    assert!(!log.contains("WARN"), "{log}");
}

#[tokio::test(flavor = "current_thread")]
async fn an_acl_that_forbids_config_is_logged_not_fatal() {
    let server = RedisServer::start();
    assert_eq!(
        server.command(&[
            "ACL", "SETUSER", "app", "on", ">secret", "~*", "&*", "+@all", "-config"
        ]),
        "OK"
    );
    let url = format!("redis://app:secret@127.0.0.1:{}/", server.port());
    let (durability, log) = check(&url).await;
    let Durability::Unknown(why) = &durability else {
        panic!("{durability:?}")
    };
    assert!(why.contains("CONFIG GET failed"), "{why}");
    assert_eq!(durability.may_lose_writes(), None);
    assert!(log.contains("could not check Redis persistence"), "{log}");
    // The write went through all the same.
    assert_eq!(
        server.command(&["XLEN", "cachet:items:sys:wb"]),
        "1",
        "{log}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_allkeys_eviction_policy_is_warned_about() {
    let server = RedisServer::start_with(RedisServerOptions {
        append_only: true,
        extra_args: vec![("maxmemory-policy".into(), "allkeys-lru".into())],
    });
    let (_, log) = check(&server.url()).await;
    assert!(log.contains("may evict keys without a TTL"), "{log}");
    assert!(log.contains("allkeys-lru"), "{log}");
}
