//! A model check of the cachet lease protocol.
//!
//! This crate describes one cached database row, the processes that read and
//! write it, and the cache between them as a state machine, and lets the
//! [stateright](https://docs.rs/stateright) model checker try *every*
//! interleaving of their atomic steps. It answers one question: **once everybody
//! has finished, can the cache hold a value older than the database?** Plain
//! cache-aside can; the lease protocol of `cachet_core::store` cannot, as long as
//! every committed write is followed by an invalidation.
//!
//! # The actors
//!
//! - **The database** holds one row. Its content is summed up by a version number
//!   ([`State::db`]), starting at 0; every committed write adds one.
//! - **The cache** holds at most one entry, the version a reader read
//!   ([`State::entry`]), and at most one lease: a token and whether it is still
//!   alive or has expired ([`State::lease`]).
//! - **Readers** each want the row once. A reader is a process with a program
//!   counter ([`Reader`]) and one local variable, the version it read.
//! - **Writers** each update the row once, then invalidate the cache entry
//!   ([`Writer`]). Since every writer commits once, the database version never
//!   exceeds the number of writers: the state space is finite.
//! - **The lease clock** can let the current lease expire at any moment
//!   ([`Action::ExpireLease`]): this is how the model says "a reader took longer
//!   than its lease TTL". Only with [`CacheModel::lease_expiry`].
//! - **The outbox relay** (only with [`Strategy::LeasesWithOutbox`]) delivers the
//!   invalidations that writers recorded in the database ([`Relay`]).
//!
//! Any process that can take a step may take the next one, so the checker
//! explores every order in which the steps can happen. Each step is atomic: it
//! stands for one database statement or one store command (one Lua script on
//! Redis, one stripe lock in process).
//!
//! # The steps
//!
//! The three strategies ([`Strategy`]) differ in what a reader's lookup and fill
//! do and in whether a commit records an outbox row.
//!
//! | actor | step | [`Strategy::Naive`] | [`Strategy::Leases`], [`Strategy::LeasesWithOutbox`] |
//! |---|---|---|---|
//! | reader | [`Lookup`](Action::Lookup) | `GET`: a hit ends the read; a miss goes on to read the database | `acquire`: a hit ends the read; with no live lease, take a fresh token and go on; else *busy* |
//! | reader | [`GiveUp`](Action::GiveUp) | — | a busy reader stops waiting: it serves its own read and caches nothing (a busy reader may also look up again) |
//! | reader | [`ReadDb`](Action::ReadDb) | read the row's version into the reader's local | same |
//! | reader | [`Fill`](Action::Fill) | `SET` the local, unconditionally | `fill(token, local)`: write only if the key's lease is this token and alive, and consume the lease; otherwise refused, nothing written |
//! | writer | [`Commit`](Action::Commit) | version += 1 | same; with the outbox, the same transaction also inserts an outbox row |
//! | writer | [`Invalidate`](Action::Invalidate) | `DEL` the entry | delete the entry and the lease |
//! | writer | [`Crash`](Action::Crash) | with [`CacheModel::writer_crashes`]: a writer that has committed dies before invalidating | same |
//! | lease clock | [`ExpireLease`](Action::ExpireLease) | — | with [`CacheModel::lease_expiry`]: the live lease expires; `acquire` may grant a new one, a fill with the old token is refused |
//! | relay | [`RelayDeliver`](Action::RelayDeliver) | — | outbox only: while a row is pending, invalidate (entry and lease) |
//! | relay | [`RelayDelete`](Action::RelayDelete) | — | outbox only: delete the delivered row |
//!
//! `acquire` grants a *fresh* token: one that no reader holds and that is not the
//! current (possibly expired) lease's. Tokens are only ever compared, so reusing a
//! number that nobody holds any more is indistinguishable from the globally unique
//! tokens of `TokenSource`, and it keeps the model finite. Handing a slow reader's
//! token to another reader would not be: that is exactly the reuse uniqueness
//! rules out, and with it the slow reader's fill would be accepted.
//!
//! *Busy* is there to share one load between readers, not for freshness: if
//! `acquire` granted a new token to every miss, each grant would revoke the
//! previous holder's lease, and the properties would still hold.
//!
//! The relay delivers *at least once*: after invalidating, it may invalidate again
//! before it deletes the row (a relay that died between the two and restarted).
//! It does not crash for good: a pending row is always delivered eventually.
//!
//! # What is left out
//!
//! One key only; no entry TTL (an entry lives until it is invalidated, so a
//! stale entry that survives the workload stays stale — the TTL is what would
//! end it); no negative entries, `AcquireMode::Replace`, `release` or `set`; no
//! in-process single-flight, which only decides which caller of one process goes
//! to the store. A busy reader's waiting is folded into its next lookup, since
//! `acquire` returns the entry when there is one.
//!
//! # The properties
//!
//! - [`FRESH_WHEN_QUIET`] (the main one): in every *quiet* state — every reader
//!   done, every writer done or crashed, no outbox row pending — the cache entry is
//!   absent or equals the database version. The checker tests an `always`
//!   property in every state, so it is written `!quiet(s) || fresh(s)`: it only
//!   constrains the states where the workload is over, because while a writer is
//!   between its commit and its invalidation the entry is allowed to be old.
//! - [`NO_STALE_FILL`]: the cache entry, if present, is never older than the
//!   database version at the moment of the last invalidation
//!   ([`State::invalidated_at`], bookkeeping for this property, not part of the
//!   system). An entry only appears through a fill and every invalidation deletes
//!   it, so this says: *no fill writes a value older than a write whose
//!   invalidation completed before the fill.* It is what leases promise on their
//!   own, even when a writer never invalidates.
//! - [`CACHES_WHEN_QUIET`], a `sometimes` property: some quiet state holds an
//!   entry. It shows that fills do succeed in the model, so the other two do not
//!   hold merely because nothing is ever cached.
//!
//! # What the tests prove
//!
//! The tests in `tests/model.rs` explore the reachable states breadth first, to
//! the end (or until every property has a discovery).
//!
//! 1. **Plain cache-aside is wrong**, with one reader and one writer: the reader
//!    misses and reads version 0, the writer commits version 1 and deletes the
//!    (absent) entry, then the reader sets 0. Nothing will ever delete it. This is
//!    the race that `cachet lab --scenario race` measures on real stores.
//! 2. **Leases are right**, with two readers, two writers and expiring leases: no
//!    interleaving leaves a stale entry once everybody is done, and no fill is
//!    older than a completed invalidation. A slow reader's fill is refused because
//!    an invalidation revoked its lease, or because its lease expired (and a new
//!    one, if granted, has another token).
//! 3. **Leases need the invalidation to happen.** If a writer can die between
//!    its commit and its invalidation, a value read before the commit and filled
//!    with a valid lease stays in the cache: only the entry TTL ends it. Leases
//!    still never let a fill undo a completed invalidation.
//! 4. **An outbox closes that gap.** When the commit also records an outbox row and
//!    a relay delivers it (at least once), writers may crash, leases may expire,
//!    and the cache is still fresh once everybody is done.
//!
//! Two more tests replay single runs: the race of test 1 against leases (the
//! invalidation revokes the lease, the fill is refused), and a reader slower than
//! its lease (another reader takes a new token, the old one cannot fill).
//!
//! # From the model to the code
//!
//! | model | `Store` primitive | Redis | in process (`MemTable`) |
//! |---|---|---|---|
//! | [`Lookup`](Action::Lookup), leases | `Store::acquire` (`AcquireMode::IfAbsent`) | `ACQUIRE` script: `GET entry`, else `SET lease token NX PX ttl`, else `PTTL lease` | entry if live, else lease if none live, else busy, under the stripe lock |
//! | [`Lookup`](Action::Lookup), naive | `Store::get` | `GET entry` | entry lookup |
//! | [`Fill`](Action::Fill), leases | `Store::fill` | `FILL` script: compare the lease with the token, `SET entry … PX ttl`, `DEL lease` | token equal and lease unexpired, under the stripe lock |
//! | [`Fill`](Action::Fill), naive | `Store::set`, as the naive reader of `cachet lab --scenario race` uses it | `SET` script: `SET entry … PX ttl` (there is no lease to revoke) | insert |
//! | [`Invalidate`](Action::Invalidate), [`RelayDeliver`](Action::RelayDeliver) | `Store::invalidate` | `DEL entry lease` | remove lease and entry |
//! | [`ExpireLease`](Action::ExpireLease) | the lease TTL elapsing | `PX` on the lease key | `expires_at_ms` of the lease slot |
//! | [`GiveUp`](Action::GiveUp) | `Cache` loading without caching after `lease_wait` | — | — |
//! | [`Commit`](Action::Commit), [`ReadDb`](Action::ReadDb) | the application's database transaction and the loader | — | — |
//!
//! # Running
//!
//! `cargo nextest run -p cachet-model`. Each check explores at most some ten
//! thousand states and takes well under a second in a debug build.
//! [`CacheModel::check`] runs one and [`CacheModel::explain`] turns
//! a counterexample into readable steps.
#![deny(missing_docs)]

