//! `cachet inspect`: one cache entry as Redis holds it.
//!
//! The key is the entry's store key (`Cache::store_key`, e.g.
//! `cachet:users:v:{42}`), or is built from `--namespace`, `--prefix`,
//! `--key` (and `--group`) the way the library builds it. The command reads
//! the key's type, its TTL and its lease's (`Store::ttl`), the stored bytes
//! (`GET`) and, for a grouped key, the group's generation (`GET` of
//! `StoreKey::group_key`, and its `TYPE` when it holds another type); it decodes the envelope with
//! `cachet::store::envelope::decode` and says whether the entry is current or
//! orphaned. It writes nothing, and prints the payload only with `--payload`.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use cachet::store::envelope::{self, DecodeError};
use cachet::store::{Meta, Ttls};
use cachet::{KeyLayout, Store as _, StoreKey};
use cachet_redis::RedisConnection;
use clap::Args;
use serde_json::{Value, json};

use crate::target::AdminArgs;

/// Payload bytes shown at most with `--payload`.
const PAYLOAD_SHOWN: usize = 256;

/// Flags of `cachet inspect`.
#[derive(Debug, Args)]
#[command(
    about = "Show one cache entry as stored in Redis: TTLs, envelope, group generation",
    long_about = "Show one cache entry as stored in Redis: whether it exists, its TTL and its \
        lease's, the decoded envelope (format version, negative flag, soft expiry, value version, \
        load time, group generation), the payload's size, and for a grouped key the group's \
        current generation and whether the entry is current or orphaned. Read-only. The payload \
        itself is printed only with --payload.\n\n\
        Exit status: 0 whenever the key could be looked at, whatever was found there (nothing, \
        an entry, bytes that are not an entry); 1 when KEY is not an entry key or Redis cannot \
        be reached; 2 when the command line is wrong."
)]
pub(crate) struct InspectArgs {
    /// The entry's key as stored, as `Cache::store_key` gives it, e.g. `cachet:users:v:{42}`
    #[arg(
        value_name = "KEY",
        required_unless_present = "namespace",
        conflicts_with = "namespace"
    )]
    store_key: Option<String>,
    /// The cache's namespace, to build the key from --key instead of giving KEY
    #[arg(long, requires = "key")]
    namespace: Option<String>,
    /// The cache's key prefix [default: cachet:]
    #[arg(long, requires = "namespace")]
    prefix: Option<String>,
    /// The key, as a string (an integer key is written the same way)
    #[arg(long, requires = "namespace")]
    key: Option<String>,
    /// The key's group, for a cache built with `group_by`
    #[arg(long, requires = "namespace")]
    group: Option<String>,
    #[command(flatten)]
    redis: AdminArgs,
    /// Print one JSON object on stdout, and nothing else
    #[arg(long)]
    json: bool,
    /// Also print the payload (after the envelope; all the bytes when they do
    /// not decode), in hex, at most 256 bytes
    #[arg(long)]
    payload: bool,
}

impl InspectArgs {
    /// The store key the flags name.
    fn store_key(&self) -> Result<StoreKey> {
        if let Some(key) = &self.store_key {
            return StoreKey::parse(key).with_context(|| {
                format!(
                    "{key:?} is not a cachet entry key: expected `<prefix><namespace>:v:{{<key>}}`, \
                     such as `cachet:users:v:{{42}}` (or `…:v:{{<group>}}<key>` in a cache with \
                     groups), as Cache::store_key gives it; or give --namespace and --key"
                )
            });
        }
        let (Some(namespace), Some(key)) = (&self.namespace, &self.key) else {
            bail!("give KEY, or --namespace and --key");
        };
        let prefix = self.prefix.as_deref().unwrap_or(KeyLayout::DEFAULT_PREFIX);
        let layout = KeyLayout::new(prefix, namespace).context("cannot build the key")?;
        Ok(match &self.group {
            Some(group) => layout.grouped_key(group.as_str(), key.as_str()),
            None => layout.key(key.as_str()),
        })
    }
}

/// What was found under one key.
#[derive(Debug)]
struct Found {
    key: StoreKey,
    /// `TYPE` of the key: `none`, `string`, …
    kind: String,
    ttls: Ttls,
    bytes: Option<Bytes>,
    /// For a grouped key: the group's generation key and what it holds.
    generation: Option<(String, Generation)>,
    now_ms: u64,
}

