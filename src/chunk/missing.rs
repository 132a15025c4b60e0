//! Chunks a node should hold but may not yet have: its shards' logs,
//! snapshots and the start-up audit name them, and the node's repair task
//! works the list off, retrying with backoff until a replica answers.

use super::ChunkStore;
use crate::types::ChunkId;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long after a chunk is named it is first looked at: a write still in
/// flight to this node should not be copied twice.
const GRACE: Duration = Duration::from_millis(500);
/// Longest wait between two attempts at a chunk no replica would give.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Missing {
    /// Where the chunks go: a chunk already there is not missing.
    store: Arc<ChunkStore>,
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    /// When each chunk is next looked at, earliest first.
    due: BTreeSet<(Instant, ChunkId)>,
    /// Failed attempts so far, by chunk; also says which chunks are queued.
    attempts: HashMap<ChunkId, u32>,
}

impl Missing {
    /// Nothing missing yet from `store`.
    pub fn new(store: Arc<ChunkStore>) -> Self {
        Missing {
            store,
            queue: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// Notes that this node should hold `id`, unless it does already (the
    /// usual case: a chunk is written before it is recorded). Naming a
    /// queued chunk again changes nothing. Returns true if `id` is queued
    /// now and was not before.
    pub fn name(&self, id: ChunkId) -> bool {
        if self.store.contains(&id) {
            return false;
        }
        let mut q = self.queue.lock().unwrap();
        if q.attempts.contains_key(&id) {
            return false;
        }
        q.attempts.insert(id, 0);
        q.due.insert((Instant::now() + GRACE, id));
        drop(q);
        self.wake.notify_one();
        true
    }

    /// How many chunks are named and not yet known to be here.
    pub fn len(&self) -> usize {
        self.queue.lock().unwrap().attempts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the next chunk that is due. It stays counted in `len`
    /// until `done` or `retry`.
    pub async fn next(&self) -> ChunkId {
        loop {
            let first = self.queue.lock().unwrap().due.first().copied();
            match first {
                Some((at, id)) if at <= Instant::now() => {
                    let mut q = self.queue.lock().unwrap();
                    q.due.remove(&(at, id));
                    // Not counted any more: collected meanwhile.
                    if q.attempts.contains_key(&id) {
                        return id;
                    }
                }
                Some((at, _)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// The chunk is on disk now.
    pub fn done(&self, id: ChunkId) {
        self.queue.lock().unwrap().attempts.remove(&id);
    }

    /// Garbage collection dropped the chunk's record: it is wanted no
    /// more, and its file goes. A crash before the unlink leaves an orphan
    /// file for the sweep.
    pub fn collected(&self, id: ChunkId) {
        self.queue.lock().unwrap().attempts.remove(&id);
        if let Err(e) = self.store.remove(&id) {
            tracing::warn!(chunk = %id.to_hex(), "deleting a collected chunk: {e}");
        }
    }

    /// No replica gave the chunk; tries again later, waiting longer each
    /// time. Returns the number of failed attempts so far.
    pub fn retry(&self, id: ChunkId) -> u32 {
        let mut q = self.queue.lock().unwrap();
        let attempts = q.attempts.entry(id).or_default();
        *attempts += 1;
        let n = *attempts;
        let wait = (GRACE * 2u32.saturating_pow(n)).min(MAX_BACKOFF);
        q.due.insert((Instant::now() + wait, id));
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[tokio::test(start_paused = true)]
    async fn named_chunks_come_due_after_the_grace_and_retries_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path()).unwrap());
        let m = Missing::new(store.clone());
        let held = bytes::Bytes::from_static(b"already here");
        let held_id = ChunkId::of(&held);
        store.put_verified(held_id, held).await.unwrap();
        m.name(held_id);
        assert!(m.is_empty(), "a chunk on disk was named missing");
        m.name(id(1));
        m.name(id(1));
        m.name(id(2));
        assert_eq!(m.len(), 2);
        let started = Instant::now();
        let first = m.next().await;
        assert!(started.elapsed() >= GRACE);
        let second = m.next().await;
        assert_eq!([first, second].iter().collect::<BTreeSet<_>>().len(), 2);
        m.done(first);
        assert_eq!(m.len(), 1);
        assert_eq!(m.retry(second), 1);
        let retried = Instant::now();
        assert_eq!(m.next().await, second);
        assert!(retried.elapsed() >= GRACE * 2);
        m.done(second);
        assert!(m.is_empty());
    }
}
