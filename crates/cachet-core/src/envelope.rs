//! The entry envelope: a header in front of every stored payload.
//!
//! Byte layout, format 2, which this crate writes (integers big-endian):
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! | 0      | 1    | format version, `2`                                          |
//! | 1      | 1    | flags, below; bit 7 must be 0                                |
//! | 2      | …    | the fields whose flag is set, in this order: soft expiry (8), version (8), load time (4), group generation (8) |
//! | …      | …    | when tagged (flag bit 2): the tags, see below                |
//! | …      | …    | payload as written by the cache's codec; empty when negative |
//! | end − 4 | 4   | when checksummed: the low 32 bits of the XXH3-64 of everything after the header (tags and payload) |
//!
//! The flags: bit 0 negative ("not found"), bit 1 checksummed, bit 2 tagged,
//! bit 3 soft expiry (Unix milliseconds), bit 4 value version from the source
//! of truth, bit 5 duration of the load that produced the value
//! (microseconds), bit 6 group generation the entry was filled under. A field
//! whose flag is clear is 0 (none). An entry with none of them costs 2 bytes of
//! header and 4 of checksum: a 100-byte value stays within the allocator size
//! class of a plain `SET` of the same value (`docs/performance.md`).
//!
//! The tags of a tagged entry: a count (1 byte, 1–255), then for each tag its
//! generation when the entry was filled (8 bytes), the length of its escaped
//! name (1 byte, 1–255) and the name. A tag costs 9 bytes plus its name, the
//! list 1 byte more.
//!
//! The Lua scripts read the version and the generation, and stamp the
//! generation, by walking the flags ([`ENVELOPE_LUA`]); the checksum covers
//! what follows the header only, so stamping leaves it valid.
//!
//! Format 1, written by earlier versions and still read: the same flags byte
//! with bits 0–2 only, then every field at a fixed offset whether set or not
//! (soft expiry at 2, version at 10, load time at 18, generation at 22), 30
//! bytes in all, then tags, payload and checksum as above.
//!
//! Anything that does not decode (too short, an unknown version or flag, a
//! negative entry with a payload, a malformed tag list, bytes whose checksum
//! does not match) is reported as a [`DecodeError`], which the cache treats as
//! a miss. Every entry this crate writes is checksummed; entries without the
//! flag (written before it existed) and entries without tags still decode.

use std::sync::Arc;

use bytes::{BufMut, Bytes};

/// The envelope format version this crate writes.
pub const FORMAT_VERSION: u8 = 2;
/// The format of earlier versions, with fixed offsets, still read.
const FORMAT_FIXED: u8 = 1;

const FLAG_NEGATIVE: u8 = 1 << 0;
const FLAG_CHECKSUM: u8 = 1 << 1;
const FLAG_TAGS: u8 = 1 << 2;
const FLAG_SOFT_EXPIRY: u8 = 1 << 3;
const FLAG_VERSION: u8 = 1 << 4;
const FLAG_LOAD_TIME: u8 = 1 << 5;
const FLAG_GENERATION: u8 = 1 << 6;
/// The flags of format 1.
const FIXED_FLAGS: u8 = FLAG_NEGATIVE | FLAG_CHECKSUM | FLAG_TAGS;
const KNOWN_FLAGS: u8 =
    FIXED_FLAGS | FLAG_SOFT_EXPIRY | FLAG_VERSION | FLAG_LOAD_TIME | FLAG_GENERATION;
/// The most tags one entry carries.
pub const MAX_TAGS: usize = 255;
/// The longest escaped tag name, in bytes.
pub const MAX_TAG_LEN: usize = 255;
/// Length of the checksum after the payload.
const CHECKSUM_LEN: usize = 4;
/// The longest header: format, flags and every field.
const MAX_HEADER_LEN: usize = 2 + 8 + 8 + 4 + 8;

/// Lua functions over stored entries, for the scripts that compare versions
/// or stamp a group's generation, on both formats:
///
/// - `envelope(v)`: whether `v` is an entry of a known format (long enough
///   for its header);
/// - `envelope_version(v)`, `envelope_generation(v)`: the field of the entry
///   `v` as 8 big-endian bytes (zeros when not set);
/// - `envelope_stamp(v, g)`: the format-2 entry `v` with its generation set to
///   the 8 bytes `g`.
///
/// The field functions expect an entry (check with `envelope` first); on other
/// bytes they return something, never raise an error.
///
/// They rely on `bit` and `string` only, which every Redis and Valkey
/// provides to scripts.
pub const ENVELOPE_LUA: &str = r"
local ENVELOPE_ZERO8 = string.rep(string.char(0), 8)
local ENVELOPE_FIELDS = {8, 16, 32, 64}
local ENVELOPE_FIXED_AT = {[8] = 3, [16] = 11, [32] = 19, [64] = 23}
local function envelope_offset(v, field)
  if string.byte(v, 1) == 1 then return ENVELOPE_FIXED_AT[field], true end
  local flags = string.byte(v, 2) or 0
  local at = 3
  for _, f in ipairs(ENVELOPE_FIELDS) do
    if f == field then return at, bit.band(flags, f) ~= 0 end
    if bit.band(flags, f) ~= 0 then at = at + (f == 32 and 4 or 8) end
  end
