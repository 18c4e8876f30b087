//! The Lua scripts of the lease protocol: every multi-step operation on Redis is
//! one of these, run with `EVALSHA` (and loaded again on `NOSCRIPT`).
//!
//! Each script touches only an entry key and its lease key, which share a hash tag
//! and hence a Redis Cluster slot, or keys that share one otherwise (a group's
//! generation, a queue shard's sets), or one key (a tag's generation, the tag
//! clock).

use std::sync::LazyLock;

use cachet_core::envelope::ENVELOPE_LUA;
use redis::Script;

/// Read-or-lease.
///
/// `KEYS[1]` entry, `KEYS[2]` lease; `ARGV[1]` token, `ARGV[2]` lease TTL in ms,
/// `ARGV[3]` mode (`0`: return the entry if present; `1`: take the lease even so).
///
/// Returns `{1, entry}` when the entry is present (mode 0; empty bytes, which
/// are not an entry, when the key holds another type), `{2}` when the lease
/// was granted, `{3, pttl}` when another token holds it. A lease key without a
/// TTL is no lease of cachet's (each has one): it is taken over at once rather
/// than waited for.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{ACQUIRE_FN}return acquire(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])"
    ))
});

/// The body of [`ACQUIRE`], as a function of entry, lease, token, lease TTL
/// and mode.
const ACQUIRE_FN: &str = r"
local function acquire(entry, lease, token, ttl, mode)
  if mode == '0' then
    local v = redis.pcall('GET', entry)
    if type(v) == 'table' then return {1, ''} end
    if v then return {1, v} end
  end
  if redis.call('SET', lease, token, 'NX', 'PX', ttl) then
    return {2}
  end
  local left = redis.call('PTTL', lease)
  if left == -1 then
    redis.call('SET', lease, token, 'PX', ttl)
    return {2}
  end
  return {3, left}
end
";

/// [`ACQUIRE`] for many keys (of one hash slot on a cluster).
///
/// `KEYS` entry and lease of each key in turn; `ARGV[1]` lease TTL in ms,
/// `ARGV[2]` mode, then each key's token. Returns `ACQUIRE`'s reply for each
/// key, in order.
pub(crate) static ACQUIRE_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{ACQUIRE_FN}
local replies = {{}}
for i = 1, #KEYS / 2 do
  replies[i] = acquire(KEYS[2 * i - 1], KEYS[2 * i], ARGV[2 + i], ARGV[1], ARGV[2])
end
return replies
"
    ))
});

/// Fill-if-lease-valid.
///
/// `KEYS[1]` entry, `KEYS[2]` lease; `ARGV[1]` token, `ARGV[2]` entry bytes,
/// `ARGV[3]` entry TTL in ms. Writes value and TTL in one `SET … PX` and consumes
/// the lease if `ARGV[1]` still holds it. Returns 1 if written, 0 if refused.
pub(crate) static FILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FILL_FN}return fill(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])"
    ))
});

/// The body of [`FILL`], as a function of entry, lease, token, bytes and TTL.
const FILL_FN: &str = r"
local function fill(entry, lease, token, bytes, ttl)
  if redis.call('GET', lease) == token then
    redis.call('SET', entry, bytes, 'PX', ttl)
    redis.call('DEL', lease)
    return 1
  end
  return 0
end
";

/// [`FILL`] for many keys (of one hash slot on a cluster).
///
/// `KEYS` entry and lease of each key in turn; `ARGV` token, entry bytes and
/// TTL of each key in turn. Returns 1 or 0 for each key, in order.
pub(crate) static FILL_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{FILL_FN}
local filled = {{}}
for i = 1, #KEYS / 2 do
  filled[i] = fill(KEYS[2 * i - 1], KEYS[2 * i], ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i])
end
return filled
"
    ))
});

/// Owner-only release: compare-and-delete of the lease.
///
/// `KEYS[1]` lease; `ARGV[1]` token. Returns 1 if released.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Unconditional set that revokes the lease.
///
/// `KEYS[1]` entry, `KEYS[2]` lease; `ARGV[1]` entry bytes, `ARGV[2]` TTL in
/// ms; then, for an invalidation notice sent with the write, `ARGV[3]` the
/// channel and `ARGV[4]` the notice. Returns 1, or 0 if the notice was
/// refused (the write stands).
pub(crate) static SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOTICE}{}",
        r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if notice_refused() then return 0 end
