//! Entry bytes as read from Redis: anything decodes or is refused, and what
//! decodes is written back byte for byte.
#![no_main]

use cachet_core::envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    if let Ok((meta, payload)) = envelope::decode(&bytes) {
        assert_eq!(envelope::encode(&meta, &payload), data);
    }
});
