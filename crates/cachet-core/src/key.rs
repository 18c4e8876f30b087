//! How typed keys become store keys.
//!
//! Every key cachet writes has the shape
//!
//! ```text
//! {prefix}{namespace}:{kind}:{{escaped key}}
//! ```
//!
//! - `prefix` defaults to `cachet:` and `namespace` names one cache, so caches
//!   never read each other's entries. A prefix is empty or ends with `:`, which
//!   no namespace contains, so `{prefix}{namespace}` splits back into the two
//!   at its last `:`: distinct (prefix, namespace) pairs never share a key
//!   (`app` + `1users` and `app1` + `users` would; `app:` + `1users` and
//!   `app1:` + `users` do not);
//! - `kind` is one letter: `v` for the entry, `l` for its lease; system
//!   structures (queues, generation counters) use the segment `:sys:` instead and
//!   are the only keys allowed to live without a TTL;
//! - the escaped key sits between `{` and `}`, a Redis Cluster hash tag, so an
//!   entry and its lease always hash to the same slot and one script may touch both.
//!
//! A cache with groups (see [`KeyLayout::grouped_key`]) puts the escaped *group*
//! in the hash tag instead, followed by the key:
//! `{prefix}{namespace}:{kind}:{{group}}{key}`, and keeps the group's generation at
//! `{prefix}{namespace}:sys:gen:{{group}}` — all in the group's slot, so one script
//! reads an entry and its generation. The price: a group's keys share one slot,
//! so a very hot group is a hot slot on Redis Cluster.
//!
//! A cache with tags keeps each tag's generation at
//! `{prefix}{namespace}:sys:tag:{{tag}}` (the tag is the hash tag, so tags
//! spread over slots) and the cache's tag clock, which every tag generation
//! is drawn from, at `{prefix}{namespace}:sys:tagclock` (see [`TagKey`]).
//!
//! The escaping keeps ASCII letters, digits and `-_.~:@/=+` as they are and writes
//! every other byte as `%XX`, so spaces, newlines, `*`, braces and any Unicode are
//! safe, the result is printable ASCII, and two different keys never share an
//! escaped form. Components of a composite key (tuples) are joined by `,`, which is
//! always escaped inside a component.

use std::fmt;
use std::hash::Hash;
use std::ops::Range;
use std::sync::Arc;

/// A type usable as a cache key.
///
/// Implementations write the key's bytes through [`KeyWriter`], which escapes
/// them. Two values that are not equal must write different bytes; the
/// implementations provided here (strings, byte strings, integers, `bool`, `char`,
/// tuples of keys) all do. Keys are also hashed and compared directly by the
/// in-process store, hence the `Hash + Eq + ToOwned` bounds: a `Cache<str, V>`
/// looks up `&str` and stores `String`.
///
/// ```
/// use cachet_core::{CacheKey, KeyWriter};
///
/// #[derive(Clone, Hash, PartialEq, Eq)]
/// struct OrderId { shop: u32, seq: u64 }
///
/// impl CacheKey for OrderId {
///     fn write_key(&self, out: &mut KeyWriter<'_>) {
///         (self.shop, self.seq).write_key(out);
///     }
///     fn decode_key(escaped: &str) -> Option<Self> {
///         let (shop, seq) = <(u32, u64)>::decode_key(escaped)?;
///         Some(OrderId { shop, seq })
///     }
/// }
/// ```
pub trait CacheKey: Hash + Eq + ToOwned<Owned: Hash + Eq + Send + Sync + 'static> {
    /// Writes this key's bytes.
    fn write_key(&self, out: &mut KeyWriter<'_>);

    /// The key whose escaped form is `escaped`, the inverse of
    /// [`write_key`](Self::write_key); `None` if `escaped` is not such a form.
    ///
    /// It is how whatever knows only a store key reaches a typed entry: an
    /// outbox relay, a deferred invalidation or a cache speaking the `Store`
    /// protocol to a `MemoryStore` whose in-process caches keep typed keys,
    /// and a write-behind flusher. For a key made of keys, decode it as the
    /// tuple it writes (see the example above). A key that does not decode
    /// is out of reach of all of those: its entry stays until its TTL.
    fn decode_key(escaped: &str) -> Option<Self::Owned>;
}

