//! The Lua scripts of write-behind: every multi-step operation on the stream
//! is one of these, run with `EVALSHA` (and loaded again on `NOSCRIPT`).
//!
//! The scripts touch a cache entry (and its lease, and its group's generation)
//! together with the stream, keys in different hash slots: they need a single
//! Redis node, not a Redis Cluster.
//!
//! Versions travel as the 8 big-endian bytes of the envelope's version field
//! (read with `cachet_core::envelope::ENVELOPE_LUA`), and are compared byte by
//! byte: Lua numbers are doubles, exact only below 2^53, and Lua's string
//! comparison follows the server's locale.

use std::sync::LazyLock;

use cachet_core::envelope::ENVELOPE_LUA;
use cachet_redis::GENERATION_LUA;
use redis::Script;

/// `older(a, b)`: whether the 8-byte big-endian version `a` is below `b`.
/// `entry_version(bytes)`: the version of an entry, or `nil` when the bytes
/// are not one.
const HELPERS: &str = r"
local function older(a, b)
  for i = 1, 8 do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return false
end
local function entry_version(bytes)
  if envelope(bytes) then return envelope_version(bytes) end
  return nil
end
local UNVERSIONED = string.rep('\0', 8)
";

fn script(body: &str) -> Script {
    Script::new(&format!("{ENVELOPE_LUA}{HELPERS}{GENERATION_LUA}{body}"))
}

/// One write-behind write, in one atomic step.
///
/// `KEYS[1]` the entry, `KEYS[2]` its lease, `KEYS[3]` the stream, `KEYS[4]`
/// (grouped keys only) the group's generation. `ARGV[1]` the entry (envelope and
/// codec bytes), `ARGV[2]` its TTL in ms (0: the cache's expiry policy keeps
/// the value out of the cache), `ARGV[3]` the backlog bound,
/// `ARGV[4]` the version in decimal, `ARGV[5]` the cache's invalidation bus
/// channel, `ARGV[6]` the length of the codec bytes, which end 4 bytes (the
/// checksum) before the entry does.
///
/// 1. If the stream holds `ARGV[3]` entries or more, nothing is written:
///    returns `{0, backlog}`.
/// 2. For a grouped key, stamps the group's generation into the envelope, as
///    the store's `SET` does.
/// 3. If the entry there now is current and has a version at least as new,
///    nothing is written: returns `{2, its version}` (8 bytes).
/// 4. Otherwise `SET entry … PX ttl` (`DEL entry` for a TTL of 0), `DEL lease` (a load that took the lease
///    before this write cannot fill over it), and `XADD` of
///    `{key, version, value}` (`value`: the codec bytes, without the envelope
///    and its trailing 4-byte checksum),
///    and the notice `k <entry key>` on the invalidation bus, as the store
///    sends after a `set`, for near caches. Returns `{1, stream id}`.
pub(crate) static WRITE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local backlog = redis.call('XLEN', KEYS[3])
if backlog >= tonumber(ARGV[3]) then return {0, backlog} end
local entry = ARGV[1]
local stamp = nil
if KEYS[4] then
  stamp = struct.pack('>I8', tonumber(generation(KEYS[4])))
  entry = envelope_stamp(entry, stamp)
end
local old = redis.call('GET', KEYS[1])
local current = entry_version(old)
if current and current ~= UNVERSIONED and (not stamp or envelope_generation(old) == stamp)
   and not older(current, envelope_version(entry)) then
  return {2, current}
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1], KEYS[2])
else
  redis.call('SET', KEYS[1], entry, 'PX', ARGV[2])
  redis.call('DEL', KEYS[2])
end
local id = redis.call('XADD', KEYS[3], '*', 'key', KEYS[1], 'version', ARGV[4],
  'value', string.sub(entry, -4 - tonumber(ARGV[6]), -5))
redis.call('PUBLISH', ARGV[5], 'k ' .. KEYS[1])
return {1, id}
",
    )
});