use std::fmt;

use stateright::{Checker, Model, Path, Property};

/// A version of the database row: 0 at the start, plus one per committed write.
pub type Version = u8;

/// A lease token. Only ever compared for equality.
pub type Token = u8;

/// The name of the main property: once every process is done, the cache is fresh.
pub const FRESH_WHEN_QUIET: &str = "cache entry is fresh once everybody is done";

/// The name of the lease property: no fill writes a value older than a completed
/// invalidation.
pub const NO_STALE_FILL: &str = "no fill is older than the last invalidation";

/// The name of the sanity property: some run ends with an entry in the cache.
pub const CACHES_WHEN_QUIET: &str = "some run ends with a cached entry";

/// How readers fill the cache and writers invalidate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Plain cache-aside: the reader `GET`s, and on a miss reads the database and
    /// `SET`s what it read; the writer commits, then `DEL`s the entry.
    Naive,
    /// The cachet lease protocol: `acquire`, read the database, `fill` with the
    /// token; the writer commits, then `invalidate`s (entry and lease).
    Leases,
    /// Leases, and each commit also records an outbox row in the same transaction,
    /// which a relay delivers as an invalidation, at least once.
    LeasesWithOutbox,
}

impl Strategy {
    /// Whether fills are guarded by leases.
    pub fn uses_leases(self) -> bool {
        !matches!(self, Strategy::Naive)
    }