return 1
"
    ))
});

/// `notice_refused()`, for the end of a write's script: publishes `ARGV[4]` on
/// channel `ARGV[3]`, if given; true if the server refused it.
const NOTICE: &str = r"
local function notice_refused()
  if not ARGV[3] then return false end
  local sent = redis.pcall('PUBLISH', ARGV[3], ARGV[4])
  return type(sent) == 'table' and sent.err ~= nil
end
";

/// Queue a deferred invalidation.
///
/// `KEYS[1]` the due set of a queue shard; `ARGV[1]` the member (a unique id,
/// `|`, the entry key), `ARGV[2]` the delay in ms. The due time is taken from the
/// server's clock, like every time in the queue, so client clocks do not matter.
pub(crate) static DEFER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return now
",
    )
});

/// Claim due deferred invalidations.
///
/// `KEYS[1]` the due set, `KEYS[2]` the claimed set of one queue shard (same
/// hash tag); `ARGV[1]` the most to claim, `ARGV[2]` the visibility timeout in ms.
/// First, claims whose visibility timeout passed (their worker died) become due
/// again; then up to `ARGV[1]` due members move to the claimed set, scored with
/// their visibility deadline. An item is always in exactly one of the two sets,
/// and moves between them only here, so two workers never claim it at once and
/// none is skipped. Returns `{claimed members, next due time or -1, now}`.
pub(crate) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max = tonumber(ARGV[1])
local stuck = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, max)
for _, m in ipairs(stuck) do
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZADD', KEYS[1], now, m)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, max)
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), m)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then next_due = tonumber(first[2]) end
return {due, next_due, now}
",
    )
});

/// Reads a group's generation, creating it if it is missing. A new generation is
/// the server's time in microseconds: later than any generation the group had
/// before it was evicted or lost, so entries filled under those stay orphaned.
/// Generations are kept as decimal strings (exact: they stay below 2^53). A
/// generation key that holds something else (not a number, or a key of
/// another type, planted or corrupt) is replaced the same way, so it never
/// disables caching for the group.
pub(crate) const GENERATION: &str = r"
local function generation(key)
  local g = redis.pcall('GET', key)
  if type(g) == 'string' and tonumber(g) then return g end
  if type(g) == 'table' then redis.call('DEL', key) end
  local t = redis.call('TIME')
  g = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('SET', key, g)
  return g
end
";

fn with_generation(body: &str) -> Script {
    Script::new(&format!("{GENERATION}{body}"))
}

/// Read of a grouped key: the entry and its group's generation, in one round trip.
///
/// `KEYS[1]` entry, `KEYS[2]` generation. Returns `{entry or nil, generation}`.
pub(crate) static GET_GROUPED: LazyLock<Script> = LazyLock::new(|| {
    with_generation(
        r"
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then v = '' end
return {v or false, generation(KEYS[2])}
",
    )
});

/// [`ACQUIRE`] for a grouped key; every reply ends with the group's generation.
///
/// `KEYS[1]` entry, `KEYS[2]` lease, `KEYS[3]` generation; `ARGV` as `ACQUIRE`.
pub(crate) static ACQUIRE_GROUPED: LazyLock<Script> = LazyLock::new(|| {
    with_generation(
        r"
local g = generation(KEYS[3])
if ARGV[3] == '0' then
  local v = redis.pcall('GET', KEYS[1])
  if type(v) == 'table' then return {1, '', g} end
  if v then return {1, v, g} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, g}
end
local left = redis.call('PTTL', KEYS[2])
if left == -1 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {2, g}
end
return {3, left, g}
",
    )
});

/// [`FILL`] for a grouped key: also refused if the group's generation is no
/// longer the one the lease was granted under (`ARGV[4]`).
///
/// `KEYS[1]` entry, `KEYS[2]` lease, `KEYS[3]` generation.
pub(crate) static FILL_GROUPED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) == ARGV[1] and redis.call('GET', KEYS[3]) == ARGV[4] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
",
    )
});

