//! A map whose values sit side by side in one vector, found through a small hash index.
//!
//! The engine's tables hold 150-180-byte values, looked up by kernel address on nearly every
//! event. In a plain hash map each bucket carries its value, so a table of 100k+ sockets spreads
//! over tens of megabytes: a lookup misses the cache on the control bytes and again on the
//! bucket, inserting moves the value, and growing moves them all into a table twice the size.
//! Here the hash table holds only `key -> index` (16 bytes a bucket for a `u64` key), small
//! enough to stay in cache, and the values sit in a vector: growing rehashes indexes only, and
//! the vector, at least half full, wastes less than a table at most 7/8 full of value buckets.

use std::hash::Hash;

use foldhash::{HashMap, HashMapExt as _};

#[derive(Debug)]
pub struct DenseMap<K, V> {
    index: HashMap<K, u32>,
    /// The values, and the key of each, in the same order.
    entries: Vec<(K, V)>,
    /// The most entries held since the last [`DenseMap::shrink_sparse`].
    high: usize,
}

impl<K: Copy + Eq + Hash, V> Default for DenseMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Copy + Eq + Hash, V> DenseMap<K, V> {
    pub fn new() -> Self {
        Self {
            index: HashMap::new(),
            entries: Vec::new(),
            high: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        let &i = self.index.get(key)?;
        self.entries.get(i as usize).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let &i = self.index.get(key)?;
        self.entries.get_mut(i as usize).map(|(_, v)| v)
    }

    /// Inserts `value` under `key`; returns the value it replaces.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(&i) = self.index.get(&key) {
            let slot = &mut self.entries[i as usize].1;
            return Some(std::mem::replace(slot, value));
        }
        // More than u32::MAX entries would not fit in memory anyway (150+ bytes each).
        let i = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        self.index.insert(key, i);
        self.entries.push((key, value));
        self.high = self.high.max(self.entries.len());
        None
    }

    /// The value under `key`, inserting `make()` first if there is none.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.index.get(&key) {
            Some(&i) => i as usize,
            None => {
                self.insert(key, make());
                self.entries.len() - 1
            }
        };
        &mut self.entries[i].1
    }

    /// Removes and returns the value under `key`. The last entry takes its place.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.index.remove(key)? as usize;
        let (_, value) = self.entries.swap_remove(i);
        if let Some((moved, _)) = self.entries.get(i)
            && let Some(slot) = self.index.get_mut(moved)
        {
            *slot = i as u32;
        }
        Some(value)
    }

    /// How many entries it holds room for.
    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Gives back memory when the most entries it held since the last call is at most a
    /// quarter of its room (see [`sparse`]): down to room for twice that.
    pub fn shrink_sparse(&mut self) {
        let high = std::mem::replace(&mut self.high, self.entries.len());
        if sparse(high, self.capacity()) {
            self.entries.shrink_to(high.saturating_mul(2));
        }
        if sparse(high, self.index.capacity()) {
            self.index.shrink_to(high.saturating_mul(2));
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }
}

/// Whether a table with room for `capacity` entries, which held at most `high` lately, should
/// give memory back: it has room for 4 times that, and for more than a few thousand entries
/// (below that, what it would give back is not worth a reallocation).
pub fn sparse(high: usize, capacity: usize) -> bool {
    capacity > 4096 && high.saturating_mul(4) <= capacity
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Random inserts, replacements and removals, checked against a BTreeMap after each step.
    #[test]
    fn behaves_like_a_map() {
        let mut dense = DenseMap::new();
        let mut model = BTreeMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 512;
            match x % 5 {
                0 | 1 => assert_eq!(dense.insert(key, step), model.insert(key, step)),
                2 => assert_eq!(dense.remove(&key), model.remove(&key)),
                3 => {
                    *dense.get_or_insert_with(key, || step) += 1;
                    *model.entry(key).or_insert(step) += 1;
                }
                _ => {
                    if let Some(v) = dense.get_mut(&key) {
                        *v += 7;
                    }
                    if let Some(v) = model.get_mut(&key) {
                        *v += 7;
                    }
                }
            }
            assert_eq!(dense.len(), model.len());
            assert_eq!(dense.get(&key), model.get(&key));
        }
        let mut all: Vec<(u64, u64)> = dense.iter().map(|(k, v)| (*k, *v)).collect();
        all.sort_unstable();
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn a_sparse_map_gives_memory_back_and_keeps_its_entries() {
        let mut dense = DenseMap::new();
        for key in 0..100_000u64 {
            dense.insert(key, key * 3);
        }
        let full = dense.capacity();
        dense.shrink_sparse();
        assert_eq!(dense.capacity(), full, "not sparse: kept");
        for key in 1_000..100_000u64 {
            assert_eq!(dense.remove(&key), Some(key * 3));
        }
        // Held 100,000 since the last call: kept. Held 1,000 since then: shrunk.
        dense.shrink_sparse();
        assert_eq!(dense.capacity(), full, "held 100,000 lately: kept");
        dense.shrink_sparse();
        assert!(dense.capacity() < 4_096, "{}", dense.capacity());
        assert!(dense.index.capacity() < 4_096, "{}", dense.index.capacity());
        assert_eq!(dense.len(), 1_000);
        for key in 0..1_000u64 {
            assert_eq!(dense.get(&key), Some(&(key * 3)));
        }
        assert!(!sparse(1_000, 4_096), "small tables are left alone");
    }
}
