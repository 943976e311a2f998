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
    /// Each entry with the number of its place in `order`.
    by_id: HashMap<FileId, (V, u64)>,
    /// Files in the order they were put, each with its place's number: a place whose number is
    /// no longer its file's (forgotten and put again since) is passed over when it comes first.
    order: VecDeque<(FileId, u64)>,
    next: u64,
    capacity: usize,
}

impl<V> Recent<V> {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self { by_id: HashMap::new(), order: Default::default(), next: 0, capacity }
    }

    /// The entry for `file_id`, by reference (to compare without a copy).
    pub(super) fn peek(&self, file_id: FileId) -> Option<&V> {
        self.by_id.get(&file_id).map(|(v, _)| v)
    }

    pub(super) fn contains(&self, file_id: FileId) -> bool {
        self.by_id.contains_key(&file_id)
    }

    pub(super) fn put(&mut self, file_id: FileId, value: V) {
        if let Some((old, _)) = self.by_id.get_mut(&file_id) {
            *old = value;
            return;
        }
        self.next += 1;
        self.by_id.insert(file_id, (value, self.next));
        self.order.push_back((file_id, self.next));
        while self.order.len() > self.capacity {
            if let Some((old, place)) = self.order.pop_front() {
                if self.by_id.get(&old).is_some_and(|(_, p)| *p == place) {
                    self.by_id.remove(&old);
                }
            }
        }
    }

    pub(super) fn forget(&mut self, file_id: FileId) -> Option<V> {
        // its place in `order` goes when it comes first
        self.by_id.remove(&file_id).map(|(v, _)| v)
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
