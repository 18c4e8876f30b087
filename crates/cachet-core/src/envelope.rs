//! The entry envelope: a fixed header in front of every stored payload.
//!
//! Byte layout, version 1 (all integers big-endian):
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! | 0      | 1    | format version, `1`                                          |
//! | 1      | 1    | flags: bit 0 = negative ("not found"), bit 1 = checksummed; bits 2–7 must be 0 |
//! | 2      | 8    | soft expiry, Unix milliseconds; `0` = none                   |
//! | 10     | 8    | value version from the source of truth; `0` = unversioned    |
//! | 18     | 4    | duration of the load that produced the value, microseconds   |
//! | 22     | 8    | group generation the entry was filled under; `0` = no group  |
//! | 30     | …    | when tagged (flag bit 2): the tags, see below                |
//! | …      | …    | payload as written by the cache's codec; empty when negative |
//! | end − 4 | 4   | when checksummed: the low 32 bits of the XXH3-64 of everything after the header (tags and payload) |
//!
//! The tags of a tagged entry: a count (1 byte, 1–255), then for each tag its
//! generation when the entry was filled (8 bytes), the length of its escaped
//! name (1 byte, 1–255) and the name. A tag costs 9 bytes plus its name, the
//! list 1 byte more.
//!
//! The header costs [`HEADER_LEN`] = 30 bytes per entry, the checksum 4 more. The
//! fields sit at fixed offsets so that a Lua script can read them with
//! `string.sub` (and stamp the generation without touching the checksum, which
//! covers what follows the header only). Anything that does not decode (too
//! short, an unknown version or flag, a negative entry with a payload, a
//! malformed tag list, bytes whose checksum does not match) is reported as a
//! [`DecodeError`], which the cache treats as a miss. Every entry this crate
//! writes is checksummed; entries without the flag (written before it existed)
//! and entries without tags (written before tags existed) still decode.

use std::sync::Arc;

use bytes::{BufMut, Bytes};

/// Length of the envelope header in bytes.
pub const HEADER_LEN: usize = 30;

/// The envelope format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;

