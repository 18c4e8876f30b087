//! The futures of [`Cache::get`] and [`Cache::get_or_load`]: at their first
//! poll, a hit in process is answered in place; anything else goes down the
//! read path, boxed. So a hit builds no state machine, boxes nothing and has
//! nothing to drop, and like any future, one never polled does nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use cachet_core::CacheKey;

use super::{Cache, LoadOptions};
use crate::Error;
use crate::error::BoxError;

type Boxed<'a, V> = Pin<Box<dyn Future<Output = Result<Option<V>, Error>> + Send + 'a>>;

/// [`Cache::get`]'s future.
pub(super) struct Get<'a, K: ?Sized + ToOwned, V> {
    cache: &'a Cache<K, V>,
    key: &'a K,
    read: Option<Boxed<'a, V>>,
}

impl<'a, K: ?Sized + ToOwned, V> Get<'a, K, V> {
    pub(super) fn new(cache: &'a Cache<K, V>, key: &'a K) -> Self {
        Self {
            cache,
            key,
            read: None,
        }
    }
}

impl<'a, K, V> Future for Get<'a, K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    type Output = Result<Option<V>, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Self { cache, key, read } = self.get_mut();
        poll_read(cache, key, read, cx, || Box::pin(cache.read(key, true)))
    }
}

/// [`Cache::get_or_load_with`]'s future.
pub(super) struct GetOrLoad<'a, K: ?Sized + ToOwned, V, F> {
    cache: &'a Cache<K, V>,
    key: &'a K,
    options: LoadOptions,
    loader: Option<F>,
    load: Option<Boxed<'a, V>>,
}

// The loader is moved, never pinned.
impl<K: ?Sized + ToOwned, V, F> Unpin for GetOrLoad<'_, K, V, F> {}

impl<'a, K: ?Sized + ToOwned, V, F> GetOrLoad<'a, K, V, F> {
    pub(super) fn new(cache: &'a Cache<K, V>, key: &'a K, options: LoadOptions, loader: F) -> Self {
        Self {
            cache,
            key,
            options,
            loader: Some(loader),
            load: None,
        }
    }
}

impl<'a, K, V, F, Fut, E> Future for GetOrLoad<'a, K, V, F>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    type Output = Result<Option<V>, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Self {
            cache,
            key,
            options,
            loader,
            load,
        } = self.get_mut();
        poll_read(cache, key, load, cx, || {
            let loader = loader.take().expect("polled after completion");
            Box::pin(cache.load_path(key, *options, loader))
        })
    }
}

/// The poll both futures share: a hit in process answers the first poll in
/// place; anything else is boxed by `start` into `read`, which is polled.
#[inline]
fn poll_read<'a, K, V>(
    cache: &Cache<K, V>,
    key: &K,
    read: &mut Option<Boxed<'a, V>>,
    cx: &mut Context<'_>,
    start: impl FnOnce() -> Boxed<'a, V>,
) -> Poll<Result<Option<V>, Error>>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let read = match read {
        Some(read) => read,
        None => {
            if let Some(v) = cache.inner.local_hit(key, true) {
                return Poll::Ready(Ok(v));
            }
            read.insert(start())
        }
    };
    read.as_mut().poll(cx)
}