/// Acknowledges a batch the sink applied, and brings the cache in line.
///
/// `KEYS[1]` the stream, then for each applied key its entry and its lease
/// (`KEYS[2i]`, `KEYS[2i+1]`). `ARGV[1]` the group, `ARGV[2]` the invalidation
/// bus channel, `ARGV[3]` the number of keys `n`, `ARGV[4..n+3]` each key's
/// applied version (8 bytes), then the stream ids to acknowledge.
///
/// For each key: deletes the lease (a load that read the source before the
/// apply cannot fill), and deletes the entry if it holds an older version (a
/// reader that loaded the old row after the entry expired, before the flush),
/// with a notice on the bus for near caches. Then `XACK` and `XDEL` of the ids,
/// together: an entry leaves the stream only once applied. Returns how many ids
/// were still pending.
pub(crate) static ACK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local n = tonumber(ARGV[3])
local notices = {}
for i = 1, n do
  redis.call('DEL', KEYS[2 * i + 1])
  local old = redis.call('GET', KEYS[2 * i])
  if old then
    local current = entry_version(old)
    if not current or older(current, ARGV[3 + i]) then
      redis.call('DEL', KEYS[2 * i])
      notices[#notices + 1] = 'k ' .. KEYS[2 * i]
    end
  end
end
if #notices > 0 then redis.call('PUBLISH', ARGV[2], table.concat(notices, '\n')) end
local ids = {}
for i = n + 4, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then return 0 end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
return acked
",
    )
});

/// Moves entries this consumer holds to the dead-letter stream.
///
/// `KEYS[1]` the stream, `KEYS[2]` the dead-letter stream. `ARGV[1]` the group,
/// `ARGV[2]` this consumer, then triples: id, deliveries, reason. Each entry
/// still pending to this consumer is copied to the dead-letter stream with its
/// fields plus `origin_id`, `deliveries` and `reason`; then it is acknowledged
/// and deleted, all in this one step, so it is never in neither stream. An
/// entry another flusher claimed meanwhile (or acknowledged) is left to it.
/// Returns how many were moved.
pub(crate) static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local moved = 0
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    local found = redis.call('XRANGE', KEYS[1], id, id)
    if found[1] then
      local args = {KEYS[2], '*'}
      for _, f in ipairs(found[1][2]) do args[#args + 1] = f end
      args[#args + 1] = 'origin_id'; args[#args + 1] = id
      args[#args + 1] = 'deliveries'; args[#args + 1] = ARGV[i + 1]
      args[#args + 1] = 'reason'; args[#args + 1] = ARGV[i + 2]
      redis.call('XADD', unpack(args))
      moved = moved + 1
    end
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
  end
end
return moved
",
    )
});

/// Sorts entries just claimed (`claimed`, `XCLAIM`-shaped) into those to try
/// again and those delivered more than `max_deliveries` times without being
/// acknowledged, which it moves to the dead-letter stream as [`DEAD_LETTER`]
/// does, without trying them again: they probably crash or stall the flushers
/// that take them. `KEYS[1]` the stream, `KEYS[2]` the dead-letter stream.
/// Returns `live entries, their delivery counts, dead` where `dead` is flat:
/// id, key, version, deliveries for each.
const SORT_CLAIMED_LUA: &str = r"
local function sort_claimed(group, claimed, max)
  local live, counts, dead = {}, {}, {}
  for _, e in ipairs(claimed) do
    local id, fields = e[1], e[2]
    if not fields then
      -- Deleted from the stream while pending (Redis 6.2 reports it this way).
      redis.call('XACK', KEYS[1], group, id)
    else
      local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
      local n = 1
      if p[1] then n = tonumber(p[1][4]) end
      if n > max then
        local args = {KEYS[2], '*'}
        local key, version = '', ''
        for i = 1, #fields, 2 do
          args[#args + 1] = fields[i]; args[#args + 1] = fields[i + 1]
          if fields[i] == 'key' then key = fields[i + 1] end
          if fields[i] == 'version' then version = fields[i + 1] end
        end
        args[#args + 1] = 'origin_id'; args[#args + 1] = id
        args[#args + 1] = 'deliveries'; args[#args + 1] = tostring(n)
        args[#args + 1] = 'reason'
        args[#args + 1] = 'poison: delivered ' .. n .. ' times without being acknowledged, more '
          .. 'than max_deliveries ' .. max .. '; it may crash or stall its flushers'
        redis.call('XADD', unpack(args))
        redis.call('XACK', KEYS[1], group, id)
        redis.call('XDEL', KEYS[1], id)
        dead[#dead + 1] = id; dead[#dead + 1] = key
        dead[#dead + 1] = version; dead[#dead + 1] = n
      else
        live[#live + 1] = e
        counts[#counts + 1] = n
      end
    end
  end
  return live, counts, dead
end
";

/// Claims entries left pending too long (their flusher died, or their batch
/// failed), and dead-letters those delivered too often.
///
/// `KEYS[1]` the stream, `KEYS[2]` the dead-letter stream. `ARGV[1]` the group,
/// `ARGV[2]` this consumer, `ARGV[3]` the minimum idle time in ms, `ARGV[4]`
/// the scan cursor, `ARGV[5]` the most to claim, `ARGV[6]` `max_deliveries`.
///
/// `XAUTOCLAIM` (which counts a delivery), then the claimed entries sorted as
/// `sort_claimed` does. Returns `{next cursor, live entries, their delivery
/// counts, dead}`.
pub(crate) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        "{SORT_CLAIMED_LUA}{}",
        r"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local live, counts, dead = sort_claimed(ARGV[1], r[2], tonumber(ARGV[6]))
return {r[1], live, counts, dead}
"
    ))
});

/// Takes again the entries this consumer holds, however briefly idle: after
/// a failure that was not theirs (a transient sink error, a lost connection),
/// so that they are retried after the flusher's backoff rather than after the
/// minimum idle time. Other consumers' entries are left alone.
///
/// `KEYS[1]` the stream, `KEYS[2]` the dead-letter stream. `ARGV[1]` the group,
/// `ARGV[2]` this consumer, `ARGV[3]` the most to take, `ARGV[4]`
/// `max_deliveries`.
///
/// `XPENDING` of this consumer, `XCLAIM` of those ids to itself (which
/// counts a delivery), then sorted as `sort_claimed` does. Returns `{'0-0',
/// live entries, their delivery counts, dead}`, as [`CLAIM`] does.
pub(crate) static RETRY_OWN: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        "{SORT_CLAIMED_LUA}{}",
        r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[3], ARGV[2])
if #p == 0 then return {'0-0', {}, {}, {}} end
local ids = {}
for _, e in ipairs(p) do ids[#ids + 1] = e[1] end
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))
local live, counts, dead = sort_claimed(ARGV[1], claimed, tonumber(ARGV[4]))
return {'0-0', live, counts, dead}
"
    ))
});

