//! Entry points for the fuzz targets in `fuzz/`: the parsers of what a
//! server, or anyone else writing to it, may send. Not part of the API.

use bytes::Bytes;
use cachet_core::TokenSource;

/// Parses `resp` as a RESP reply and feeds it to every script-reply parser,
/// and, as a string, to the entry decoder. Must never panic.
pub fn script_reply(resp: &[u8]) {
    let Ok(reply) = redis::parse_redis_value(resp) else {
        return;
    };
    let token = TokenSource::new().next_token();
    let _ = crate::parse_acquire(reply.clone(), token);
    let _ = crate::parse_versioned(&reply);
    let mut grouped = reply.clone();
    if crate::split_generation(&mut grouped).is_ok() {
        let _ = crate::parse_acquire(grouped, token);
    }
    if let redis::Value::BulkString(b) = &reply {
        let _ = crate::read_of(Some(Bytes::copy_from_slice(b)));
    }
}

/// Parses `payload` as an invalidation-bus message. Must never panic.
pub fn bus_message(payload: &[u8]) {
    if let Ok(text) = std::str::from_utf8(payload) {
        for notice in crate::bus::parse(text) {
            let _ = format!("{notice:?}");
        }
    }
}