const FLAG_NEGATIVE: u8 = 0b0000_0001;
const FLAG_CHECKSUM: u8 = 0b0000_0010;
const FLAG_TAGS: u8 = 0b0000_0100;
const KNOWN_FLAGS: u8 = FLAG_NEGATIVE | FLAG_CHECKSUM | FLAG_TAGS;
/// The most tags one entry carries.
pub const MAX_TAGS: usize = 255;
/// The longest escaped tag name, in bytes.
pub const MAX_TAG_LEN: usize = 255;
/// Length of the checksum after the payload.
const CHECKSUM_LEN: usize = 4;

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
    #[error("entry is {0} bytes, shorter than the {HEADER_LEN}-byte header")]
    Truncated(usize),
    /// A format version this build does not know.
    #[error("entry has format version {0}, this build reads version {FORMAT_VERSION}")]
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
    let mut out = Vec::with_capacity(HEADER_LEN + 1 + tags_len + payload.len() + CHECKSUM_LEN);
    let mut flags = FLAG_CHECKSUM;
    if meta.negative {
        flags |= FLAG_NEGATIVE;
    }
    if !tags.is_empty() {
        flags |= FLAG_TAGS;
    }
    out.put_u8(FORMAT_VERSION);
    out.put_u8(flags);
    out.put_u64(meta.soft_expiry_ms);
    out.put_u64(meta.version);
    out.put_u32(meta.load_time_us);
    out.put_u64(meta.generation);
    if !tags.is_empty() {
        out.put_u8(u8::try_from(tags.len()).expect("at most MAX_TAGS tags"));
        for t in tags {
            out.put_u64(t.generation);
            out.put_u8(u8::try_from(t.tag.len()).expect("tag names of at most MAX_TAG_LEN bytes"));
            out.extend_from_slice(t.tag.as_bytes());
        }
    }
    out.extend_from_slice(payload);
    let sum = checksum(&out[HEADER_LEN..]);
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
    if b.len() < HEADER_LEN {
        return Err(DecodeError::Truncated(b.len()));
    }
    if b[0] != FORMAT_VERSION {
        return Err(DecodeError::Version(b[0]));
    }
    let flags = b[1];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError::Flags(flags));
    }
    let u64_at = |at: usize| {
        let mut a = [0; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(a)
    };
    let mut load = [0; 4];
    load.copy_from_slice(&b[18..22]);
    let mut meta = Meta {
        negative: flags & FLAG_NEGATIVE != 0,
        soft_expiry_ms: u64_at(2),
        version: u64_at(10),
        load_time_us: u32::from_be_bytes(load),
        generation: u64_at(22),
        tags: None,
    };
    let end = if flags & FLAG_CHECKSUM == 0 {
        b.len()
    } else {
        let end = (b.len().checked_sub(CHECKSUM_LEN))
            .filter(|&end| end >= HEADER_LEN)
            .ok_or(DecodeError::Truncated(b.len()))?;
        if b[end..] != checksum(&b[HEADER_LEN..end]) {
            return Err(DecodeError::Checksum);
        }
        end
    };
    let mut start = HEADER_LEN;
    if flags & FLAG_TAGS != 0 {
        let (tags, len) = decode_tags(&b[HEADER_LEN..end])?;
        meta.tags = Some(tags);
        start += len;
    }
    let payload_len = end - start;
    if meta.negative && payload_len > 0 {
        return Err(DecodeError::NegativeWithPayload(payload_len));
    }
    Ok((meta, bytes.slice(start..end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_as_documented() {
        let meta = Meta {
            negative: false,
            soft_expiry_ms: 0x0102_0304_0506_0708,
            version: 9,
            load_time_us: 0x0A0B_0C0D,
            generation: 0x1112_1314_1516_1718,
            tags: None,
        };
        let bytes = encode(&meta, b"xy");
        let sum = (xxhash_rust::xxh3::xxh3_64(b"xy") as u32).to_be_bytes();
        assert_eq!(
            bytes,
            [
                1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 9, 0x0A, 0x0B, 0x0C, 0x0D, 0x11,
                0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, b'x', b'y', sum[0], sum[1], sum[2],
                sum[3]
            ]
        );
        // An entry from before checksums still decodes.
        let mut old = bytes[..32].to_vec();
        old[1] = 0;
        let (m, p) = decode(&Bytes::from(old)).unwrap();
        assert_eq!((m, &p[..]), (meta, &b"xy"[..]));
    }

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
            bytes[HEADER_LEN..bytes.len() - CHECKSUM_LEN],
            [
                2, 0, 0, 0, 0, 0, 0, 1, 2, 2, b'a', b'b', 0, 0, 0, 0, 0, 0, 0, 7, 1, b'c', b'x',
                b'y'
            ]
        );
        let (m, p) = decode(&Bytes::from(bytes.clone())).unwrap();
        assert_eq!((m, &p[..]), (meta, &b"xy"[..]));
        for i in HEADER_LEN..bytes.len() {
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
            let sum = checksum(&b[HEADER_LEN..]);
            b.extend_from_slice(&sum);
            Bytes::from(b)
        };
        let mut empty = encode(&Meta::default(), b"");
        empty[1] |= FLAG_TAGS;
        assert!(decode(&reseal(empty)).is_err());
        let mut zero = encode(&tagged(&[("a", 1)]), b"");
        zero[HEADER_LEN] = 0;
        assert_eq!(decode(&reseal(zero)), Err(DecodeError::Tags));
        let mut long = encode(&tagged(&[("a", 1)]), b"");
        long[HEADER_LEN + 9] = 200;
        assert_eq!(decode(&reseal(long)), Err(DecodeError::Tags));
        let mut nameless = encode(&tagged(&[("a", 1)]), b"");
        nameless[HEADER_LEN + 9] = 0;
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
        for i in HEADER_LEN..entry.len() {
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