    /// Whether commits record outbox rows for the relay.
    pub fn uses_outbox(self) -> bool {
        matches!(self, Strategy::LeasesWithOutbox)
    }
}

/// The model's parameters. The model itself is [`Model`] for this type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheModel {
    /// How readers fill and writers invalidate.
    pub strategy: Strategy,
    /// Number of readers; each reads the row once.
    pub readers: usize,
    /// Number of writers; each commits once, so the database version ends at most
    /// at this number.
    pub writers: usize,
    /// Whether a live lease may expire at any moment (a reader slower than its
    /// lease TTL).
    pub lease_expiry: bool,
    /// Whether a writer may die between its commit and its invalidation.
    pub writer_crashes: bool,
}

impl CacheModel {
    /// A model with `readers` readers and `writers` writers, where leases never
    /// expire and writers never crash.
    pub fn new(strategy: Strategy, readers: usize, writers: usize) -> Self {
        Self {
            strategy,
            readers,
            writers,
            lease_expiry: false,
            writer_crashes: false,
        }
    }

    /// Lets leases expire at any moment.
    pub fn with_lease_expiry(mut self) -> Self {
        self.lease_expiry = true;
        self
    }

    /// Lets writers crash between commit and invalidation.
    pub fn with_writer_crashes(mut self) -> Self {
        self.writer_crashes = true;
        self
    }

    /// Explores every reachable state breadth first, on one thread (so each
    /// counterexample found is a shortest one), and returns the finished checker.
    pub fn check(self) -> impl Checker<Self> {
        self.checker().spawn_bfs().join()
    }

