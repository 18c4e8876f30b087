//! Fixtures shared by the cache tests: the same test body runs on the
//! in-process store and on a real `redis-server`.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use cachet::{Cache, CacheBuilder, CacheKey, Clock, MemoryStore, MockClock, RedisStore, Store};
use cachet_testkit::{Logs, RedisServer};

/// A store under test.
pub enum Fx {
    Memory {
        store: MemoryStore,
        clock: MockClock,
    },
    Redis {
        store: RedisStore,
        server: RedisServer,
    },
}

impl Fx {
    pub fn memory() -> Self {
        let clock = Clock::mock();
        Fx::Memory {
            store: MemoryStore::with_clock(100_000, clock.clock()),
            clock,
        }
    }

    pub async fn redis() -> Self {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        Fx::Redis { store, server }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Fx::Memory { store, .. } => Arc::new(store.clone()),
            Fx::Redis { store, .. } => Arc::new(store.clone()),
        }
    }

    pub fn builder<K: CacheKey + ?Sized + Sync + 'static, V: Clone + Send + Sync + 'static>(
        &self,
        namespace: &str,
    ) -> CacheBuilder<K, V> {
        match self {
            Fx::Memory { store, .. } => Cache::builder(namespace).memory(store.clone()),
            Fx::Redis { store, .. } => Cache::builder(namespace).store(store.clone()),
        }
    }

    pub fn server(&self) -> Option<&RedisServer> {
        match self {
            Fx::Redis { server, .. } => Some(server),
            Fx::Memory { .. } => None,
        }
    }

    pub fn server_mut(&mut self) -> Option<&mut RedisServer> {
        match self {
            Fx::Redis { server, .. } => Some(server),
            Fx::Memory { .. } => None,
        }
    }
}

/// Runs one async test body on both stores, as `name::memory` and `name::redis`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(super::support::Fx::memory()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(super::support::Fx::redis().await).await;
            }
        }
    )*};
}

/// A gate a test opens once: tasks wait on it without sleeping.
#[derive(Clone, Debug)]
pub struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(tokio::sync::watch::Sender::new(false)))
    }
}

impl Gate {
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// A row of a pretend database, for race tests.
pub struct Row(std::sync::Mutex<String>);

impl Row {
    pub fn new(v: &str) -> Self {
        Row(std::sync::Mutex::new(v.to_owned()))
    }

    pub fn read(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    pub fn write(&self, v: &str) {
        *self.0.lock().unwrap() = v.to_owned();
    }
}

/// Captures what this thread logs while the guard lives (spawned tasks of a
/// current-thread runtime included), at `level` and above.
pub fn capture_logs(level: tracing::Level) -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}