/// [`SET`] for a grouped key: stamps the group's current generation into the
/// envelope (see `cachet_core::envelope`) before writing.
///
/// `KEYS[1]` entry, `KEYS[2]` lease, `KEYS[3]` generation; `ARGV[1]` entry
/// bytes, `ARGV[2]` TTL in ms; `ARGV[3]` and `ARGV[4]` as for [`SET`].
pub(crate) static SET_GROUPED: LazyLock<Script> = LazyLock::new(|| {
    with_generation(&format!(
        "{ENVELOPE_LUA}{NOTICE}{}",
        r"
local g = generation(KEYS[3])
local v = envelope_stamp(ARGV[1], struct.pack('>I8', tonumber(g)))
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if notice_refused() then return 0 end
return 1
"
    ))
});

/// Moves a counter to a value it never had: a group's generation, for a group
/// invalidation (step 1), or a cache's tag clock, for a tag invalidation (step
/// 2, so the clock stays even: tag generations made by invalidations are its
/// values, and a tag seen for the first time gets the clock plus one, odd,
/// which no invalidation gives).
///
/// `KEYS[1]` the counter; `ARGV[1]` the step. The new value is the later of
/// step times the server's time in microseconds and the old value, rounded
/// down to a multiple of the step, plus the step (a value that is not a
/// number, or a key of another type, counts as none). Returns it.
pub(crate) static BUMP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local step = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = step * (tonumber(t[1]) * 1000000 + tonumber(t[2]))
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' then
  redis.call('DEL', KEYS[1])
  cur = false
end
local old = tonumber(cur or '0') or 0
local new = string.format('%.0f', math.max(now, old - old % step + step))
redis.call('SET', KEYS[1], new)
return new
",
    )
});

/// Reads a cache's tag clock, starting it if it is missing: at twice the
/// server's time in microseconds, so that it is even and later than any value
/// the clock had before it was lost (see [`BUMP`]). A clock that is
/// not a number (or a key of another type) is started again the same way.
/// Clock values stay below 2^53, exact in Lua's doubles.
const TAG_CLOCK_LUA: &str = r"
local function tag_clock(key)
  local c = redis.pcall('GET', key)
  if type(c) == 'string' and tonumber(c) then return c end
  if type(c) == 'table' then redis.call('DEL', key) end
  local t = redis.call('TIME')
  c = string.format('%.0f', 2 * (tonumber(t[1]) * 1000000 + tonumber(t[2])))
  redis.call('SET', key, c)
  return c
end
";

/// The tag clock, read or started.
///
/// `KEYS[1]` the clock. Returns its value, a decimal string.
pub(crate) static TAG_CLOCK: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{TAG_CLOCK_LUA}return tag_clock(KEYS[1])")));

/// Raises a tag's generation to at least `ARGV[1]`: for an invalidation (a
/// new clock value) and for a tag seen for the first time (the clock plus
/// one). Never lowers it, so of two racing invalidations the later clock value
/// stays. A generation that is not a number (or a key of another type) counts
/// as none and is replaced.
///
/// `KEYS[1]` the tag's generation. Returns the generation now, a decimal string.
pub(crate) static RAISE_TAG: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' then
  redis.call('DEL', KEYS[1])
  cur = false
end
if cur and tonumber(cur) and tonumber(cur) >= tonumber(ARGV[1]) then return cur end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
",
    )
});

/// Bloom filter check: whether every given bit of the bitmap is set.
///
/// `KEYS[1]` the filter; `ARGV[1]` its size in bytes, `ARGV[2..]` bit positions.
/// Returns 0 at the first bit that is clear, 1 if all are set, and -1 if the
/// filter is not built (missing, or of another size), which rules nothing out.
pub(crate) static BLOOM_CHECK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return -1 end
for i = 2, #ARGV do
  if redis.call('GETBIT', KEYS[1], ARGV[i]) == 0 then return 0 end
end
return 1
",
    )
});