/// Reverses the escaping of [`KeyWriter`]: `%XX` becomes the byte `XX`, and a
/// lone `%` (the form of the empty key) becomes nothing.
///
/// Only the form [`KeyWriter`] writes is accepted (upper-case hex, no escaped
/// safe byte, no bare `,`, not empty), so that a key has one escaped form and
/// decoding then writing gives back the same text.
pub fn unescape(escaped: &str) -> Option<Vec<u8>> {
    if escaped == "%" {
        return Some(Vec::new());
    }
    let b = escaped.as_bytes();
    if b.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            };
            let byte = digit(hex[0])? << 4 | digit(hex[1])?;
            if is_safe(byte) {
                return None;
            }
            out.push(byte);
            i += 3;
        } else if is_safe(b[i]) {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

fn decode_string(escaped: &str) -> Option<String> {
    String::from_utf8(unescape(escaped)?).ok()
}

/// Escapes key bytes into a store key. See the [module docs](self).
#[derive(Debug)]
pub struct KeyWriter<'a> {
    out: &'a mut String,
}

impl<'a> KeyWriter<'a> {
    /// Separates the components of a composite key.
    pub const SEPARATOR: char = ',';

    /// Writes bytes, escaping those outside the safe set.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if !is_safe(b) {
                // The safe run before `i` is ASCII, hence valid UTF-8.
                self.out
                    .push_str(std::str::from_utf8(&bytes[start..i]).unwrap_or_default());
                self.out.push('%');
                self.out.push(char::from(HEX[usize::from(b >> 4)]));
                self.out.push(char::from(HEX[usize::from(b & 0xF)]));
                start = i + 1;
            }
        }
        self.out
            .push_str(std::str::from_utf8(&bytes[start..]).unwrap_or_default());
    }

    /// Writes a string, escaping bytes outside the safe set.
    pub fn write_str(&mut self, s: &str) {
        self.write_bytes(s.as_bytes());
    }

    /// Writes the separator between two components of a composite key.
    pub fn separator(&mut self) {
        self.out.push(Self::SEPARATOR);
    }

    /// Writes an integer in decimal; digits and `-` need no escaping.
    fn write_int(&mut self, n: impl itoa::Integer) {
        self.out.push_str(itoa::Buffer::new().format(n));
    }
}

fn is_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_' | b'.' | b'~' | b':' | b'@' | b'/' | b'=' | b'+'
        )
}

impl CacheKey for str {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.write_str(self);
    }
    fn decode_key(escaped: &str) -> Option<String> {
        decode_string(escaped)
    }
}

impl CacheKey for String {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.write_str(self);
    }
    fn decode_key(escaped: &str) -> Option<String> {
        decode_string(escaped)
    }
}

impl CacheKey for [u8] {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.write_bytes(self);
    }
    fn decode_key(escaped: &str) -> Option<Vec<u8>> {
        unescape(escaped)
    }
}

impl CacheKey for Vec<u8> {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.write_bytes(self);
    }
    fn decode_key(escaped: &str) -> Option<Vec<u8>> {
        unescape(escaped)
    }
}

impl CacheKey for bool {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.write_str(if *self { "true" } else { "false" });
    }
    fn decode_key(escaped: &str) -> Option<bool> {
        match escaped {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }
}

impl CacheKey for char {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.write_str(self.encode_utf8(&mut [0; 4]));
    }
    fn decode_key(escaped: &str) -> Option<char> {
        let s = decode_string(escaped)?;
        let mut chars = s.chars();
        let c = chars.next()?;
        chars.next().is_none().then_some(c)
    }
}