/// Sets the delivery counts of entries this consumer holds, after failures
/// that must not count as attempts (the sink reported a transient error, or
/// the entry was claimed but never tried).
///
/// `KEYS[1]` the stream. `ARGV[1]` the group, `ARGV[2]` this consumer, then
/// pairs: id, delivery count. `XCLAIM … JUSTID` does not count a delivery;
/// it also resets the idle time, so the entry waits the minimum idle time
/// again before it is claimed. Entries no longer pending to this consumer
/// (another flusher claimed them meanwhile) are left alone.
pub(crate) static RECOUNT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
for i = 3, #ARGV, 2 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
  end
end
return 1
",
    )
});

/// Deletes consumers of the group that hold no pending entry and have been
/// idle at least `ARGV[3]` ms (flushers that stopped or died: one per
/// restart otherwise accumulates). A consumer with pending entries is never
/// deleted, since that would drop its pending entries; a live flusher that is
/// deleted while idle is created again by its next read.
///
/// `KEYS[1]` the stream. `ARGV[1]` the group, `ARGV[2]` this consumer.
/// Returns how many were deleted.
pub(crate) static PRUNE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local deleted = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name and name ~= ARGV[2] and pending == 0 and idle and idle >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    deleted = deleted + 1
  end
end
return deleted
",
    )
});

/// Moves up to `ARGV[1]` entries from the dead-letter stream back to the
/// stream, oldest first, with their `key`, `version` and `value`.
///
/// `KEYS[1]` the stream, `KEYS[2]` the dead-letter stream. Returns how many.
pub(crate) static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local moved = 0
for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', ARGV[1])) do
  local args = {KEYS[1], '*'}
  local f = e[2]
  for i = 1, #f, 2 do
    if f[i] == 'key' or f[i] == 'version' or f[i] == 'value' then
      args[#args + 1] = f[i]; args[#args + 1] = f[i + 1]
    end
  end
  redis.call('XADD', unpack(args))
  redis.call('XDEL', KEYS[2], e[1])
  moved = moved + 1
end
return moved
",
    )
});