/// Bloom filter insertion: sets the given bits, all at once.
///
/// `KEYS[1]` the filter; `ARGV[1]` its size in bytes, `ARGV[2..]` bit positions.
/// A filter that is not built is left alone: setting bits would create a
/// filter that lacks every other key. Returns 1 if the bits were set, 0 if not.
pub(crate) static BLOOM_ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return 0 end
for i = 2, #ARGV do
  redis.call('SETBIT', KEYS[1], ARGV[i], 1)
end
return 1
",
    )
});

/// One chunk of a Bloom filter rebuild, written into the rebuild's temporary key.
///
/// `KEYS[1]` the temporary key; `ARGV[1]` the chunk's byte offset, `ARGV[2]` its
/// bytes, `ARGV[3]` the temporary key's TTL in ms. Chunks arrive in order, so the
/// key must hold exactly `ARGV[1]` bytes: if it expired between two chunks, the
/// rebuild fails instead of building a bitmap with a hole of zeros.
pub(crate) static BLOOM_UPLOAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[1]) then
  return redis.error_reply('cachet: the temporary key of a Bloom filter rebuild expired')
end
redis.call('SETRANGE', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// The last chunk of a Bloom filter rebuild, and the swap.
///
/// `KEYS[1]` the filter, `KEYS[2]` the temporary key (same hash tag); `ARGV[1]`
/// the last chunk's byte offset, `ARGV[2]` its bytes, `ARGV[3]` the filter's
/// size in bytes. Writes the chunk as [`BLOOM_UPLOAD`] does, then `RENAME`s the
/// complete bitmap over the filter and removes the temporary key's TTL, so a
/// check sees the old filter or the new one, never a partial one. A small
/// filter is a single chunk: its whole rebuild is this one script.
pub(crate) static BLOOM_COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('STRLEN', KEYS[2]) ~= tonumber(ARGV[1]) then
  return redis.error_reply('cachet: the temporary key of a Bloom filter rebuild expired')
end
redis.call('SETRANGE', KEYS[2], ARGV[1], ARGV[2])
if redis.call('STRLEN', KEYS[2]) ~= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[2])
  return redis.error_reply('cachet: a Bloom filter rebuild of the wrong size')
end
redis.call('RENAME', KEYS[2], KEYS[1])
redis.call('PERSIST', KEYS[1])
return 1
",
    )
});

/// Compares the versions of two envelopes (big-endian), as two 32-bit halves
/// so that Lua's doubles stay exact.
const NEWER: &str = r"
local function at_least_as_new(current, offered)
  local ch, cl = struct.unpack('>I4I4', envelope_version(current))
  local oh, ol = struct.unpack('>I4I4', envelope_version(offered))
  return ch > oh or (ch == oh and cl >= ol)
end
";

/// Version-checked set: [`SET`], unless the entry there is at least as new.
///
/// `KEYS[1]` entry, `KEYS[2]` lease; `ARGV[1]` entry bytes, `ARGV[2]` TTL in
/// ms; `ARGV[3]` and `ARGV[4]` as for [`SET`], published only if written.
/// Returns `{1}` when written (`{1, 0}` if the notice was refused),
/// `{0, current version bytes}` when not.
pub(crate) static SET_VERSIONED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{ENVELOPE_LUA}{NEWER}{NOTICE}{}",
        r"
local current = redis.call('GET', KEYS[1])
if envelope(current) and at_least_as_new(current, ARGV[1]) then
  return {0, envelope_version(current)}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if notice_refused() then return {1, 0} end
return {1}
"
    ))
});

/// [`SET_VERSIONED`] for a grouped key: an entry of an older generation does not
/// count, and the written entry gets the current generation.
///
/// `KEYS[1]` entry, `KEYS[2]` lease, `KEYS[3]` generation; `ARGV` and the reply
/// as for [`SET_VERSIONED`].
pub(crate) static SET_VERSIONED_GROUPED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{GENERATION}{ENVELOPE_LUA}{NEWER}{NOTICE}{}",
        r"
local g = generation(KEYS[3])
local current = redis.call('GET', KEYS[1])
if envelope(current)
  and struct.unpack('>I8', envelope_generation(current)) == tonumber(g)
  and at_least_as_new(current, ARGV[1]) then
  return {0, envelope_version(current)}