impl CacheKey for Box<str> {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.write_str(self);
    }
    fn decode_key(escaped: &str) -> Option<Box<str>> {
        decode_string(escaped).map(Into::into)
    }
}

impl CacheKey for Arc<str> {
    fn write_key(&self, out: &mut KeyWriter<'_>) {
        out.write_str(self);
    }
    fn decode_key(escaped: &str) -> Option<Arc<str>> {
        decode_string(escaped).map(Into::into)
    }
}

macro_rules! impl_int_key {
    ($($t:ty),*) => {$(
        impl CacheKey for $t {
            #[inline]
            fn write_key(&self, out: &mut KeyWriter<'_>) {
                out.write_int(*self);
            }
            fn decode_key(escaped: &str) -> Option<$t> {
                // `parse` accepts a leading `+`, which `write_key` never writes.
                if escaped.starts_with('+') {
                    return None;
                }
                let n: $t = escaped.parse().ok()?;
                // Only the canonical form decodes (no leading zeros, no "-0").
                (itoa::Buffer::new().format(n) == escaped).then_some(n)
            }
        }
    )*};
}
impl_int_key!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

macro_rules! impl_tuple_key {
    ($first:ident $(, $rest:ident)*) => {
        impl<$first, $($rest),*> CacheKey for ($first, $($rest,)*)
        where
            $first: CacheKey + ToOwned<Owned = $first> + Clone + Send + Sync + 'static,
            $($rest: CacheKey + ToOwned<Owned = $rest> + Clone + Send + Sync + 'static,)*
        {
            #[allow(non_snake_case)]
            fn write_key(&self, out: &mut KeyWriter<'_>) {
                let ($first, $($rest,)*) = self;
                $first.write_key(out);
                $(
                    out.separator();
                    $rest.write_key(out);
                )*
            }

            #[allow(non_snake_case)]
            fn decode_key(escaped: &str) -> Option<Self> {
                let mut parts = escaped.split(KeyWriter::SEPARATOR);
                let $first = component::<$first>(parts.next()?)?;
                $(let $rest = component::<$rest>(parts.next()?)?;)*
                parts.next().is_none().then_some(($first, $($rest,)*))
            }
        }
    };
}
/// Decodes one component of a composite key. An empty component is written as
/// nothing (not as the lone `%` of a whole empty key), so it is decoded as `%`.
fn component<T: CacheKey + ToOwned<Owned = T>>(escaped: &str) -> Option<T> {
    match escaped {
        // An empty component is written as nothing, never as `%`.
        "%" => None,
        "" => T::decode_key("%"),
        _ => T::decode_key(escaped),
    }
}

impl_tuple_key!(A, B);
impl_tuple_key!(A, B, C);
impl_tuple_key!(A, B, C, D);

/// Why a prefix or namespace was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyLayoutError {
    /// The namespace is empty, too long, uses characters outside `[A-Za-z0-9_.-]`,
    /// or is the reserved word `sys`.
    #[error("invalid namespace {0:?}: use 1 to 64 characters from [A-Za-z0-9_.-], and not \"sys\"")]
    Namespace(String),
    /// The prefix is too long, contains braces, whitespace or control
    /// characters, or is neither empty nor ends with `:`.
    #[error(
        "invalid key prefix {0:?}: use at most 64 printable ASCII characters without braces or spaces, ending with ':' (or none at all)"
    )]
    Prefix(String),
}

/// The key layout of one cache: its prefix and namespace.
///
/// Cloning is cheap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLayout {
    inner: Arc<LayoutInner>,
}

#[derive(Debug, PartialEq, Eq)]
struct LayoutInner {
    prefix: String,
    namespace: String,
    /// `{prefix}{namespace}:v:{`, the start of every entry key.
    value_head: String,
}

impl KeyLayout {
    /// The prefix used when none is configured.
    pub const DEFAULT_PREFIX: &'static str = "cachet:";

