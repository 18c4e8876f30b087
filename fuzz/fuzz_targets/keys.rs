//! Store keys as found in Redis or in a bus notice: parsing never panics, and
//! every key decoder accepts only the one form its writer writes.
#![no_main]

use cachet_core::{CacheKey, GroupKey, StoreKey, escape_key};
use libfuzzer_sys::fuzz_target;

fn canonical<K: CacheKey<Owned = K> + std::fmt::Debug>(escaped: &str) {
    if let Some(key) = K::decode_key(escaped) {
        assert_eq!(escape_key(&key), escaped, "{key:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(key) = StoreKey::parse(text) {
        assert_eq!(key.as_str(), text);
        let _ = (key.head(), key.user_key(), key.group(), key.lease_key());
        canonical::<String>(key.user_key());
    }
    if let Some(group) = GroupKey::parse(text) {
        assert_eq!(group.as_str(), text);
        let _ = (group.head(), group.group());
    }
    canonical::<String>(text);
    canonical::<Vec<u8>>(text);
    canonical::<u64>(text);
    canonical::<i32>(text);
    canonical::<bool>(text);
    canonical::<char>(text);
    canonical::<(String, u64)>(text);
    canonical::<(String, String, Vec<u8>)>(text);
});