/// What a group's generation key holds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Generation {
    /// No key.
    Missing,
    /// A string: a number when cachet wrote it.
    Value(String),
    /// A key of another type, as `TYPE` names it (`hash`, `list`, …).
    Foreign(String),
}

impl Generation {
    /// `TYPE` of the key.
    fn kind(&self) -> &str {
        match self {
            Self::Missing => "none",
            Self::Value(_) => "string",
            Self::Foreign(kind) => kind,
        }
    }

    /// The string the key holds, if it holds one.
    fn raw(&self) -> Option<&str> {
        match self {
            Self::Value(v) => Some(v),
            Self::Missing | Self::Foreign(_) => None,
        }
    }
}

/// Reads a group's generation key. A key of another type is reported, not an
/// error: the cache counts it as no generation, as it does a string that is
/// not a number.
async fn read_generation(conn: &mut RedisConnection, key: &str) -> Result<Generation> {
    let cannot = || format!("cannot read the generation {key}");
    match redis::cmd("GET")
        .arg(key)
        .query_async::<redis::Value>(conn)
        .await
    {
        Ok(redis::Value::Nil) => Ok(Generation::Missing),
        Ok(redis::Value::BulkString(b)) => {
            Ok(Generation::Value(String::from_utf8_lossy(&b).into_owned()))
        }
        Ok(other) => Ok(Generation::Value(format!("{other:?}"))),
        Err(e) if e.code() == Some("WRONGTYPE") => {
            let kind: String = redis::cmd("TYPE")
                .arg(key)
                .query_async(conn)
                .await
                .with_context(cannot)?;
            Ok(Generation::Foreign(kind))
        }
        Err(e) => Err(e).with_context(cannot),
    }
}

/// Runs `cachet inspect`.
pub(crate) async fn run(args: InspectArgs) -> Result<()> {
    let key = args.store_key()?;
    let target = args.redis.target()?;
    let store = target.admin_store().await?;
    let mut conn = store.connection();
    let kind: String = redis::cmd("TYPE")
        .arg(key.as_str())
        .query_async(&mut conn)
        .await
        .with_context(|| format!("cannot read the type of {key}"))?;
    let ttls = store
        .ttl(&key)
        .await
        .with_context(|| format!("cannot read the TTLs of {key}"))?;
    let bytes: Option<Bytes> = if kind == "string" {
        redis::cmd("GET")
            .arg(key.as_str())
            .query_async(&mut conn)
            .await
            .with_context(|| format!("cannot read {key}"))?
    } else {
        None
    };
    let generation = match key.group_key() {
        Some(group) => Some((
            group.as_str().to_owned(),
            read_generation(&mut conn, group.as_str()).await?,
        )),
        None => None,
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let found = Found {
        key,
        kind,
        ttls,
        bytes,
        generation,
        now_ms,
    };
    let mut out = if args.json {
        found.json(args.payload).to_string()
    } else {
        found.text(args.payload)
    };
    out.push('\n');
    crate::write_stdout(&out)
}

/// Whether an entry is the one readers get.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// No key.
    Missing,
    /// Something else than an entry (another type, or bytes that do not decode).
    NotAnEntry,
    /// An entry readers get (while its TTL lasts).
    Current,
    /// An entry of an older group generation: a miss, left to its TTL.
    Orphaned(String),
}

impl Found {
    fn decoded(&self) -> Option<Result<(Meta, usize), DecodeError>> {
        let bytes = self.bytes.as_ref()?;
        Some(envelope::decode(bytes).map(|(meta, payload)| (meta, payload.len())))
    }

    /// What `--payload` shows: the payload after the envelope, or all the bytes
    /// when they do not decode; and what to call it.
    fn shown_bytes(&self) -> Option<(&'static str, Bytes)> {
        let bytes = self.bytes.as_ref()?;
        Some(match envelope::decode(bytes) {
            Ok((_, payload)) => ("payload hex", payload),
            Err(_) => ("raw hex", bytes.clone()),
        })
    }

    /// The group's current generation, if the key has a group and it is a number.
    fn current_generation(&self) -> Option<u64> {
        self.generation.as_ref()?.1.raw()?.parse().ok()
    }

