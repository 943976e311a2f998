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
    by_id: HashMap<FileId, V>,
    order: VecDeque<FileId>,
    capacity: usize,
}

impl<V> Recent<V> {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self { by_id: HashMap::new(), order: Default::default(), capacity }
    }

    /// The entry for `file_id`, by reference (to compare without a copy).
    pub(super) fn peek(&self, file_id: FileId) -> Option<&V> {
        self.by_id.get(&file_id)
    }

    pub(super) fn contains(&self, file_id: FileId) -> bool {
        self.by_id.contains_key(&file_id)
    }

    pub(super) fn put(&mut self, file_id: FileId, value: V) {
        if self.by_id.insert(file_id, value).is_none() {
            self.order.push_back(file_id);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.by_id.remove(&old);
                }
            }
        }
    }

    pub(super) fn forget(&mut self, file_id: FileId) -> Option<V> {
        // its place in `order` goes when it reaches the front
        self.by_id.remove(&file_id)
    }
}

impl<V: Clone> Recent<V> {
    pub(super) fn get(&self, file_id: FileId) -> Option<V> {
        self.by_id.get(&file_id).cloned()
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
}
