//! Replies of the protocol's scripts, as a server (or a planted key) may
//! shape them: parsed or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cachet_redis::fuzz::script_reply(data);
});