    fn state(&self) -> State {
        if self.kind == "none" {
            return State::Missing;
        }
        let Some(Ok((meta, _))) = self.decoded() else {
            return State::NotAnEntry;
        };
        match &self.generation {
            None => State::Current,
            Some((_, Generation::Missing)) => State::Orphaned(format!(
                "filled under generation {}, and the group's generation key is gone (it comes \
                 back as a value it never had, so this entry is never read again)",
                meta.generation
            )),
            Some((_, Generation::Foreign(kind))) => State::Orphaned(format!(
                "the group's generation key holds a {kind}, not a number: the cache counts it \
                 as no generation and replaces it with a value it never had, so this entry is \
                 never read again"
            )),
            Some((_, Generation::Value(_))) => match self.current_generation() {
                Some(g) if g == meta.generation => State::Current,
                Some(g) => State::Orphaned(format!(
                    "filled under generation {}, the group is at {g}: a miss, left to its TTL",
                    meta.generation
                )),
                None => State::Orphaned(
                    "the group's generation key does not hold a number: the cache counts it as \
                     no generation and replaces it with a value it never had, so this entry is \
                     never read again"
                        .to_owned(),
                ),
            },
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state() {
            State::Missing => "missing",
            State::NotAnEntry => "not an entry",
            State::Current => "current",
            State::Orphaned(_) => "orphaned",
        }
    }

    fn text(&self, payload: bool) -> String {
        let mut out = String::new();
        let mut line = |name: &str, value: &str| {
            let _ = writeln!(out, "{name:<13} {value}");
        };
        line("key", self.key.as_str());
        match self.kind.as_str() {
            "none" => line("exists", "no"),
            "string" => line(
                "exists",
                &format!("yes, {} bytes", self.bytes.as_ref().map_or(0, Bytes::len)),
            ),
            other => line(
                "exists",
                &format!("yes, but it holds a {other}, not a cachet entry (a string)"),
            ),
        }
        line("ttl", &ttl_text(self.ttls.entry));
        line("lease", &lease_text(self.ttls.lease));
        match self.decoded() {
            None => {}
            Some(Err(e)) => line(
                "envelope",
                &format!(
                    "does not decode: {e}; the cache treats it as a miss and replaces it on \
                     the next load"
                ),
            ),
            Some(Ok((meta, payload_len))) => {
                let format = self.bytes.as_ref().and_then(|b| b.first()).copied();
                line(
                    "envelope",
                    &format!("format version {}", format.unwrap_or_default()),
                );
                line(
                    "negative",
                    if meta.negative {
                        "yes: a cached \"not found\""
                    } else {
                        "no"
                    },
                );
                line("soft expiry", &self.soft_expiry_text(meta.soft_expiry_ms));
                line(
                    "version",
                    &if meta.version == 0 {
                        "0 (unversioned)".to_owned()
                    } else {
                        meta.version.to_string()
                    },
                );
                line(
                    "load time",
                    &if meta.load_time_us == 0 {
                        "not recorded (kept only with a soft expiry, for early refresh)".to_owned()
                    } else {
                        human(Duration::from_micros(u64::from(meta.load_time_us)))
                    },
                );
                line(
                    "generation",
                    &if meta.generation == 0 && self.generation.is_none() {
                        "0 (no group)".to_owned()
                    } else {
                        meta.generation.to_string()
                    },
                );
                if let Some(tags) = &meta.tags {
                    let recorded: Vec<String> = (tags.iter())
                        .map(|t| format!("{} at generation {}", t.tag, t.generation))
                        .collect();
                    line("tags", &recorded.join(", "));
                }
                line("payload", &format!("{payload_len} bytes"));
            }
        }
        if let Some((gen_key, value)) = &self.generation {
            let group = self.key.group().unwrap_or_default();
            let value = match value {
                Generation::Missing => "generation missing".to_owned(),
                Generation::Value(v) => match v.parse::<u64>() {
                    Ok(g) => format!("generation {g}"),
                    Err(_) => format!("generation {v:?} (not a number)"),
                },
                Generation::Foreign(kind) => {
                    format!("no generation: the key holds a {kind}, not a number (a string)")
                }
            };
            line("group", &format!("{group} ({gen_key}): {value}"));
        }
        let state = match self.state() {
            State::Missing => "missing".to_owned(),
            State::NotAnEntry => "not a cachet entry".to_owned(),
            State::Current => "current".to_owned(),
            State::Orphaned(why) => format!("orphaned: {why}"),
        };
        line("state", &state);
        if payload && let Some((name, bytes)) = self.shown_bytes() {
            line(name, &hex(&bytes));
        }
        out.pop();
        out
    }

    fn soft_expiry_text(&self, ms: u64) -> String {
        if ms == 0 {
            return "none".to_owned();
        }
        let when = if ms >= self.now_ms {
            format!("in {}", human(Duration::from_millis(ms - self.now_ms)))
        } else {
            format!(
                "{} ago: stale",
                human(Duration::from_millis(self.now_ms - ms))
            )
        };
        format!("{} ({when})", utc(ms))
    }

    fn json(&self, payload: bool) -> Value {
        let ms = |d: Option<Duration>| {
            d.filter(|d| *d != Duration::MAX)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        };
        let (envelope, decode_error, payload_bytes) = match self.decoded() {
            None => (Value::Null, Value::Null, Value::Null),
            Some(Err(e)) => (Value::Null, json!(e.to_string()), Value::Null),
            Some(Ok((meta, len))) => {
                let soft = meta.soft_expiry_ms;
                let in_ms = (soft != 0).then(|| i128::from(soft) - i128::from(self.now_ms));
                (
                    json!({
                        "format_version": self.bytes.as_ref().and_then(|b| b.first()),
                        "negative": meta.negative,
                        "soft_expiry_ms": soft,
                        "soft_expiry_utc": (soft != 0).then(|| utc(soft)),
                        "soft_expiry_in_ms": in_ms.map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
                        "version": meta.version,
                        "load_time_us": meta.load_time_us,
                        "generation": meta.generation,
                    }),
                    Value::Null,
                    json!(len),
                )
            }
        };
        let group = self.generation.as_ref().map(|(gen_key, value)| {
            json!({
                "group": self.key.group(),
                "generation_key": gen_key,
                "generation": self.current_generation(),
                "generation_raw": value.raw(),
                "generation_type": value.kind(),
            })
        });
        let mut v = json!({
            "key": self.key.as_str(),
            "exists": self.kind != "none",
            "type": self.kind,
            "ttl_ms": ms(self.ttls.entry),
            "persistent": self.ttls.entry == Some(Duration::MAX),
            "lease_ttl_ms": ms(self.ttls.lease),
            "lease_persistent": self.ttls.lease == Some(Duration::MAX),
            "size_bytes": self.bytes.as_ref().map(Bytes::len),
            "envelope": envelope,
            "decode_error": decode_error,
            "payload_bytes": payload_bytes,
            "group": group,
            "state": self.state_name(),
        });
        if payload && let (Some((name, bytes)), Some(map)) = (self.shown_bytes(), v.as_object_mut())
        {
            map.insert(name.replace(' ', "_"), json!(hex(&bytes)));
        }
        v
    }
}

fn ttl_text(ttl: Option<Duration>) -> String {
    match ttl {
        None => "none (no entry)".to_owned(),
        Some(Duration::MAX) => "none: the key has no TTL, so cachet did not write it".to_owned(),
        Some(t) => human(t),
    }
}

fn lease_text(lease: Option<Duration>) -> String {
    match lease {
        None => "none (no load in progress)".to_owned(),
        Some(Duration::MAX) => "not cachet's: the lease key has no TTL, so cachet did not write \
            it (the cache takes it over on its next load)"
            .to_owned(),
        Some(t) => format!("held, expires in {} (a load is in progress)", human(t)),
    }
}

/// At most [`PAYLOAD_SHOWN`] bytes in hex, and how many more there are.
fn hex(bytes: &[u8]) -> String {
    let mut s: String = bytes
        .iter()
        .take(PAYLOAD_SHOWN)
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
    if bytes.len() > PAYLOAD_SHOWN {
        let _ = write!(s, "… ({} more bytes)", bytes.len() - PAYLOAD_SHOWN);
    }
    s
}

/// A duration for people: `850 ms`, `59.8 s`, `12 min 5 s`, `3 h 20 min`.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1 {
        format!("{} µs", d.as_micros())
    } else if ms < 1_000 {
        format!("{ms} ms")
    } else if s < 120 {
        format!("{:.1} s", d.as_secs_f64())
    } else if s < 7_200 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3_600, s % 3_600 / 60)
    }
}