    /// A path found by the checker, one numbered line per step: who did what, what
    /// came of it, and the state after it.
    pub fn explain(&self, path: &Path<State, Action>) -> String {
        let steps = path.clone().into_vec();
        let mut out = String::new();
        if let Some((first, _)) = steps.first() {
            out.push_str(&format!("   start: {first}\n"));
        }
        for (n, pair) in steps.windows(2).enumerate() {
            let (before, action) = &pair[0];
            let (after, _) = &pair[1];
            if let Some(action) = action {
                let what = self.narrate(before, *action, after);
                out.push_str(&format!("{:>3}. {what}\n     → {after}\n", n + 1));
            }
        }
        out
    }

    /// One step in words.
    fn narrate(&self, before: &State, action: Action, after: &State) -> String {
        let leases = self.strategy.uses_leases();
        match action {
            Action::Lookup(i) => {
                let call = if leases { "acquire" } else { "GET" };
                let outcome = match after.readers[i] {
                    Reader::Done => format!("hit v{}", after.entry.unwrap_or_default()),
                    Reader::Busy => "busy (another reader holds the lease)".to_owned(),
                    Reader::Missed { lease: Some(t) } => format!("miss, leased token t{t}"),
                    _ => "miss".to_owned(),
                };
                format!("reader {i}: {call} → {outcome}")
            }
            Action::GiveUp(i) => {
                format!("reader {i}: stops waiting, loads without caching")
            }
            Action::ReadDb(i) => format!("reader {i}: reads the row: v{}", before.db),
            Action::Fill(i) => {
                let Reader::Loaded { lease, read } = before.readers[i] else {
                    return format!("reader {i}: fill");
                };
                match lease {
                    None => format!("reader {i}: SET v{read}"),
                    Some(t)
                        if before.lease
                            == Some(Lease {
                                token: t,
                                alive: true,
                            }) =>
                    {
                        format!("reader {i}: fill(t{t}, v{read}) → filled")
                    }
                    Some(t) => format!("reader {i}: fill(t{t}, v{read}) → refused"),
                }
            }
            Action::Commit(i) => format!("writer {i}: commits v{}", after.db),
            Action::Invalidate(i) => {
                let call = if leases { "invalidate" } else { "DEL" };
                format!("writer {i}: {call}")
            }
            Action::Crash(i) => format!("writer {i}: crashes before invalidating"),
            Action::ExpireLease => "the lease expires".to_owned(),
            Action::RelayDeliver => "relay: delivers an outbox row (invalidate)".to_owned(),
            Action::RelayDelete => "relay: deletes the delivered outbox row".to_owned(),
        }
    }

    /// Whether the workload is over: every reader done, every writer done or
    /// crashed, no outbox row pending. Only the lease clock may still move.
    pub fn quiet(&self, state: &State) -> bool {
        state.readers.iter().all(|r| *r == Reader::Done)
            && state
                .writers
                .iter()
                .all(|w| matches!(w, Writer::Done | Writer::Crashed))
            && state.outbox == 0
    }

    /// A token that no reader holds and that is not the current lease's.
    fn fresh_token(state: &State) -> Token {
        let held = |t: Token| {
            state.lease.is_some_and(|l| l.token == t)
                || state.readers.iter().any(|r| r.lease() == Some(t))
        };
        (0..=Token::MAX)
            .find(|&t| !held(t))
            .expect("fewer than 256 tokens are ever held")
    }

    /// A reader's lookup: `acquire` with leases, `GET` without.
    fn lookup(&self, s: &mut State, i: usize) {
        if s.entry.is_some() {
            s.readers[i] = Reader::Done;
        } else if !self.strategy.uses_leases() {
            s.readers[i] = Reader::Missed { lease: None };
        } else if s.lease.is_some_and(|l| l.alive) {
            s.readers[i] = Reader::Busy;
        } else {
            // An expired lease is replaced, as `SET … NX` finds its key gone.
            let token = Self::fresh_token(s);
            s.lease = Some(Lease { token, alive: true });
            s.readers[i] = Reader::Missed { lease: Some(token) };
        }
    }