end
local v = envelope_stamp(ARGV[1], struct.pack('>I8', tonumber(g)))
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if notice_refused() then return {1, 0} end
return {1}
"
    ))
});

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use cachet_core::envelope::{self, ENVELOPE_LUA, Meta};
    use cachet_testkit::RedisServer;

    /// `{is an entry, version bytes, generation bytes}` of `entry`, or, with
    /// `stamp`, the entry with its generation set to it.
    async fn lua(
        conn: &mut redis::aio::MultiplexedConnection,
        entry: &[u8],
        stamp: Option<u64>,
    ) -> redis::Value {
        let script = redis::Script::new(&format!(
            "{ENVELOPE_LUA}
if ARGV[2] then return envelope_stamp(ARGV[1], struct.pack('>I8', tonumber(ARGV[2]))) end
return {{envelope(ARGV[1]) and 1 or 0, envelope_version(ARGV[1]), envelope_generation(ARGV[1])}}"
        ));
        let mut call = script.prepare_invoke();
        call.arg(entry);
        if let Some(g) = stamp {
            call.arg(g);
        }
        call.invoke_async(conn).await.unwrap()
    }

    fn fields(version: u64, generation: u64) -> redis::Value {
        redis::Value::Array(vec![
            redis::Value::Int(1),
            redis::Value::BulkString(version.to_be_bytes().to_vec()),
            redis::Value::BulkString(generation.to_be_bytes().to_vec()),
        ])
    }

    /// The scripts read version and generation, and stamp the generation, on
    /// entries of both formats and whichever fields they set; bytes that are
    /// not an entry are told apart.
    #[tokio::test]
    async fn scripts_read_and_stamp_both_envelope_formats() {
        let server = RedisServer::start();
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let full = Meta {
            soft_expiry_ms: 1_790_000_000_000,
            version: 0x0102_0304_0506_0708,
            load_time_us: 1200,
            generation: 77,
            ..Meta::default()
        };
        let metas = [
            full.clone(),
            Meta::default(),
            Meta {
                version: 9,
                ..Meta::default()
            },
            Meta {
                generation: 5,
                load_time_us: 3,
                ..Meta::default()
            },
            Meta {
                soft_expiry_ms: 1,
                generation: 5,
                ..Meta::default()
            },
        ];
        for meta in &metas {
            let entry = envelope::encode(meta, b"payload");
            assert_eq!(
                lua(&mut conn, &entry, None).await,
                fields(meta.version, meta.generation),
                "{meta:?}"
            );
            // Stamped: the generation is the new one, the rest as it was,
            // the checksum still valid.
            let stamped = match lua(&mut conn, &entry, Some(123_456_789)).await {
                redis::Value::BulkString(b) => b,
                other => panic!("{other:?}"),
            };
            let (m, p) = envelope::decode(&Bytes::from(stamped)).unwrap();
            assert_eq!(
                m,
                Meta {
                    generation: 123_456_789,
                    ..meta.clone()
                }
            );
            assert_eq!(&p[..], b"payload");
        }

        // Format 1: every field at its fixed offset.
        let mut v1 = vec![1, 2];
        v1.extend_from_slice(&full.soft_expiry_ms.to_be_bytes());
        v1.extend_from_slice(&full.version.to_be_bytes());
        v1.extend_from_slice(&full.load_time_us.to_be_bytes());
        v1.extend_from_slice(&full.generation.to_be_bytes());
        v1.extend_from_slice(b"payload");
        assert_eq!(
            lua(&mut conn, &v1, None).await,
            fields(full.version, full.generation)
        );

        // Not entries: too short for their header, an unknown format. The
        // field functions still answer, without a script error.
        let truncated = &envelope::encode(&full, b"")[..20];
        for bytes in [
            &b""[..],
            b"\x02",
            &v1[..29],
            truncated,
            b"\x03\x02xyz",
            b"garbage",
        ] {
            match lua(&mut conn, bytes, None).await {
                redis::Value::Array(fields) => {
                    assert_eq!(fields[0], redis::Value::Int(0), "{bytes:?}");
                }
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
    }
}
