//! The Raft log and vote of one shard.
//!
//! Entries go to the node's shared [`SegmentLog`]; the vote, the purge point
//! and the committed id go to the shard's `vote/<shard>` sled tree. openraft
//! is told an append is durable only after the node's [`Flusher`] has
//! fsynced the segment: one fsync covers every append that arrived from any
//! shard while the previous fsync ran (group commit). Entries carry a BLAKE3
//! checksum that is checked on every read, so a corrupt log is detected,
//! never replayed.

// openraft's trait methods return its large StorageError; ours match them.
#![allow(clippy::result_large_err)]

use super::segment_log::SegmentLog;
use super::TypeConfig;
use crate::types::{NodeId, ShardId};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use tokio::sync::oneshot;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Someone waiting for the next fsync.
enum Waiter {
    /// An append: needs the segment log on disk.
    Log(LogFlushed<TypeConfig>),
    /// A vote, purge, checkpoint or install: needs sled on disk too.
    Notify(oneshot::Sender<std::io::Result<()>>),
}

/// The node's group-commit fsync loop: one thread that fsyncs for everyone
/// who asked while the previous fsync ran. (sled's own `flush_async` wakes
/// its whole thread pool on every call.)
#[derive(Clone)]
pub struct Flusher {
    tx: std::sync::mpsc::Sender<Waiter>,
}

impl Flusher {
    /// Starts the loop; it ends when every handle is dropped.
    pub fn start(db: sled::Db, log: Arc<SegmentLog>) -> Flusher {
        let (tx, rx) = std::sync::mpsc::channel::<Waiter>();
        std::thread::Builder::new()
            .name("lumbung-fsync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let mut result = log.sync();
                    if result.is_ok() && waiters.iter().any(|w| matches!(w, Waiter::Notify(_))) {
                        result = db.flush().map(|_| ()).map_err(std::io::Error::other);
                    }
                    for w in waiters {
                        let r = match &result {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                        };
                        match w {
                            Waiter::Log(cb) => cb.log_io_completed(r),
                            Waiter::Notify(tx) => {
                                let _ = tx.send(r);
                            }
                        }
                    }
                }
            })
            .expect("spawning the fsync thread");
        Flusher { tx }
    }

    /// Waits until everything written so far, log and sled, is on disk.
    pub async fn sync(&self) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Waiter::Notify(tx))
            .map_err(|_| std::io::Error::other("flusher stopped"))?;
        rx.await
            .map_err(|_| std::io::Error::other("flusher stopped"))?
    }

    fn after_next_sync(&self, cb: LogFlushed<TypeConfig>) {
        if let Err(std::sync::mpsc::SendError(Waiter::Log(cb))) = self.tx.send(Waiter::Log(cb)) {
            cb.log_io_completed(Err(std::io::Error::other("flusher stopped")));
        }
    }
}

/// One shard's log and vote.
#[derive(Clone)]
pub struct LogStore {
    shard: ShardId,
    log: Arc<SegmentLog>,
    /// Vote, last purged log id and committed log id.
    vote: sled::Tree,
    flusher: Flusher,
}

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"purged";
const COMMITTED: &[u8] = b"committed";

fn read_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::error(e.to_string())).into()
}

fn write_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

fn vote_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_vote(AnyError::error(e.to_string())).into()
}

fn decode_entry(bytes: &[u8]) -> StorageResult<Entry<TypeConfig>> {
    crate::shard::command::from_msgpack(bytes).map_err(read_err)
}

impl LogStore {
    pub fn open(
        db: &sled::Db,
        log: Arc<SegmentLog>,
        shard: ShardId,
        flusher: Flusher,
    ) -> anyhow::Result<LogStore> {
        let store = LogStore {
            shard,
            log,
            vote: db.open_tree(format!("vote/{shard}"))?,
            flusher,
        };
        // Entries up to the purge point may still sit in older segments.
        if let Some(purged) = store.purged()? {
            store.log.purge(shard, purged.index)?;
        }
        Ok(store)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> StorageResult<Option<T>> {
        match self.vote.get(k).map_err(read_err)? {
            Some(v) => Ok(Some(
                crate::shard::command::from_msgpack(&v).map_err(read_err)?,
            )),
            None => Ok(None),
        }
    }

    fn purged(&self) -> StorageResult<Option<LogId<NodeId>>> {
        self.read_meta(PURGED)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let from = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(i) => i + 1,
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let payloads = self.log.read(self.shard, from, to).map_err(read_err)?;
        payloads.iter().map(|p| decode_entry(p)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged = self.purged()?;
        let last = match self.log.last(self.shard).map_err(read_err)? {
            Some(p) => Some(decode_entry(&p)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.vote
            .insert(VOTE, rmp_serde::to_vec(vote).map_err(vote_err)?)
            .map_err(vote_err)?;
        self.flusher.sync().await.map_err(vote_err)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Durability comes with a later fsync; losing it only costs a replay.
        self.vote
            .insert(COMMITTED, rmp_serde::to_vec(&committed).map_err(write_err)?)
            .map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self
            .read_meta::<Option<LogId<NodeId>>>(COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| {
                let bytes = rmp_serde::to_vec_named(&e).expect("entries serialize");
                (e.log_id.index, bytes)
            })
            .collect();
        self.log.append(self.shard, &encoded).map_err(write_err)?;
        self.flusher.after_next_sync(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.log
            .truncate(self.shard, log_id.index)
            .map_err(write_err)?;
        self.flusher.sync().await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // The purge point is durable before any segment is deleted.
        self.vote
            .insert(PURGED, rmp_serde::to_vec(&log_id).map_err(write_err)?)
            .map_err(write_err)?;
        self.flusher.sync().await.map_err(write_err)?;
        self.log.purge(self.shard, log_id.index).map_err(write_err)
    }
}