    /// A reader's fill: `fill(token, read)` with leases, `SET read` without.
    fn fill(s: &mut State, i: usize) {
        let Reader::Loaded { lease, read } = s.readers[i] else {
            unreachable!("only a reader that has read the row fills");
        };
        match lease {
            None => s.entry = Some(read),
            Some(token) => {
                if s.lease == Some(Lease { token, alive: true }) {
                    s.entry = Some(read);
                    s.lease = None;
                }
                // Otherwise refused: revoked, expired or replaced. Nothing written.
            }
        }
        s.readers[i] = Reader::Done;
    }

    /// `invalidate`: the entry and the lease go, in one step.
    fn invalidate(s: &mut State) {
        s.entry = None;
        s.lease = None;
        s.invalidated_at = s.db;
    }
}

/// A lease on the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The token granted to the holder.
    pub token: Token,
    /// False once the lease TTL has elapsed: the lease no longer makes others
    /// busy, and a fill with its token is refused.
    pub alive: bool,
}

/// A reader's program counter (and its local variables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reader {
    /// About to look the key up.
    Idle,
    /// Found the lease held by another reader; will look up again or give up.
    Busy,
    /// Missed; about to read the database.
    Missed {
        /// The lease token this reader holds (`None` in plain cache-aside).
        lease: Option<Token>,
    },
    /// Has read the row; about to fill.
    Loaded {
        /// The lease token this reader holds (`None` in plain cache-aside).
        lease: Option<Token>,
        /// The version it read.
        read: Version,
    },
    /// Finished: a hit, a fill (written or refused), or gave up waiting.
    Done,
}

impl Reader {
    /// The lease token this reader holds, if any.
    pub fn lease(self) -> Option<Token> {
        match self {
            Reader::Missed { lease } | Reader::Loaded { lease, .. } => lease,
            _ => None,
        }
    }
}

/// A writer's program counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Writer {
    /// About to commit.
    Idle,
    /// Committed; about to invalidate.
    Committed,
    /// Invalidated: finished.
    Done,
    /// Died after committing, without invalidating.
    Crashed,
}

/// The outbox relay's program counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Relay {
    /// Waiting for a pending outbox row.
    Idle,
    /// Has invalidated for the oldest pending row, not yet deleted it.
    Delivered,
}

/// A state of the whole system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The database row's version.
    pub db: Version,
    /// Outbox rows committed and not yet deleted by the relay.
    pub outbox: u8,
    /// The cache entry: the version some reader read, if present.
    pub entry: Option<Version>,
    /// The key's lease, live or expired, if any.
    pub lease: Option<Lease>,
    /// Each reader's progress.
    pub readers: Vec<Reader>,
    /// Each writer's progress.
    pub writers: Vec<Writer>,
    /// The relay's progress.
    pub relay: Relay,
    /// Bookkeeping for [`NO_STALE_FILL`], not part of the system: the database
    /// version when the last invalidation ran (0 before any).
    pub invalidated_at: Version,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "db v{}", self.db)?;
        if self.outbox > 0 {
            write!(f, " (+{} outbox)", self.outbox)?;
        }
        match self.entry {
            Some(v) => write!(f, ", entry v{v}")?,
            None => write!(f, ", no entry")?,
        }
        match self.lease {
            Some(Lease { token, alive: true }) => write!(f, ", lease t{token}")?,
            Some(Lease { token, .. }) => write!(f, ", lease t{token} expired")?,
            None => {}
        }
        f.write_str("; readers [")?;
        for (i, r) in self.readers.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            match r {
                Reader::Idle => write!(f, "{sep}idle")?,
                Reader::Busy => write!(f, "{sep}busy")?,
                Reader::Missed { lease: None } => write!(f, "{sep}missed")?,
                Reader::Missed { lease: Some(t) } => write!(f, "{sep}holds t{t}")?,
                Reader::Loaded { lease: None, read } => write!(f, "{sep}read v{read}")?,
                Reader::Loaded {
                    lease: Some(t),
                    read,
                } => write!(f, "{sep}read v{read} with t{t}")?,
                Reader::Done => write!(f, "{sep}done")?,
            }
        }
        f.write_str("]; writers [")?;
        for (i, w) in self.writers.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let w = match w {
                Writer::Idle => "idle",
                Writer::Committed => "committed",
                Writer::Done => "done",
                Writer::Crashed => "crashed",
            };
            write!(f, "{sep}{w}")?;
        }
        f.write_str("]")
    }
}

