//! Warnings the lab causes on purpose, labelled as such.
//!
//! Some scenarios stage a fault (the `outage` scenario stops Redis, `fail-safe`
//! takes the source of truth down) or run on a throwaway private
//! `redis-server` whose durability settings the library rightly warns about.
//! The library logs what it sees, as it must in production. While a scenario
//! has declared a fault with [`expect`], warnings from the targets it names are
//! printed with the prefix "(expected, staged by the lab: …)"; every other
//! warning, and these targets' warnings at any other time, print unchanged.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// A fault a scenario staged: which log targets it makes warn, and what it is.
struct Staged {
    id: u64,
    targets: &'static [&'static str],
    why: &'static str,
}

static STAGED: Mutex<Vec<Staged>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn staged() -> std::sync::MutexGuard<'static, Vec<Staged>> {
    // Pushes and removals are single operations: the list stays consistent
    // even if a holder panicked.
    STAGED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Declares that, until the guard is dropped, warnings logged under any of
/// `targets` (a target or its prefix, e.g. `cachet::breaker`) are caused by
/// the fault `why` the lab staged.
#[must_use = "the fault counts as staged only while the guard lives"]
pub(crate) fn expect(targets: &'static [&'static str], why: &'static str) -> Expected {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    staged().push(Staged { id, targets, why });
    Expected { id }
}

/// A staged fault; dropping it ends it.
#[derive(Debug)]
pub(crate) struct Expected {
    id: u64,
}

impl Drop for Expected {
    fn drop(&mut self) {
        staged().retain(|s| s.id != self.id);
    }
}

/// What a staged fault explains an event from `target` by, if any.
fn explained(target: &str) -> Option<&'static str> {
    staged()
        .iter()
        .find(|s| {
            s.targets.iter().any(|t| {
                target
                    .strip_prefix(t)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
        })
        .map(|s| s.why)
}

/// An event format that labels the events a staged fault explains, and
/// leaves the rest to `F`.
#[derive(Debug)]
pub(crate) struct Labelled<F>(pub(crate) F);

impl<S, N, F> FormatEvent<S, N> for Labelled<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if let Some(why) = explained(event.metadata().target()) {
            write!(writer, "(expected, staged by the lab: {why}) ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_named_targets_are_explained_and_only_while_staged() {
        const TARGETS: &[&str] = &["cachet::breaker", "cachet_redis"];
        assert_eq!(explained("cachet::breaker"), None);
        let guard = expect(TARGETS, "test fault");
        assert_eq!(explained("cachet::breaker"), Some("test fault"));
        assert_eq!(explained("cachet_redis::bus"), Some("test fault"));
        // A prefix of a name is not its module.
        assert_eq!(explained("cachet::breakers"), None);
        assert_eq!(explained("cachet::cache::inner"), None);
        drop(guard);
        assert_eq!(explained("cachet::breaker"), None);
    }
}
