//! Tags: any number per entry, each invalidated in O(1) (see
//! [`CacheBuilder::tags_by`](crate::CacheBuilder::tags_by)).
//!
//! An entry records, in its envelope, each of its tags with the tag's
//! generation when it was filled (`Meta::tags`). The cache checks them here,
//! the same way on every store, through the store's [`Tags`] capability:
//!
//! - a read is current only while every recorded generation is still its
//!   tag's generation (a tag whose generation is missing, never set or lost,
//!   matches nothing, so a lost generation never makes an entry current
//!   again);
//! - a load reads the tag clock after its lease is granted and before the
//!   loader runs (`LeaseToken::tag_clock`); its fill claims the generations of
//!   the value's tags and is refused when one of them was invalidated after
//!   that clock. A tag invalidated between the claim and the fill's write
//!   leaves the entry with a generation that is no longer current: a miss.
//!
//! Writes (`set`, `write_through`) claim the generations without a clock.

use std::sync::Arc;

use cachet_core::{
    CacheKey, Capability, Meta, StoreError, StoreKey, TagGeneration, TagKey, Tags,
    envelope::{MAX_TAG_LEN, MAX_TAGS},
};

use super::inner::Inner;
use crate::{Error, ErrorKind};

/// Maps a key and its value to the value's tags.
pub(crate) type TagsFn<K, V> = Arc<dyn Fn(&K, &V) -> Vec<String> + Send + Sync>;

/// What a claim of an entry's tags gave.
pub(crate) enum Claimed {
    /// The generations to record (`None`: the entry has no tags).
    Tags(Option<Arc<[TagGeneration]>>),
    /// A tag was invalidated after the load began: the fill is refused.
    Refused,
}

impl<K, V> Inner<K, V>
where
    K: CacheKey + ?Sized + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn tag_store(&self) -> Result<&dyn Tags, StoreError> {
        self.s
            .store
            .tags()
            .ok_or_else(|| Capability::Tags.missing())
    }

    /// The tag clock now, for a load about to begin; `0` without tags.
    pub(crate) async fn tag_clock(&self) -> Result<u64, StoreError> {
        if self.tags.is_none() {
            return Ok(0);
        }
        let head = format!("{}{}", self.s.layout.prefix(), self.namespace());
        self.tag_store()?.tag_clock(&head).await
    }

    /// Whether every tag `meta` records still has the generation recorded.
    /// One read of the tags' generations (on Redis one `MGET` per slot of the
    /// tags), and nothing at all for an entry without tags.
    pub(crate) async fn tags_current(&self, meta: &Meta) -> Result<bool, StoreError> {
        let Some(recorded) = &meta.tags else {
            return Ok(true);
        };
        let keys: Vec<TagKey> = recorded
            .iter()
            .map(|t| self.s.layout.tag_key_escaped(&t.tag))
            .collect();
        let current = self.tag_store()?.tag_generations(&keys).await?;
        Ok(current.len() == recorded.len()
            && (recorded.iter().zip(&current)).all(|(r, c)| *c == Some(r.generation)))
    }

    /// The tag keys of `value`, escaped, without repeats, in the order given.
    fn tag_keys(&self, key: &K, skey: &StoreKey, value: &V) -> Result<Vec<TagKey>, Error> {
        let Some(tags_of) = &self.tags else {
            return Ok(Vec::new());
        };
        let mut keys: Vec<TagKey> = Vec::new();
        for tag in tags_of(key, value) {
            let tkey = self.s.layout.tag_key(tag.as_str());
            if tkey.tag().len() > MAX_TAG_LEN {
                return Err(Error::with_message(
                    ErrorKind::Codec,
                    self.namespace(),
                    Some(skey.user_key()),
                    format!(
                        "tag {:?} is {} bytes escaped, more than {MAX_TAG_LEN}",
                        tkey.tag(),
                        tkey.tag().len()
                    ),
                ));
            }
            if !keys.contains(&tkey) {
                keys.push(tkey);
            }
        }
        if keys.len() > MAX_TAGS {
            return Err(Error::with_message(
                ErrorKind::Codec,
                self.namespace(),
                Some(skey.user_key()),
                format!("{} tags, more than {MAX_TAGS}", keys.len()),
            ));
        }
        Ok(keys)
    }

    /// Claims the generations of `value`'s tags for an entry whose load began
    /// at tag clock `since` (`u64::MAX` for a write).
    pub(crate) async fn claim_tags(
        &self,
        key: &K,
        skey: &StoreKey,
        value: Option<&V>,
        since: u64,
    ) -> Result<Claimed, Error> {
        let keys = match value {
            Some(value) => self.tag_keys(key, skey, value)?,
            None => Vec::new(),
        };
        if keys.is_empty() {
            return Ok(Claimed::Tags(None));
        }
        let claimed = async { self.tag_store()?.claim_tags(&keys, since).await }
            .await
            .map_err(|e| self.store_error(skey, e))?;
        Ok(match claimed {
            None => Claimed::Refused,
            Some(generations) => Claimed::Tags(Some(
                (keys.iter().zip(generations))
                    .map(|(k, generation)| TagGeneration {
                        tag: k.tag().into(),
                        generation,
                    })
                    .collect(),
            )),
        })
    }

    /// The tags a write of `value` records: a claim that no invalidation
    /// refuses, as no load is involved.
    pub(crate) async fn write_tags(
        &self,
        key: &K,
        skey: &StoreKey,
        value: &V,
    ) -> Result<Option<Arc<[TagGeneration]>>, Error> {
        match self.claim_tags(key, skey, Some(value), u64::MAX).await? {
            Claimed::Tags(tags) => Ok(tags),
            // The trait rules this out for `u64::MAX`; a store that does it
            // anyway fails the write rather than writing it without tags.
            Claimed::Refused => Err(self.store_error(
                skey,
                StoreError::protocol("the store refused the tags of a write"),
            )),
        }
    }

    /// Moves `tag` to a new generation, and empties this process's near
    /// cache at once (other processes' near caches empty on the bus notice).
    pub(crate) async fn bump_tag(&self, tkey: &TagKey) -> Result<(), Error> {
        let bumped = async { self.tag_store()?.invalidate_tag(tkey).await }.await;
        if let Some(near) = &self.near {
            near.invalidate_tag();
        }
        bumped.map_err(|e| {
            self.counters.store_errors.inc();
            Error::new(
                ErrorKind::Store,
                self.namespace(),
                Some(tkey.as_str()),
                Some(Box::new(e)),
            )
        })
    }
}