end
local function envelope(v)
  if not v then return false end
  local format = string.byte(v, 1)
  if format == 1 then return string.len(v) >= 30 end
  if format ~= 2 or string.len(v) < 2 then return false end
  local last = envelope_offset(v, 64)
  return string.len(v) >= last - 1 + (bit.band(string.byte(v, 2), 64) ~= 0 and 8 or 0)
end
local function envelope_field8(v, field)
  local at, present = envelope_offset(v, field)
  if not present then return ENVELOPE_ZERO8 end
  return string.sub(v, at, at + 7)
end
local function envelope_version(v) return envelope_field8(v, 16) end
local function envelope_generation(v) return envelope_field8(v, 64) end
local function envelope_stamp(v, g)
  local at, present = envelope_offset(v, 64)
  local rest = present and string.sub(v, at + 8) or string.sub(v, at)
  local flags = bit.bor(string.byte(v, 2), 64)
  return string.sub(v, 1, 1) .. string.char(flags) .. string.sub(v, 3, at - 1) .. g .. rest
end
";

/// The checksum of a payload: the low 32 bits of its XXH3-64.
fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    // Truncation intended: 32 bits catch accidental damage.
    #[allow(clippy::cast_possible_truncation)]
    let sum = xxhash_rust::xxh3::xxh3_64(payload) as u32;
    sum.to_be_bytes()
}

/// A tag an entry carries, with the tag's generation when the entry was
/// filled: the entry is current only while that is still the tag's generation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TagGeneration {
    /// The escaped tag name (as [`crate::escape_key`] writes it).
    pub tag: Box<str>,
    /// The tag's generation.
    pub generation: u64,
}

/// What the envelope says about an entry, apart from its payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// The entry records that the source of truth has no value for the key.
    pub negative: bool,
    /// Unix milliseconds after which the entry is stale but still servable; `0` for none.
    pub soft_expiry_ms: u64,
    /// The value's version in the source of truth; `0` when unversioned.
    pub version: u64,
    /// How long the load that produced the value took, in microseconds (saturating).
    pub load_time_us: u32,
    /// The generation of the entry's group when it was filled; `0` when the cache
    /// has no groups. An entry whose generation is not its group's current one is
    /// orphaned: a miss.
    pub generation: u64,
    /// The entry's tags and their generations when it was filled; `None` when
    /// the cache has no tags (or the value none). Never `Some` of an empty list.
    pub tags: Option<Arc<[TagGeneration]>>,
}

/// Why stored bytes are not a valid entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the header needs.
    #[error("entry is {0} bytes, shorter than its header")]
    Truncated(usize),
    /// A format version this build does not know.
    #[error("entry has format version {0}, this build reads versions 1 and {FORMAT_VERSION}")]
    Version(u8),
    /// Flags this build does not know.
    #[error("entry has unknown flags {0:#010b}")]
    Flags(u8),
    /// A negative entry that carries a payload.
    #[error("negative entry carries a {0}-byte payload")]
    NegativeWithPayload(usize),
    /// The payload does not match its checksum: the bytes were changed.
    #[error("entry payload does not match its checksum")]
    Checksum,
    /// The tag list is malformed (empty, truncated, or a name that is empty
    /// or not UTF-8).
    #[error("entry has a malformed tag list")]
    Tags,
    /// The payload was not written by this cache's codec or value type.
    #[error("payload does not decode: {0}")]
    Payload(String),
}

