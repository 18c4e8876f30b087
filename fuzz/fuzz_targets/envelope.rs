//! Entry bytes as read from Redis: anything decodes or is refused. What
//! decodes re-encodes to an entry that decodes the same; it is written back
//! byte for byte when it is what this crate writes (format 2, checksummed,
//! no field flagged that is 0), unlike an entry of format 1 or from before
//! checksums.
#![no_main]

use cachet_core::envelope;
use libfuzzer_sys::fuzz_target;

/// Envelope flag bit 1: the payload is followed by its checksum.
const CHECKSUMMED: u8 = 0b10;
/// The envelope format this crate writes.
const FORMAT: u8 = envelope::FORMAT_VERSION;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    if let Ok((meta, payload)) = envelope::decode(&bytes) {
        let again = envelope::encode(&meta, &payload);
        // A field flagged but 0 is written unflagged, so shorter.
        if data[0] == FORMAT && data[1] & CHECKSUMMED != 0 && again.len() == data.len() {
            assert_eq!(again, data);
        }
        let (meta2, payload2) = envelope::decode(&bytes::Bytes::from(again)).unwrap();
        assert_eq!((meta2, payload2), (meta, payload));
    }
});