/// Unix milliseconds as an ISO 8601 UTC time, `2025-03-01T12:00:00.000Z`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(human(Duration::from_micros(5)), "5 µs");
        assert_eq!(human(Duration::from_millis(850)), "850 ms");
        assert_eq!(human(Duration::from_millis(59_800)), "59.8 s");
        assert_eq!(human(Duration::from_secs(725)), "12 min 5 s");
        assert_eq!(human(Duration::from_secs(12_000)), "3 h 20 min");
    }

    #[test]
    fn hex_is_truncated() {
        assert_eq!(hex(&[0, 1, 0xff]), "0001ff");
        let long = vec![0xab; PAYLOAD_SHOWN + 3];
        let h = hex(&long);
        assert!(h.ends_with("… (3 more bytes)"), "{h}");
        assert!(h.starts_with(&"ab".repeat(PAYLOAD_SHOWN)), "{h}");
    }

    fn found(bytes: Option<&[u8]>, generation: Option<Option<&str>>) -> Found {
        let generation =
            generation.map(|g| g.map_or(Generation::Missing, |g| Generation::Value(g.to_owned())));
        found_in_group(bytes, generation)
    }

    fn found_in_group(bytes: Option<&[u8]>, generation: Option<Generation>) -> Found {
        let layout = KeyLayout::new("cachet:", "users").unwrap();
        let key = match generation {
            Some(_) => layout.grouped_key("acme", "42"),
            None => layout.key("42"),
        };
        Found {
            generation: generation.map(|g| (key.group_key().unwrap().as_str().to_owned(), g)),
            key,
            kind: if bytes.is_some() { "string" } else { "none" }.to_owned(),
            ttls: Ttls {
                entry: bytes.map(|_| Duration::from_secs(60)),
                lease: None,
            },
            bytes: bytes.map(Bytes::copy_from_slice),
            now_ms: 1_000_000,
        }
    }

    #[test]
    fn states() {
        let meta = Meta {
            generation: 7,
            ..Meta::default()
        };
        let entry = envelope::encode(&meta, b"xy");
        assert_eq!(found(None, None).state(), State::Missing);
        assert_eq!(found(Some(b"junk"), None).state(), State::NotAnEntry);
        assert_eq!(found(Some(&entry), Some(Some("7"))).state(), State::Current);
        assert!(matches!(
            found(Some(&entry), Some(Some("8"))).state(),
            State::Orphaned(_)
        ));
        assert!(matches!(
            found(Some(&entry), Some(None)).state(),
            State::Orphaned(_)
        ));
        let text = found(Some(b"junk"), None).text(false);
        assert!(text.contains("does not decode"), "{text}");
        // A load time of 0 is one the entry does not carry, not a load that
        // took no time.
        let text = found(Some(&entry), Some(Some("7"))).text(false);
        assert!(text.contains("load time     not recorded"), "{text}");
        let v = found(Some(&entry), Some(Some("7"))).json(true);
        assert_eq!(v["envelope"]["generation"], 7);
        assert_eq!(v["payload_bytes"], 2);
        assert_eq!(v["payload_hex"], "7879");
        assert_eq!(v["state"], "current");

        // A generation key of another type counts as none.
        let foreign = found_in_group(Some(&entry), Some(Generation::Foreign("hash".into())));
        assert!(matches!(foreign.state(), State::Orphaned(_)));
        let text = foreign.text(false);
        assert!(text.contains("the key holds a hash"), "{text}");
        let v = foreign.json(false);
        assert_eq!(v["group"]["generation_type"], "hash");
        assert!(v["group"]["generation"].is_null());
    }

    #[test]
    fn leases() {
        assert_eq!(lease_text(None), "none (no load in progress)");
        assert!(lease_text(Some(Duration::from_secs(5))).starts_with("held, expires in 5.0 s"));
        let foreign = lease_text(Some(Duration::MAX));
        assert!(foreign.contains("the lease key has no TTL"), "{foreign}");
        assert!(!foreign.contains("held"), "{foreign}");
    }
}
