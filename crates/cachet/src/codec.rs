//! Codecs: how values become bytes for stores that keep bytes.
//!
//! The default, [`Postcard`], is a compact binary serde format (varint integers,
//! no field names): the smallest and fastest of the serde formats measured for
//! cachet (see `docs/decisions.md`). [`Json`] is available for entries that
//! people or other languages read. A codec only runs for byte stores such as
//! Redis; the in-process store keeps decoded values and never calls it.
//!
//! Changing a value type's shape in a way the codec cannot read is safe: entries
//! that fail to decode count as decode errors, are treated as misses, and are
//! replaced by the next fill.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A boxed error from a codec.
pub type CodecError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Turns values into bytes and back.
pub trait Codec<V>: Send + Sync + fmt::Debug + 'static {
    /// Appends the encoding of `value` to `out`.
    fn encode(&self, value: &V, out: &mut Vec<u8>) -> Result<(), CodecError>;

    /// Decodes a value.
    fn decode(&self, bytes: &[u8]) -> Result<V, CodecError>;

    /// Whether this codec can encode at all; [`NoCodec`] cannot, so a cache that
    /// uses it must be on a store that keeps decoded values.
    fn can_encode(&self) -> bool {
        true
    }
}

/// The compact binary serde format [postcard](https://docs.rs/postcard). The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Postcard;

impl<V: Serialize + DeserializeOwned> Codec<V> for Postcard {
    fn encode(&self, value: &V, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let buf = std::mem::take(out);
        *out = postcard::to_extend(value, buf)?;
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<V, CodecError> {
        Ok(postcard::from_bytes(bytes)?)
    }
}

/// JSON through serde_json: larger and slower than [`Postcard`], readable by people
/// and by other languages.
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

impl<V: Serialize + DeserializeOwned> Codec<V> for Json {
    fn encode(&self, value: &V, out: &mut Vec<u8>) -> Result<(), CodecError> {
        Ok(serde_json::to_writer(out, value)?)
    }

    fn decode(&self, bytes: &[u8]) -> Result<V, CodecError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// No codec, for value types without serde support on an in-process store.
/// Building a cache with it on a byte store (Redis) fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCodec;

impl<V> Codec<V> for NoCodec {
    fn encode(&self, _: &V, _: &mut Vec<u8>) -> Result<(), CodecError> {
        Err("this cache has no codec (NoCodec); use it only with an in-process store".into())
    }

    fn decode(&self, _: &[u8]) -> Result<V, CodecError> {
        Err("this cache has no codec (NoCodec); use it only with an in-process store".into())
    }

    fn can_encode(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct User {
        id: u64,
        name: String,
    }

    fn round_trip(codec: &dyn Codec<User>) {
        let u = User {
            id: 7,
            name: "Ada".into(),
        };
        let mut out = b"prefix".to_vec();
        codec.encode(&u, &mut out).unwrap();
        assert!(out.starts_with(b"prefix"), "encode appends");
        assert_eq!(codec.decode(&out[6..]).unwrap(), u);
        assert!(codec.decode(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn postcard_and_json_round_trip() {
        round_trip(&Postcard);
        round_trip(&Json);
    }

    #[test]
    fn no_codec_refuses() {
        let mut out = Vec::new();
        assert!(
            Codec::<User>::encode(
                &NoCodec,
                &User {
                    id: 1,
                    name: String::new()
                },
                &mut out
            )
            .is_err()
        );
        assert!(!Codec::<User>::can_encode(&NoCodec));
    }
}
