//! What a store remembers of the status records this process last read or wrote: a bounded
//! map by file id, oldest entries dropped first. A cache, never the truth: each adapter only
//! uses an entry where the write it makes checks it (DynamoDB: the write's condition; SQLite:
//! the stored JSON compared inside the writer's transaction), or where a stale record is
//! harmless ([`super::StatusStore::remembered`]).

use crate::file_id::FileId;
use std::collections::{HashMap, VecDeque};

/// Files in flight at once in one process are far fewer than this.
pub(super) const KNOWN_RECORDS: usize = 4096;

pub(super) struct Recent<V> {
    /// Each entry with the number of its place in `order` and its weight.
    by_id: HashMap<FileId, (V, u64, usize)>,
    /// Files in the order they were put, each with its place's number: a place whose number is
    /// no longer its file's (forgotten and put again since) is passed over when it comes first.
    order: VecDeque<(FileId, u64)>,
    next: u64,
    capacity: usize,
    /// The most the entries may weigh together (see [`Recent::put_weighing`]).
    max_weight: usize,
    weight: usize,
}

impl<V> Recent<V> {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self::with_limits(capacity, usize::MAX)
    }

    /// At most `capacity` entries, and at most `max_weight` of them together: the oldest go
    /// first when either is passed.
    pub(super) fn with_limits(capacity: usize, max_weight: usize) -> Self {
        Self { by_id: HashMap::new(), order: Default::default(), next: 0, capacity, max_weight, weight: 0 }
    }

    /// The entry for `file_id`, by reference (to compare without a copy).
    pub(super) fn peek(&self, file_id: FileId) -> Option<&V> {
        self.by_id.get(&file_id).map(|(v, _, _)| v)
    }

    pub(super) fn contains(&self, file_id: FileId) -> bool {
        self.by_id.contains_key(&file_id)
    }

    pub(super) fn put(&mut self, file_id: FileId, value: V) {
        self.put_weighing(file_id, value, 0);
    }

    /// Puts an entry that counts `weight` towards the limit on weight (what it holds, say);
    /// an entry put again keeps its place.
    pub(super) fn put_weighing(&mut self, file_id: FileId, value: V, weight: usize) {
        if let Some((old, _, w)) = self.by_id.get_mut(&file_id) {
            *old = value;
            self.weight = self.weight - *w + weight;
            *w = weight;
        } else {
            self.next += 1;
            self.by_id.insert(file_id, (value, self.next, weight));
            self.order.push_back((file_id, self.next));
            self.weight += weight;
        }
        while self.order.len() > self.capacity || self.weight > self.max_weight {
            let Some((old, place)) = self.order.pop_front() else { break };
            if self.by_id.get(&old).is_some_and(|(_, p, _)| *p == place) {
                self.forget(old);
            }
        }
    }

    pub(super) fn forget(&mut self, file_id: FileId) -> Option<V> {
        // its place in `order` goes when it comes first
        self.by_id.remove(&file_id).map(|(v, _, w)| {
            self.weight -= w;
            v
        })
    }
}

impl<V: Clone> Recent<V> {
    pub(super) fn get(&self, file_id: FileId) -> Option<V> {
        self.peek(file_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_entries_up_to_its_capacity() {
        let mut recent = Recent::with_capacity(2);
        let ids: Vec<FileId> = (0..3).map(|_| FileId::new()).collect();
        for (n, id) in ids.iter().enumerate() {
            recent.put(*id, n);
        }
        assert_eq!(recent.get(ids[0]), None);
        assert_eq!(recent.get(ids[1]), Some(1));
        assert_eq!(recent.peek(ids[2]), Some(&2));
        assert_eq!(recent.forget(ids[2]), Some(2));
        assert!(!recent.contains(ids[2]));
    }

    #[test]
    fn the_oldest_entries_go_when_the_entries_weigh_too_much() {
        let mut recent = Recent::with_limits(10, 100);
        let ids: Vec<FileId> = (0..4).map(|_| FileId::new()).collect();
        recent.put_weighing(ids[0], 0, 40);
        recent.put_weighing(ids[1], 1, 40);
        recent.put_weighing(ids[2], 2, 20);
        assert!(ids[..3].iter().all(|id| recent.contains(*id)), "100 of 100: all kept");
        recent.put_weighing(ids[3], 3, 30);
        assert_eq!(recent.get(ids[0]), None, "the oldest went to make room");
        assert_eq!((recent.get(ids[1]), recent.get(ids[3])), (Some(1), Some(3)));
        // an entry put again weighs what it weighs now, and keeps its place
        recent.put_weighing(ids[1], 11, 70);
        assert_eq!(recent.get(ids[1]), None, "it was the oldest: it went when it grew");
        assert_eq!((recent.get(ids[2]), recent.get(ids[3])), (Some(2), Some(3)));
        recent.put_weighing(ids[2], 12, 10);
        assert_eq!(recent.forget(ids[3]), Some(3));
        recent.put_weighing(ids[0], 10, 90);
        assert_eq!((recent.get(ids[2]), recent.get(ids[0])), (Some(12), Some(10)), "10 + 90 fits");
    }

    #[test]
    fn an_entry_forgotten_and_put_again_keeps_its_new_place() {
        let mut recent = Recent::with_capacity(2);
        let (a, b, c) = (FileId::new(), FileId::new(), FileId::new());
        recent.put(a, 1);
        recent.forget(a);
        recent.put(a, 2);
        recent.put(b, 3);
        // a's first place comes first and goes, but a lives on in its second
        assert_eq!((recent.get(a), recent.get(b)), (Some(2), Some(3)));
        recent.put(c, 4);
        assert_eq!((recent.get(a), recent.get(b), recent.get(c)), (None, Some(3), Some(4)));
    }
}