    /// A layout with the given prefix and namespace, validated.
    pub fn new(prefix: &str, namespace: &str) -> Result<Self, KeyLayoutError> {
        let ns_ok = !namespace.is_empty()
            && namespace.len() <= 64
            && namespace != "sys"
            && namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ns_ok {
            return Err(KeyLayoutError::Namespace(namespace.to_owned()));
        }
        // Ending with ':', which no namespace holds, keeps (prefix, namespace)
        // pairs apart once they are joined.
        let prefix_ok = prefix.len() <= 64
            && (prefix.is_empty() || prefix.ends_with(':'))
            && prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
        if !prefix_ok {
            return Err(KeyLayoutError::Prefix(prefix.to_owned()));
        }
        Ok(Self {
            inner: Arc::new(LayoutInner {
                prefix: prefix.to_owned(),
                namespace: namespace.to_owned(),
                value_head: format!("{prefix}{namespace}:v:{{"),
            }),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The store key of a typed key.
    pub fn key<K: CacheKey + ?Sized>(&self, key: &K) -> StoreKey {
        let head = &self.inner.value_head;
        let mut s = String::with_capacity(head.len() + 24);
        s.push_str(head);
        let start = s.len();
        write_nonempty(key, &mut s);
        let end = s.len();
        s.push('}');
        StoreKey {
            key: s,
            kind_at: head.len() - 3,
            user: start..end,
            group: None,
        }
    }

    /// The store key of a typed key in a group: the group is the hash tag.
    pub fn grouped_key<G, K>(&self, group: &G, key: &K) -> StoreKey
    where
        G: CacheKey + ?Sized,
        K: CacheKey + ?Sized,
    {
        self.grouped(|s| write_nonempty(group, s), key)
    }

    fn grouped<K: CacheKey + ?Sized>(
        &self,
        write_group: impl FnOnce(&mut String),
        key: &K,
    ) -> StoreKey {
        let head = &self.inner.value_head;
        let mut s = String::with_capacity(head.len() + 32);
        s.push_str(head);
        let group_start = s.len();
        write_group(&mut s);
        let group_end = s.len();
        s.push('}');
        let start = s.len();
        write_nonempty(key, &mut s);
        let end = s.len();
        StoreKey {
            key: s,
            kind_at: head.len() - 3,
            user: start..end,
            group: Some(group_start..group_end),
        }
    }

    /// [`grouped_key`](Self::grouped_key) with a group already escaped by
    /// [`escape_key`].
    pub fn key_in_group<K: CacheKey + ?Sized>(&self, escaped_group: &str, key: &K) -> StoreKey {
        self.grouped(|s| s.push_str(escaped_group), key)
    }

    /// The key of a group's generation counter.
    pub fn group_key<G: CacheKey + ?Sized>(&self, group: &G) -> GroupKey {
        let mut s = format!("{}{}:sys:gen:{{", self.inner.prefix, self.inner.namespace);
        let head = self.inner.prefix.len() + self.inner.namespace.len();
        let start = s.len();
        write_nonempty(group, &mut s);
        let end = s.len();
        s.push('}');
        GroupKey {
            key: s,
            head,
            group: start..end,
        }
    }

    /// The key of a tag's generation.
    pub fn tag_key<T: CacheKey + ?Sized>(&self, tag: &T) -> TagKey {
        self.tag_key_escaped(&escape_key(tag))
    }

    /// [`tag_key`](Self::tag_key) with a tag already escaped by [`escape_key`].
    pub fn tag_key_escaped(&self, escaped_tag: &str) -> TagKey {
        let head = self.inner.prefix.len() + self.inner.namespace.len();
        let key = format!(
            "{}{}:sys:tag:{{{escaped_tag}}}",
            self.inner.prefix, self.inner.namespace
        );
        TagKey {
            tag: head + 10..key.len() - 1,
            key,
            head,
        }
    }

    /// The name of a system structure of this cache (`{prefix}{namespace}:sys:{name}`).
    ///
    /// System structures are the only keys allowed to live without a TTL.
    pub fn sys_key(&self, name: &str) -> String {
        format!("{}{}:sys:{name}", self.inner.prefix, self.inner.namespace)
    }
}

/// A key's escaped form, as it appears in store keys (the empty key as `%`).
pub fn escape_key<K: CacheKey + ?Sized>(key: &K) -> String {
    let mut s = String::new();
    write_nonempty(key, &mut s);
    s
}

/// Writes an escaped key; the empty key becomes a lone `%`, which escaping never
/// produces, so that it is unambiguous and never makes an empty hash tag (which
/// Redis Cluster ignores).
fn write_nonempty<K: CacheKey + ?Sized>(key: &K, s: &mut String) {
    let start = s.len();
    key.write_key(&mut KeyWriter { out: s });
    if s.len() == start {
        s.push('%');
    }
}

/// The generation counter of one group of a cache's keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupKey {
    key: String,
    head: usize,
    group: Range<usize>,
}

impl GroupKey {
    /// The generation counter's key, `{prefix}{namespace}:sys:gen:{{group}}`.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// `{prefix}{namespace}` of the cache the group belongs to.
    pub fn head(&self) -> &str {
        &self.key[..self.head]
    }

    /// The escaped group.
    pub fn group(&self) -> &str {
        &self.key[self.group.clone()]
    }

    /// Parses a generation key written by [`KeyLayout::group_key`]; `None` if
    /// `key` does not have that shape.
    pub fn parse(key: &str) -> Option<GroupKey> {
        let (head, group) = parse_sys(key, ":sys:gen:{")?;
        Some(GroupKey {
            key: key.to_owned(),
            head,
            group,
        })
    }
}

/// The generation of one tag of a cache's entries.
///
/// Every tag generation of a cache is drawn from the cache's tag clock
/// ([`TagKey::clock_key`]), which only moves forward, so a generation that was
/// lost comes back as a value the tag never had.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TagKey {
    key: String,
    head: usize,
    tag: Range<usize>,
}

impl TagKey {
    /// The generation's key, `{prefix}{namespace}:sys:tag:{{tag}}`.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// `{prefix}{namespace}` of the cache the tag belongs to.
    pub fn head(&self) -> &str {
        &self.key[..self.head]
    }

