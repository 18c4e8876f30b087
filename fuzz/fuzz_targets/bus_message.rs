//! Messages on an invalidation-bus channel, which anyone may publish to.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cachet_redis::fuzz::bus_message(data);
});
