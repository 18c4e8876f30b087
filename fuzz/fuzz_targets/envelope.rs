//! Entry bytes as read from Redis: anything decodes or is refused. What
//! decodes is written back byte for byte when it carries a checksum (every
//! entry written now does), and re-encodes to an entry that decodes the same
//! when it does not (an entry written before checksums).
#![no_main]

use cachet_core::envelope;
use libfuzzer_sys::fuzz_target;

/// Envelope flag bit 1: the payload is followed by its checksum.
const CHECKSUMMED: u8 = 0b10;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    if let Ok((meta, payload)) = envelope::decode(&bytes) {
        let again = envelope::encode(&meta, &payload);
        if data[1] & CHECKSUMMED != 0 {
            assert_eq!(again, data);
        }
        let (meta2, payload2) = envelope::decode(&bytes::Bytes::from(again)).unwrap();
        assert_eq!((meta2, payload2), (meta, payload));
    }
});
