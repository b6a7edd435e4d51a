//! A sorted map for the small maps inside per-customer state.
//!
//! Most of these maps hold nothing or one or two entries, and a million customers
//! are cached at once. A `BTreeMap` allocates a node of eleven slots for its first
//! entry; [`SmallMap`] keeps a sorted `Vec` ([`litemap::LiteMap`]), so a map of one
//! entry costs one small allocation. It encodes exactly as a `BTreeMap` does (a map
//! in key order, also when empty), so state and JSON written by either read back
//! with the other.

use std::ops::{Deref, DerefMut};

use litemap::LiteMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq)]
pub struct SmallMap<K, V>(LiteMap<K, V>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap(LiteMap::new())
    }
}

impl<K, V> Deref for SmallMap<K, V> {
    type Target = LiteMap<K, V>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<K, V> DerefMut for SmallMap<K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SmallMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        SmallMap(iter.into_iter().collect())
    }
}

impl<K: Ord, V> Extend<(K, V)> for SmallMap<K, V> {
    /// As `BTreeMap::extend`: a key already present takes the new value.
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.0.insert(k, v);
        }
    }
}

impl<K, V> IntoIterator for SmallMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_tuple_vec().into_iter()
    }
}

/// A pair of the map, as references (what `&BTreeMap` iterates).
type PairRefs<'a, K, V> = fn(&'a (K, V)) -> (&'a K, &'a V);

impl<'a, K, V> IntoIterator for &'a SmallMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, PairRefs<'a, K, V>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.as_slice().iter().map(|(k, v)| (k, v))
    }
}

impl<K: Serialize, V: Serialize> Serialize for SmallMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Always as a map: `LiteMap` writes a sequence of pairs for an empty map (and
        // for some keys) in human-readable formats, which a `BTreeMap` does not read.
        serializer.collect_map(self.0.iter())
    }
}

impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Deserialize<'de> for SmallMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        LiteMap::deserialize(deserializer).map(SmallMap)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::encoding::{decode_state, encode_state};

    fn sample() -> (SmallMap<String, i64>, BTreeMap<String, i64>) {
        let pairs = [
            ("b".to_string(), 2),
            ("a".to_string(), 1),
            ("c".to_string(), 3),
        ];
        (
            pairs.iter().cloned().collect(),
            pairs.iter().cloned().collect(),
        )
    }

    #[test]
    fn encodes_exactly_as_a_btree_map() {
        let (small, btree) = sample();
        assert_eq!(
            serde_json::to_string(&small).ok(),
            serde_json::to_string(&btree).ok()
        );
        assert_eq!(
            serde_json::to_string(&small).ok().as_deref(),
            Some(r#"{"a":1,"b":2,"c":3}"#)
        );
        assert_eq!(encode_state(&small).ok(), encode_state(&btree).ok());
        let empty: SmallMap<String, i64> = SmallMap::default();
        assert_eq!(serde_json::to_string(&empty).ok().as_deref(), Some("{}"));
        assert_eq!(
            encode_state(&empty).ok(),
            encode_state(&BTreeMap::<String, i64>::new()).ok()
        );
    }

    #[test]
    fn reads_what_a_btree_map_wrote_and_back() {
        let (small, btree) = sample();
        let bytes = encode_state(&btree).expect("encode");
        let read: SmallMap<String, i64> = decode_state(&bytes).expect("decode");
        assert_eq!(read, small);
        let bytes = encode_state(&small).expect("encode");
        let read: BTreeMap<String, i64> = decode_state(&bytes).expect("decode");
        assert_eq!(read, btree);
        let json = serde_json::to_string(&small).expect("json");
        let read: BTreeMap<String, i64> = serde_json::from_str(&json).expect("json back");
        assert_eq!(read, btree);
    }

    #[test]
    fn extend_lets_the_new_value_win_like_a_btree_map() {
        let (mut small, mut btree) = sample();
        let more = [("a".to_string(), 10), ("d".to_string(), 4)];
        small.extend(more.clone());
        btree.extend(more);
        assert_eq!(
            small.into_iter().collect::<Vec<_>>(),
            btree.into_iter().collect::<Vec<_>>()
        );
    }
}
