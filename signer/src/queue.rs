//! A work queue keyed by request: a key is handled by one worker at a
//! time, a key added again while queued is queued once (with the newest
//! object), and a key added while a worker handles it is queued again when
//! that worker is done.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::Notify;

/// The queue; share it behind an `Arc`.
#[derive(Debug)]
pub(crate) struct WorkQueue<K, V> {
    state: Mutex<State<K, V>>,
    notify: Notify,
}

#[derive(Debug)]
struct State<K, V> {
    order: VecDeque<K>,
    /// The newest object of each queued (or re-queued) key.
    pending: HashMap<K, V>,
    /// Keys a worker handles now.
    active: HashSet<K>,
}

impl<K: Clone + Eq + Hash, V> WorkQueue<K, V> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                order: VecDeque::new(),
                pending: HashMap::new(),
                active: HashSet::new(),
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K, V>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `key` with its newest `value`.
    pub(crate) fn add(&self, key: K, value: V) {
        let mut state = self.lock();
        let queued = state.pending.insert(key.clone(), value).is_some();
        if !queued && !state.active.contains(&key) {
            state.order.push_back(key);
            drop(state);
            self.notify.notify_one();
        }
    }

    /// Forgets a queued key (the object was deleted).
    pub(crate) fn remove(&self, key: &K) {
        let mut state = self.lock();
        if state.pending.remove(key).is_some() {
            state.order.retain(|k| k != key);
        }
    }

    /// Takes the next key to handle, waiting for one.
    pub(crate) async fn next(&self) -> (K, V) {
        loop {
            {
                let mut state = self.lock();
                while let Some(key) = state.order.pop_front() {
                    if let Some(value) = state.pending.remove(&key) {
                        state.active.insert(key.clone());
                        return (key, value);
                    }
                }
            }
            // A permit stored by `notify_one` between the check above and
            // this wait is consumed here, so no addition is missed.
            self.notify.notified().await;
        }
    }

    /// Marks `key` handled; queues it again if it was added meanwhile.
    pub(crate) fn done(&self, key: &K) {
        let mut state = self.lock();
        state.active.remove(key);
        if state.pending.contains_key(key) {
            state.order.push_back(key.clone());
            drop(state);
            self.notify.notify_one();
        }
    }

    /// Keys queued, not counting those being handled.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_worker_per_key_and_newest_value() {
        let q: WorkQueue<&str, u32> = WorkQueue::new();
        q.add("a", 1);
        q.add("a", 2);
        q.add("b", 1);
        assert_eq!(q.len(), 2);
        let (k, v) = q.next().await;
        assert_eq!((k, v), ("a", 2));
        // Added while handled: not handed out until done.
        q.add("a", 3);
        let (k, _) = q.next().await;
        assert_eq!(k, "b");
        q.done(&"b");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), q.next())
                .await
                .is_err()
        );
        q.done(&"a");
        assert_eq!(q.next().await, ("a", 3));
        q.add("c", 1);
        q.remove(&"c");
        assert_eq!(q.len(), 0);
    }
}