/// Writes the envelope header for `meta` followed by `payload` into one buffer.
///
/// # Panics
///
/// If `meta` has more than [`MAX_TAGS`] tags or a tag name longer than
/// [`MAX_TAG_LEN`] bytes (the cache refuses those before it encodes).
pub fn encode(meta: &Meta, payload: &[u8]) -> Vec<u8> {
    let tags: &[TagGeneration] = meta.tags.as_deref().unwrap_or_default();
    let tags_len: usize = tags.iter().map(|t| 9 + t.tag.len()).sum();
    let mut out = Vec::with_capacity(MAX_HEADER_LEN + 1 + tags_len + payload.len() + CHECKSUM_LEN);
    let mut flags = FLAG_CHECKSUM;
    let mut set = |flag: u8, on: bool| {
        if on {
            flags |= flag;
        }
    };
    set(FLAG_NEGATIVE, meta.negative);
    set(FLAG_TAGS, !tags.is_empty());
    set(FLAG_SOFT_EXPIRY, meta.soft_expiry_ms != 0);
    set(FLAG_VERSION, meta.version != 0);
    set(FLAG_LOAD_TIME, meta.load_time_us != 0);
    set(FLAG_GENERATION, meta.generation != 0);
    out.put_u8(FORMAT_VERSION);
    out.put_u8(flags);
    if flags & FLAG_SOFT_EXPIRY != 0 {
        out.put_u64(meta.soft_expiry_ms);
    }
    if flags & FLAG_VERSION != 0 {
        out.put_u64(meta.version);
    }
    if flags & FLAG_LOAD_TIME != 0 {
        out.put_u32(meta.load_time_us);
    }
    if flags & FLAG_GENERATION != 0 {
        out.put_u64(meta.generation);
    }
    let header = out.len();
    if !tags.is_empty() {
        out.put_u8(u8::try_from(tags.len()).expect("at most MAX_TAGS tags"));
        for t in tags {
            out.put_u64(t.generation);
            out.put_u8(u8::try_from(t.tag.len()).expect("tag names of at most MAX_TAG_LEN bytes"));
            out.extend_from_slice(t.tag.as_bytes());
        }
    }
    out.extend_from_slice(payload);
    let sum = checksum(&out[header..]);
    out.extend_from_slice(&sum);
    out
}

/// Reads the tag list at the start of `b`: the tags and their length in bytes.
fn decode_tags(b: &[u8]) -> Result<(Arc<[TagGeneration]>, usize), DecodeError> {
    let (&count, mut rest) = b.split_first().ok_or(DecodeError::Tags)?;
    if count == 0 {
        return Err(DecodeError::Tags);
    }
    let mut tags = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (generation, after) = rest.split_first_chunk::<8>().ok_or(DecodeError::Tags)?;
        let (&len, after) = after.split_first().ok_or(DecodeError::Tags)?;
        let name = after.get(..usize::from(len)).ok_or(DecodeError::Tags)?;
        let name = std::str::from_utf8(name).map_err(|_| DecodeError::Tags)?;
        if name.is_empty() {
            return Err(DecodeError::Tags);
        }
        tags.push(TagGeneration {
            tag: name.into(),
            generation: u64::from_be_bytes(*generation),
        });
        rest = &after[usize::from(len)..];
    }
    Ok((tags.into(), b.len() - rest.len()))
}

/// Splits stored bytes into their header and payload.
///
/// The payload is a zero-copy slice of `bytes`.
pub fn decode(bytes: &Bytes) -> Result<(Meta, Bytes), DecodeError> {
    let b = bytes.as_ref();
    let (meta, flags, header) = decode_header(b)?;
    let end = if flags & FLAG_CHECKSUM == 0 {
        b.len()
    } else {
        let end = (b.len().checked_sub(CHECKSUM_LEN))
            .filter(|&end| end >= header)
            .ok_or(DecodeError::Truncated(b.len()))?;
        if b[end..] != checksum(&b[header..end]) {
            return Err(DecodeError::Checksum);
        }
        end
    };
    let mut meta = meta;
    let mut start = header;
    if flags & FLAG_TAGS != 0 {
        let (tags, len) = decode_tags(&b[header..end])?;
        meta.tags = Some(tags);
        start += len;
    }
    let payload_len = end - start;
    if meta.negative && payload_len > 0 {
        return Err(DecodeError::NegativeWithPayload(payload_len));
    }
    Ok((meta, bytes.slice(start..end)))
}

