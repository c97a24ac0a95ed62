//! The bounded session table of a UDP listener: at most `max` sessions;
//! a new one beyond is refused, the existing ones are untouched.

use std::collections::HashMap;
use std::hash::Hash;

pub struct SessionTable<K, V> {
    map: HashMap<K, V>,
    max: usize,
}

/// The table holds `max` sessions already.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl<K: Hash + Eq, V> SessionTable<K, V> {
    pub fn new(max: usize) -> Self {
        SessionTable {
            map: HashMap::new(),
            max,
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// Adds a session unless the table is full. The key must be new.
    pub fn insert(&mut self, key: K, value: V) -> Result<(), Full> {
        if self.is_full() {
            return Err(Full);
        }
        let old = self.map.insert(key, value);
        debug_assert!(old.is_none(), "a session replaced another");
        Ok(())
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key)
    }

    /// Takes out every session for which `expired` says so.
    pub fn remove_where(&mut self, mut expired: impl FnMut(&V) -> bool) -> Vec<(K, V)> {
        self.map.extract_if(|_, v| expired(v)).collect()
    }

    /// Takes out every session.
    pub fn drain(&mut self) -> Vec<(K, V)> {
        self.map.drain().collect()
    }

    pub fn is_full(&self) -> bool {
        self.map.len() >= self.max
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_beyond_max_and_keeps_the_old() {
        let mut t = SessionTable::new(3);
        for k in 0..3 {
            assert_eq!(t.insert(k, k * 10), Ok(()));
        }
        assert!(t.is_full());
        assert!(!t.is_empty());
        assert_eq!(t.insert(3, 30), Err(Full));
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(&0), Some(&0));
        assert_eq!(t.get(&2), Some(&20));
        assert_eq!(t.get(&3), None);
    }

    #[test]
    fn room_again_after_a_removal() {
        let mut t = SessionTable::new(2);
        t.insert("a", 1).unwrap();
        t.insert("b", 2).unwrap();
        assert_eq!(t.insert("c", 3), Err(Full));
        assert_eq!(t.remove(&"a"), Some(1));
        assert_eq!(t.insert("c", 3), Ok(()));
        assert_eq!(t.get(&"b"), Some(&2));
    }

    #[test]
    fn remove_where_takes_only_the_matching() {
        let mut t = SessionTable::new(10);
        for k in 0..10 {
            t.insert(k, k).unwrap();
        }
        let mut gone: Vec<_> = t
            .remove_where(|v| v % 3 == 0)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        gone.sort();
        assert_eq!(gone, [0, 3, 6, 9]);
        assert_eq!(t.len(), 6);
        assert_eq!(t.drain().len(), 6);
        assert!(t.is_empty());
    }

    #[test]
    fn zero_max_refuses_everything() {
        let mut t = SessionTable::new(0);
        assert_eq!(t.insert(1, 1), Err(Full));
    }
}