    /// The escaped tag.
    pub fn tag(&self) -> &str {
        &self.key[self.tag.clone()]
    }

    /// The cache's tag clock, `{prefix}{namespace}:sys:tagclock`.
    pub fn clock_key(&self) -> String {
        format!("{}:sys:tagclock", self.head())
    }

    /// Parses a tag generation key written by [`KeyLayout::tag_key`]; `None`
    /// if `key` does not have that shape.
    pub fn parse(key: &str) -> Option<TagKey> {
        let (head, tag) = parse_sys(key, ":sys:tag:{")?;
        Some(TagKey {
            key: key.to_owned(),
            head,
            tag,
        })
    }
}

/// Splits `{head}{marker}{name}}` (a system key whose name is its hash tag)
/// into the length of `head` and the range of `name`.
fn parse_sys(key: &str, marker: &str) -> Option<(usize, Range<usize>)> {
    let at = key.find(marker)?;
    let start = at + marker.len();
    let end = key.len().checked_sub(1)?;
    if !key.is_ascii()
        || !key.ends_with('}')
        || end <= start
        || key[start..end].contains(['{', '}'])
    {
        return None;
    }
    Some((at, start..end))
}

/// A store key: the Redis key of an entry, from which its lease key derives.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreKey {
    key: String,
    /// Byte index of the kind letter (`v` or `l`).
    kind_at: usize,
    /// Byte range of the escaped user key.
    user: Range<usize>,
    /// Byte range of the escaped group, for grouped keys.
    group: Option<Range<usize>>,
}