/// The header's fields (tags aside), its flags and its length.
fn decode_header(b: &[u8]) -> Result<(Meta, u8, usize), DecodeError> {
    let (&format, rest) = b.split_first().ok_or(DecodeError::Truncated(b.len()))?;
    let (&flags, mut rest) = rest.split_first().ok_or(DecodeError::Truncated(b.len()))?;
    let (known, fixed) = match format {
        FORMAT_VERSION => (KNOWN_FLAGS, false),
        FORMAT_FIXED => (FIXED_FLAGS, true),
        other => return Err(DecodeError::Version(other)),
    };
    if flags & !known != 0 {
        return Err(DecodeError::Flags(flags));
    }
    // Format 1 has every field; format 2 those whose flag is set.
    let mut field = |flag: u8, len: usize| -> Result<u64, DecodeError> {
        if !fixed && flags & flag == 0 {
            return Ok(0);
        }
        let (bytes, after) = rest
            .split_at_checked(len)
            .ok_or(DecodeError::Truncated(b.len()))?;
        rest = after;
        Ok(bytes.iter().fold(0, |n, &byte| (n << 8) | u64::from(byte)))
    };
    let soft_expiry_ms = field(FLAG_SOFT_EXPIRY, 8)?;
    let version = field(FLAG_VERSION, 8)?;
    let load_time_us = u32::try_from(field(FLAG_LOAD_TIME, 4)?).expect("4 bytes fit in a u32");
    let generation = field(FLAG_GENERATION, 8)?;
    let meta = Meta {
        negative: flags & FLAG_NEGATIVE != 0,
        soft_expiry_ms,
        version,
        load_time_us,
        generation,
        tags: None,
    };
    Ok((meta, flags, b.len() - rest.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A meta with every field set, and those fields as laid out.
    fn every_field() -> (Meta, [u8; 28]) {
        let meta = Meta {
            negative: false,
            soft_expiry_ms: 0x0102_0304_0506_0708,
            version: 9,
            load_time_us: 0x0A0B_0C0D,
            generation: 0x1112_1314_1516_1718,
            tags: None,
        };
        let fields = [
            1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 9, 0x0A, 0x0B, 0x0C, 0x0D, 0x11, 0x12,
            0x13, 0x14, 0x15, 0x16, 0x17, 0x18,
        ];
        (meta, fields)
    }

    #[test]
    fn layout_is_as_documented() {
        let (meta, fields) = every_field();
        let bytes = encode(&meta, b"xy");
        let sum = (xxhash_rust::xxh3::xxh3_64(b"xy") as u32).to_be_bytes();
        let all =
            FLAG_CHECKSUM | FLAG_SOFT_EXPIRY | FLAG_VERSION | FLAG_LOAD_TIME | FLAG_GENERATION;
        assert_eq!(all, 0b0111_1010);
        assert_eq!(bytes, [&[2, all][..], &fields, b"xy", &sum].concat());
        // Fields that are 0 take no room: format, flags, payload, checksum.
        let plain = encode(&Meta::default(), b"xy");
        assert_eq!(plain, [&[2, FLAG_CHECKSUM][..], b"xy", &sum].concat());
        let versioned = Meta {
            version: 9,
            ..Meta::default()
        };
        let flags = FLAG_CHECKSUM | FLAG_VERSION;
        let expected = [&[2, flags][..], &fields[8..16], b"xy", &sum].concat();
        assert_eq!(encode(&versioned, b"xy"), expected);
        for (meta, bytes) in [(&meta, bytes), (&Meta::default(), plain)] {
            let (m, p) = decode(&Bytes::from(bytes)).unwrap();
            assert_eq!((&m, &p[..]), (meta, &b"xy"[..]));
        }
    }

    #[test]
    fn format_1_entries_still_decode() {
        let (meta, fields) = every_field();
        let header = [&[1, FLAG_CHECKSUM][..], &fields].concat();
        assert_eq!(header.len(), FIXED_HEADER_LEN);
        let sum = (xxhash_rust::xxh3::xxh3_64(b"xy") as u32).to_be_bytes();
        let checksummed = [&header[..], b"xy", &sum].concat();
        let (m, p) = decode(&Bytes::from(checksummed)).unwrap();
        assert_eq!((&m, &p[..]), (&meta, &b"xy"[..]));
        // From before checksums.
        let mut old = [&header[..], b"xy"].concat();
        old[1] = 0;
        let (m, p) = decode(&Bytes::from(old)).unwrap();
        assert_eq!((m, &p[..]), (meta, &b"xy"[..]));
        // Format 1 has no field flags.
        let mut flagged = [&header[..], b"xy"].concat();
        flagged[1] = FLAG_VERSION;
        assert_eq!(
            decode(&Bytes::from(flagged)),
            Err(DecodeError::Flags(FLAG_VERSION))
        );
        assert_eq!(
            decode(&Bytes::from(header[..29].to_vec())),
            Err(DecodeError::Truncated(29))
        );
    }

    /// The header of an entry with none of the optional fields.
    const HEADER: usize = 2;
    /// Length of a format-1 header in bytes.
    const FIXED_HEADER_LEN: usize = 30;

    fn tagged(tags: &[(&str, u64)]) -> Meta {
        Meta {
            tags: Some(
                tags.iter()
                    .map(|&(tag, generation)| TagGeneration {
                        tag: tag.into(),
                        generation,
                    })
                    .collect(),
            ),
            ..Meta::default()
        }
    }

    #[test]
    fn tags_are_laid_out_after_the_header_and_checksummed() {
        let meta = tagged(&[("ab", 0x0102), ("c", 7)]);
        let bytes = encode(&meta, b"xy");
        assert_eq!(bytes[1], FLAG_CHECKSUM | FLAG_TAGS);
        assert_eq!(
            bytes[HEADER..bytes.len() - CHECKSUM_LEN],
            [
                2, 0, 0, 0, 0, 0, 0, 1, 2, 2, b'a', b'b', 0, 0, 0, 0, 0, 0, 0, 7, 1, b'c', b'x',
                b'y'
            ]
        );
        let (m, p) = decode(&Bytes::from(bytes.clone())).unwrap();
        assert_eq!((m, &p[..]), (meta, &b"xy"[..]));
        for i in HEADER..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x01;
            assert!(decode(&Bytes::from(changed)).is_err(), "byte {i}");
        }
    }

    #[test]
    fn malformed_tag_lists_do_not_decode() {
        // The flag with no tags, a truncated list, an empty name: each with a
        // checksum that matches, so the tag list itself is what is refused.
        let reseal = |mut b: Vec<u8>| {
            b.truncate(b.len() - CHECKSUM_LEN);
            let sum = checksum(&b[HEADER..]);
            b.extend_from_slice(&sum);
            Bytes::from(b)
        };
        let mut empty = encode(&Meta::default(), b"");
        empty[1] |= FLAG_TAGS;
        assert!(decode(&reseal(empty)).is_err());
        let mut zero = encode(&tagged(&[("a", 1)]), b"");
        zero[HEADER] = 0;
        assert_eq!(decode(&reseal(zero)), Err(DecodeError::Tags));
        let mut long = encode(&tagged(&[("a", 1)]), b"");
        long[HEADER + 9] = 200;
        assert_eq!(decode(&reseal(long)), Err(DecodeError::Tags));
        let mut nameless = encode(&tagged(&[("a", 1)]), b"");
        nameless[HEADER + 9] = 0;
        assert_eq!(decode(&reseal(nameless)), Err(DecodeError::Tags));
    }

    #[test]
    fn negative_round_trip() {
        let meta = Meta {
            negative: true,
            ..Meta::default()
        };
        let (m, p) = decode(&Bytes::from(encode(&meta, b""))).unwrap();
        assert_eq!(m, meta);
        assert!(p.is_empty());
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            decode(&Bytes::from_static(b"")),
            Err(DecodeError::Truncated(0))
        );
        assert_eq!(
            decode(&Bytes::from_static(b"hello world, this is not an entry")),
            Err(DecodeError::Version(b'h'))
        );
        let mut flags = encode(&Meta::default(), b"");
        flags[1] = 0x80;
        assert_eq!(decode(&Bytes::from(flags)), Err(DecodeError::Flags(0x80)));
        let mut neg = encode(&Meta::default(), b"abc");
        neg[1] = FLAG_NEGATIVE | FLAG_CHECKSUM;
        assert_eq!(
            decode(&Bytes::from(neg)),
            Err(DecodeError::NegativeWithPayload(3))
        );
    }

    #[test]
    fn a_changed_payload_byte_is_caught() {
        let entry = encode(&Meta::default(), b"a 100-byte value, or any other");
        for i in HEADER..entry.len() {
            let mut changed = entry.clone();
            changed[i] ^= 0x01;
            assert!(decode(&Bytes::from(changed)).is_err(), "byte {i}");
        }
    }

    proptest! {
        #[test]
        fn round_trips(neg in any::<bool>(), soft in any::<u64>(), version in any::<u64>(),
                       load in any::<u32>(), generation in any::<u64>(),
                       payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let payload = if neg { Vec::new() } else { payload };
            let meta = Meta { negative: neg, soft_expiry_ms: soft, version, load_time_us: load, generation, tags: None };
            let (m, p) = decode(&Bytes::from(encode(&meta, &payload))).unwrap();
            prop_assert_eq!(m, meta);
            prop_assert_eq!(&p[..], &payload[..]);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&Bytes::from(bytes));
        }
    }
}