/// One atomic step of one actor. The `usize` is the reader's or writer's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A reader looks the key up: `acquire` (leases) or `GET` (naive).
    Lookup(usize),
    /// A busy reader stops waiting for the lease holder.
    GiveUp(usize),
    /// A reader reads the row from the database.
    ReadDb(usize),
    /// A reader writes what it read: `fill` with its token (leases) or `SET`
    /// (naive).
    Fill(usize),
    /// A writer commits its update.
    Commit(usize),
    /// A writer invalidates the entry (and the lease).
    Invalidate(usize),
    /// A writer dies between commit and invalidation.
    Crash(usize),
    /// The live lease's TTL elapses.
    ExpireLease,
    /// The relay delivers a pending outbox row by invalidating.
    RelayDeliver,
    /// The relay deletes the row it delivered.
    RelayDelete,
}

impl Model for CacheModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            db: 0,
            outbox: 0,
            entry: None,
            lease: None,
            readers: vec![Reader::Idle; self.readers],
            writers: vec![Writer::Idle; self.writers],
            relay: Relay::Idle,
            invalidated_at: 0,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (i, reader) in s.readers.iter().enumerate() {
            match reader {
                Reader::Idle => actions.push(Action::Lookup(i)),
                Reader::Busy => {
                    actions.push(Action::Lookup(i));
                    actions.push(Action::GiveUp(i));
                }
                Reader::Missed { .. } => actions.push(Action::ReadDb(i)),
                Reader::Loaded { .. } => actions.push(Action::Fill(i)),
                Reader::Done => {}
            }
        }
        for (i, writer) in s.writers.iter().enumerate() {
            match writer {
                Writer::Idle => actions.push(Action::Commit(i)),
                Writer::Committed => {
                    actions.push(Action::Invalidate(i));
                    if self.writer_crashes {
                        actions.push(Action::Crash(i));
                    }
                }
                Writer::Done | Writer::Crashed => {}
            }
        }
        if self.lease_expiry && s.lease.is_some_and(|l| l.alive) {
            actions.push(Action::ExpireLease);
        }
        // Enabled while a row is pending, also right after delivering it: the
        // relay delivers at least once.
        if s.outbox > 0 {
            actions.push(Action::RelayDeliver);
        }
        if s.relay == Relay::Delivered {
            actions.push(Action::RelayDelete);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Lookup(i) => self.lookup(&mut s, i),
            Action::GiveUp(i) => s.readers[i] = Reader::Done,
            Action::ReadDb(i) => {
                let lease = s.readers[i].lease();
                s.readers[i] = Reader::Loaded { lease, read: s.db };
            }
            Action::Fill(i) => Self::fill(&mut s, i),
            Action::Commit(i) => {
                s.db += 1;
                if self.strategy.uses_outbox() {
                    s.outbox += 1;
                }
                s.writers[i] = Writer::Committed;
            }
            Action::Invalidate(i) => {
                Self::invalidate(&mut s);
                s.writers[i] = Writer::Done;
            }
            Action::Crash(i) => s.writers[i] = Writer::Crashed,
            Action::ExpireLease => {
                if let Some(lease) = &mut s.lease {
                    lease.alive = false;
                }
            }
            Action::RelayDeliver => {
                Self::invalidate(&mut s);
                s.relay = Relay::Delivered;
            }
            Action::RelayDelete => {
                s.outbox -= 1;
                s.relay = Relay::Idle;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(FRESH_WHEN_QUIET, |m: &Self, s: &State| {
                !m.quiet(s) || s.entry.is_none_or(|v| v == s.db)
            }),
            Property::always(NO_STALE_FILL, |_: &Self, s: &State| {
                s.entry.is_none_or(|v| v >= s.invalidated_at)
            }),
            Property::sometimes(CACHES_WHEN_QUIET, |m: &Self, s: &State| {
                m.quiet(s) && s.entry.is_some()
            }),
        ]
    }
}