impl StoreKey {
    /// The entry's key.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The key of the entry's lease: the same key with kind `l`, in the same slot.
    pub fn lease_key(&self) -> String {
        let (head, tail) = self.lease_key_parts();
        let mut s = String::with_capacity(self.key.len());
        s.push_str(head);
        s.push('l');
        s.push_str(tail);
        s
    }

    /// The lease key in parts: it is `head`, the byte `l`, then `tail`; for
    /// writing it where it goes without a `String` of its own.
    pub fn lease_key_parts(&self) -> (&str, &str) {
        (&self.key[..self.kind_at], &self.key[self.kind_at + 1..])
    }

    /// The escaped user key, as shown in error messages.
    pub fn user_key(&self) -> &str {
        &self.key[self.user.clone()]
    }

    /// `{prefix}{namespace}`: what all keys of one cache start with.
    pub fn head(&self) -> &str {
        &self.key[..self.kind_at - 1]
    }

    /// The escaped group of a grouped key.
    pub fn group(&self) -> Option<&str> {
        self.group.clone().map(|g| &self.key[g])
    }

    /// The generation counter of a grouped key's group.
    pub fn group_key(&self) -> Option<GroupKey> {
        let group = self.group()?;
        let head = self.head();
        Some(GroupKey {
            key: format!("{head}:sys:gen:{{{group}}}"),
            head: head.len(),
            group: head.len() + 10..head.len() + 10 + group.len(),
        })
    }

    /// Parses an entry key written by [`KeyLayout::key`] or
    /// [`KeyLayout::grouped_key`], for instance one read back from an outbox or a
    /// delay queue. `None` if `key` does not have either shape.
    pub fn parse(key: &str) -> Option<StoreKey> {
        if !key.is_ascii() {
            return None;
        }
        // Prefixes and namespaces contain no `{`, so the first `:v:{` ends them.
        let at = key.find(":v:{")?;
        let tag = at + 4;
        let close = tag + key[tag..].find('}')?;
        if close == tag {
            return None;
        }
        let (user, group) = if close + 1 == key.len() {
            (tag..close, None)
        } else {
            // Grouped: `{group}key`; escaped keys contain no braces.
            if key[close + 1..].contains(['{', '}']) {
                return None;
            }
            (close + 1..key.len(), Some(tag..close))
        };
        Some(StoreKey {
            key: key.to_owned(),
            kind_at: at + 1,
            user,
            group,
        })
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.key, f)
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout() -> KeyLayout {
        KeyLayout::new("cachet:", "users").unwrap()
    }

    #[test]
    fn shapes() {
        let k = layout().key(&42u64);
        assert_eq!(k.as_str(), "cachet:users:v:{42}");
        assert_eq!(k.lease_key(), "cachet:users:l:{42}");
        assert_eq!(k.user_key(), "42");
        assert_eq!(layout().sys_key("queue"), "cachet:users:sys:queue");
    }

