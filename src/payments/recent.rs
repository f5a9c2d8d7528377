//! A bounded memory of the payment keys an actor answered last.

use std::collections::{HashMap, VecDeque};

/// The `capacity` keys inserted most recently, with their values. Inserting a new key when full
/// forgets the oldest (first in, first out): the books hold every key for good, so this is only
/// the fast path for retries, which come soon after the first attempt.
#[derive(Debug)]
pub struct RecentKeys<V> {
    values: HashMap<String, V>,
    /// Keys in the order they were first inserted; the front is forgotten first.
    order: VecDeque<String>,
    capacity: usize,
}

impl<V> RecentKeys<V> {
    /// A memory of at most `capacity` keys (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            values: HashMap::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.values.get(key)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.values.get_mut(key)
    }

    /// Remembers `value` under `key`. A key already held keeps its place; a new one may push
    /// the oldest out.
    pub fn insert(&mut self, key: String, value: V) {
        if let Some(held) = self.values.get_mut(&key) {
            *held = value;
            return;
        }
        if self.order.len() == self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.values.remove(&oldest);
            }
        }
        self.order.push_back(key.clone());
        self.values.insert(key, value);
        debug_assert_eq!(self.order.len(), self.values.len());
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::RecentKeys;

    #[test]
    fn the_memory_never_holds_more_than_its_capacity() {
        let mut recent = RecentKeys::new(3);
        for i in 0..1_000 {
            recent.insert(format!("k{i}"), i);
            assert!(recent.len() <= 3);
            assert_eq!(recent.order.len(), recent.values.len());
        }
        assert_eq!(recent.len(), 3);
    }

    #[test]
    fn the_oldest_key_is_forgotten_first() {
        let mut recent = RecentKeys::new(2);
        recent.insert("a".into(), 1);
        recent.insert("b".into(), 2);
        recent.insert("c".into(), 3);
        assert_eq!(recent.get("a"), None);
        assert_eq!(recent.get("b"), Some(&2));
        assert_eq!(recent.get("c"), Some(&3));
    }

    #[test]
    fn updating_a_held_key_keeps_its_place_and_evicts_nothing() {
        let mut recent = RecentKeys::new(2);
        recent.insert("a".into(), 1);
        recent.insert("b".into(), 2);
        recent.insert("a".into(), 10);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent.get("a"), Some(&10));
        *recent.get_mut("b").unwrap() = 20;
        // "a" is still the oldest, so the next new key pushes it out
        recent.insert("c".into(), 3);
        assert_eq!(recent.get("a"), None);
        assert_eq!(recent.get("b"), Some(&20));
    }

    #[test]
    fn a_zero_capacity_still_remembers_the_last_key() {
        let mut recent = RecentKeys::new(0);
        recent.insert("a".into(), 1);
        recent.insert("b".into(), 2);
        assert_eq!(recent.len(), 1);
        assert_eq!(recent.get("b"), Some(&2));
    }
}
