//! The tag generations of a [`MemoryStore`](super::MemoryStore), and the tag
//! clock they are drawn from.
//!
//! The clock is even and moves on by two at each tag invalidation, whose new
//! generation is the clock's new value. A tag seen for the first time (or
//! again after its generation was evicted from the bounded map) gets the
//! clock's value plus one, odd: a value it never had, since every earlier one
//! was at most the clock, and one that no invalidation will give it either.
//! So `generation & !1` is the clock when the generation was made, which is
//! what a claim compares with the clock its load began at. One clock serves
//! every cache of the store: a cache only compares its own tags against it.

use cachet_core::TagKey;
use parking_lot::Mutex;

/// The clock value at which `generation` was made.
pub(crate) const fn made_at(generation: u64) -> u64 {
    generation & !1
}

pub(crate) struct TagTable {
    /// Generations by tag key, bounded like the store's tables.
    generations: quick_cache::sync::Cache<String, u64>,
    /// The tag clock; held while a generation is drawn and stored, so that
    /// claims and invalidations of one tag are one step each.
    clock: Mutex<u64>,
}

impl TagTable {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            generations: quick_cache::sync::Cache::new(capacity.max(1)),
            clock: Mutex::new(2),
        }
    }

    pub(crate) fn clock(&self) -> u64 {
        *self.clock.lock()
    }

    pub(crate) fn generations(&self, tags: &[TagKey]) -> Vec<Option<u64>> {
        tags.iter()
            .map(|t| self.generations.get(t.as_str()))
            .collect()
    }

    /// See [`cachet_core::Tags::claim_tags`].
    pub(crate) fn claim(&self, tags: &[TagKey], since: u64) -> Option<Vec<u64>> {
        let clock = self.clock.lock();
        let mut claimed = Vec::with_capacity(tags.len());
        for tag in tags {
            let generation = match self.generations.get(tag.as_str()) {
                Some(g) => g,
                None if *clock > since => return None,
                None => {
                    let g = *clock + 1;
                    self.generations.insert(tag.as_str().to_owned(), g);
                    g
                }
            };
            if made_at(generation) > since {
                return None;
            }
            claimed.push(generation);
        }
        Some(claimed)
    }

    pub(crate) fn invalidate(&self, tag: &TagKey) {
        let mut clock = self.clock.lock();
        *clock += 2;
        self.generations.insert(tag.as_str().to_owned(), *clock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_core::KeyLayout;

    fn tag(name: &str) -> TagKey {
        KeyLayout::new("cachet:", "t").unwrap().tag_key(name)
    }

    #[test]
    fn a_claim_is_refused_after_an_invalidation_since_its_load_began() {
        let table = TagTable::new(100);
        let since = table.clock();
        let first = table.claim(&[tag("a"), tag("b")], since).unwrap();
        assert_eq!(
            table.claim(&[tag("a"), tag("b")], since),
            Some(first.clone())
        );
        table.invalidate(&tag("b"));
        assert_eq!(table.claim(&[tag("a"), tag("b")], since), None);
        assert_eq!(table.claim(&[tag("a")], since), Some(vec![first[0]]));
        let later = table.clock();
        let again = table.claim(&[tag("a"), tag("b")], later).unwrap();
        assert_ne!(again[1], first[1]);
        assert_eq!(
            table.generations(&[tag("a"), tag("b"), tag("c")]),
            [Some(again[0]), Some(again[1]), None]
        );
    }

    #[test]
    fn an_evicted_generation_comes_back_as_a_value_it_never_had() {
        let table = TagTable::new(100);
        let old = table.claim(&[tag("a")], table.clock()).unwrap()[0];
        table.invalidate(&tag("a"));
        let invalidated = table.generations(&[tag("a")])[0].unwrap();
        table.generations.remove(tag("a").as_str());
        assert_eq!(table.generations(&[tag("a")]), [None]);
        let again = table.claim(&[tag("a")], table.clock()).unwrap()[0];
        assert!(
            again != old && again != invalidated,
            "{old} {invalidated} {again}"
        );
    }

    #[test]
    fn a_new_tag_is_refused_once_the_clock_moved_past_the_load() {
        let table = TagTable::new(100);
        let since = table.clock();
        table.invalidate(&tag("other"));
        assert_eq!(table.claim(&[tag("new")], since), None);
        assert!(table.claim(&[tag("new")], table.clock()).is_some());
    }
}