    #[test]
    fn hostile_bytes_are_escaped() {
        let k = layout().key("a b\n*{x}%é,");
        assert_eq!(
            k.as_str(),
            "cachet:users:v:{a%20b%0A%2A%7Bx%7D%25%C3%A9%2C}"
        );
        assert!(k.as_str().bytes().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn readable_keys_stay_readable() {
        assert_eq!(
            layout().key("user:42/a@b=c+d").user_key(),
            "user:42/a@b=c+d"
        );
        assert_eq!(layout().key(&-7i32).user_key(), "-7");
        assert_eq!(layout().key(&("acme".to_owned(), 7u8)).user_key(), "acme,7");
    }

    #[test]
    fn empty_key_keeps_a_hash_tag() {
        let k = layout().key("");
        assert_eq!(k.as_str(), "cachet:users:v:{%}");
        assert_ne!(k, layout().key("%"));
    }

    #[test]
    fn tuples_are_injective() {
        assert_ne!(
            layout().key(&("a,b".to_owned(), "c".to_owned())),
            layout().key(&("a".to_owned(), "b,c".to_owned()))
        );
    }

    #[test]
    fn namespace_and_prefix_are_validated() {
        assert!(KeyLayout::new("cachet:", "").is_err());
        assert!(KeyLayout::new("cachet:", "sys").is_err());
        assert!(KeyLayout::new("cachet:", "a:b").is_err());
        assert!(KeyLayout::new("cachet:", "a b").is_err());
        assert!(KeyLayout::new("ca{chet", "users").is_err());
        assert!(KeyLayout::new("", "users").is_ok());
        assert!(KeyLayout::new("app-1:", "users.v2").is_ok());
        assert!(KeyLayout::new("app", "users").is_err(), "no trailing ':'");
    }

    #[test]
    fn distinct_prefix_and_namespace_pairs_never_share_a_key() {
        let prefixes = ["", "a:", "app:", "app1:", "app:1:", "a:pp:"];
        let namespaces = ["1users", "users", "1", "pp", "app", "p.1"];
        let mut seen = std::collections::HashMap::new();
        for p in prefixes {
            for n in namespaces {
                let head = format!("{}", KeyLayout::new(p, n).unwrap().key("k"));
                if let Some(other) = seen.insert(head.clone(), (p, n)) {
                    panic!("{other:?} and {:?} share {head}", (p, n));
                }
            }
        }
        // The pair that used to collide is refused rather than merged.
        assert!(KeyLayout::new("app", "1users").is_err());
        assert!(KeyLayout::new("app1", "users").is_err());
    }

    /// Hash tag rule of Redis Cluster: the substring between the first `{` and the
    /// next `}` (if non-empty) is what gets hashed.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = open + 1 + key[open + 1..].find('}').unwrap();
        &key[open + 1..close]
    }

    fn l_grouped() -> StoreKey {
        layout().grouped_key("acme,1", &42u64)
    }

    #[test]
    fn tag_keys_put_the_tag_in_the_hash_tag() {
        let t = layout().tag_key("red,1");
        assert_eq!(t.as_str(), "cachet:users:sys:tag:{red%2C1}");
        assert_eq!(t.tag(), "red%2C1");
        assert_eq!(t.head(), "cachet:users");
        assert_eq!(t.clock_key(), "cachet:users:sys:tagclock");
        assert_eq!(layout().tag_key_escaped("red%2C1"), t);
        assert_eq!(layout().tag_key("").tag(), "%");
        assert_eq!(TagKey::parse(t.as_str()), Some(t));
        assert_eq!(TagKey::parse("cachet:users:sys:tag:{}"), None);
        assert_eq!(TagKey::parse("cachet:users:sys:tag:{a}b"), None);
    }

    #[test]
    fn grouped_keys_share_the_groups_slot() {
        let k = l_grouped();
        assert_eq!(k.as_str(), "cachet:users:v:{acme%2C1}42");
        assert_eq!(k.lease_key(), "cachet:users:l:{acme%2C1}42");
        let g = k.group_key().unwrap();
        assert_eq!(g.as_str(), "cachet:users:sys:gen:{acme%2C1}");
        assert_eq!(g, layout().group_key("acme,1"));
        assert_eq!(g.group(), "acme%2C1");
        assert_eq!(g.head(), "cachet:users");
        assert_eq!(hash_tag(k.as_str()), hash_tag(g.as_str()));
        assert_eq!(layout().grouped_key("", "").as_str(), "cachet:users:v:{%}%");
        assert_eq!(layout().key("x").group_key(), None);
        let parsed = StoreKey::parse(k.as_str()).unwrap();
        assert_eq!(parsed, k);
        assert_eq!(parsed.group(), Some("acme%2C1"));
        assert_eq!(parsed.user_key(), "42");
        assert_eq!(parsed.group_key(), Some(g.clone()));
        assert_eq!(GroupKey::parse(g.as_str()), Some(g));
        assert_eq!(GroupKey::parse("cachet:users:sys:gen:{}"), None);
        assert_eq!(GroupKey::parse("cachet:users:sys:gen:{a}b"), None);
    }

    #[test]
    fn store_keys_parse_back() {
        for layout in [
            layout(),
            KeyLayout::new("", "n").unwrap(),
            KeyLayout::new("a:v:b:", "ns").unwrap(),
        ] {
            for k in ["42", "", "a b{}", "x,y"] {
                let key = layout.key(k);
                let parsed = StoreKey::parse(key.as_str()).unwrap();
                assert_eq!(parsed, key);
                assert_eq!(parsed.lease_key(), key.lease_key());
                assert_eq!(
                    parsed.head(),
                    format!("{}{}", layout.prefix(), layout.namespace())
                );
            }
        }
        for bad in [
            "",
            "cachet:users:v:{",
            "cachet:users:v:{}",
            "cachet:users:v:{a}x{",
            "cachet:users:l:{a}",
        ] {
            assert_eq!(StoreKey::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_decode_back() {
        let l = layout();
        assert_eq!(u64::decode_key(l.key(&42u64).user_key()), Some(42));
        assert_eq!(i32::decode_key(l.key(&-7i32).user_key()), Some(-7));
        assert_eq!(u64::decode_key("042"), None, "only the canonical form");
        assert_eq!(u64::decode_key("+4"), None);
        assert_eq!(str::decode_key(l.key("").user_key()).as_deref(), Some(""));
        assert_eq!(bool::decode_key("true"), Some(true));
        assert_eq!(char::decode_key(l.key(&'é').user_key()), Some('é'));
        type Pair = (String, u64);
        let pair: Pair = ("a,b".into(), 7);
        assert_eq!(Pair::decode_key(l.key(&pair).user_key()), Some(pair));
        let empty: (String, String) = (String::new(), String::new());
        assert_eq!(
            <(String, String)>::decode_key(l.key(&empty).user_key()),
            Some(empty)
        );
        assert_eq!(Pair::decode_key("a,7,8"), None);
        assert_eq!(unescape("%G0"), None);
        // One escaped form per key: nothing the writer would not write.
        for other_form in ["a%41", "a%2c", "a,b", "", "%", "a%"] {
            let decoded = String::decode_key(other_form);
            assert!(
                decoded.as_ref().is_none_or(|k| escape_key(k) == other_form),
                "{other_form:?} decodes to {decoded:?}"
            );
        }
        assert_eq!(String::decode_key("%").as_deref(), Some(""));
        assert_eq!(<(String, String)>::decode_key("a,%"), None);
        assert_eq!(unescape("a b"), None);
    }

    proptest! {
        #[test]
        fn strings_and_tuples_decode_back(a in ".{0,12}", b in any::<i64>(), c in proptest::collection::vec(any::<u8>(), 0..12)) {
            let l = layout();
            prop_assert_eq!(String::decode_key(l.key(a.as_str()).user_key()), Some(a.clone()));
            let t = (a.clone(), b, c.clone());
            prop_assert_eq!(<(String, i64, Vec<u8>)>::decode_key(l.key(&t).user_key()), Some(t));
        }

        #[test]
        fn escaping_round_trips_and_tags_match(bytes in proptest::collection::vec(any::<u8>(), 1..64)) {
            let k = layout().key(&bytes[..]);
            prop_assert!(k.as_str().bytes().all(|b| b.is_ascii_graphic()));
            prop_assert_eq!(unescape(k.user_key()), Some(bytes));
            let lease = k.lease_key();
            prop_assert_eq!(hash_tag(k.as_str()), hash_tag(&lease));
            prop_assert_eq!(hash_tag(k.as_str()), k.user_key());
        }

        #[test]
        fn distinct_keys_stay_distinct(a in ".{0,16}", b in ".{0,16}") {
            prop_assume!(a != b);
            prop_assert_ne!(layout().key(a.as_str()), layout().key(b.as_str()));
        }
    }
}
