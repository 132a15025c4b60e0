//! The Raft log and vote of one shard, kept in the node's sled database.
//!
//! Appends go into the shard's `log/<shard>` tree at once, but openraft is
//! told they are durable only after the node's [`Flusher`] has fsynced the
//! database. The flusher batches: one fsync covers every append and vote
//! that arrived from any shard while the previous fsync ran (group commit).
//!
//! Each entry is stored as `blake3(msgpack) ++ msgpack`, and the hash is
//! checked on every read, so a corrupt log is detected, never replayed.

// openraft's trait methods return its large StorageError; ours match them.
#![allow(clippy::result_large_err)]

use super::TypeConfig;
use crate::types::{NodeId, ShardId};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use std::fmt::Debug;
use std::ops::RangeBounds;
use tokio::sync::oneshot;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Someone waiting for the next fsync of the database.
enum Waiter {
    Log(LogFlushed<TypeConfig>),
    Notify(oneshot::Sender<std::io::Result<()>>),
}

/// The node's group-commit fsync loop: one thread that fsyncs the database
/// for everyone who asked while the previous fsync ran. (sled's own
/// `flush_async` wakes its whole thread pool on every call.)
#[derive(Clone)]
pub struct Flusher {
    tx: std::sync::mpsc::Sender<Waiter>,
}

impl Flusher {
    /// Starts the loop for `db`; it ends when every handle is dropped.
    pub fn start(db: sled::Db) -> Flusher {
        let (tx, rx) = std::sync::mpsc::channel::<Waiter>();
        std::thread::Builder::new()
            .name("lumbung-fsync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let result = db.flush().map(|_| ());
                    for w in waiters {
                        let r = result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| std::io::Error::other(e.to_string()));
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

    /// Waits until everything written so far is on disk.
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
    log: sled::Tree,
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

/// Encodes an entry with its BLAKE3 checksum in front.
fn seal(entry: &Entry<TypeConfig>) -> Vec<u8> {
    let body = rmp_serde::to_vec_named(entry).expect("entries serialize");
    let mut out = blake3::hash(&body).as_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Decodes an entry, refusing it if the checksum does not match.
fn unseal(bytes: &[u8]) -> StorageResult<Entry<TypeConfig>> {
    if bytes.len() < 32 || blake3::hash(&bytes[32..]).as_bytes() != &bytes[..32] {
        return Err(read_err("log entry checksum mismatch: the log is corrupt"));
    }
    rmp_serde::from_slice(&bytes[32..]).map_err(read_err)
}

impl LogStore {
    pub fn open(db: &sled::Db, shard: ShardId, flusher: Flusher) -> sled::Result<LogStore> {
        Ok(LogStore {
            log: db.open_tree(format!("log/{shard}"))?,
            vote: db.open_tree(format!("vote/{shard}"))?,
            flusher,
        })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> StorageResult<Option<T>> {
        match self.vote.get(k).map_err(read_err)? {
            Some(v) => Ok(Some(rmp_serde::from_slice(&v).map_err(read_err)?)),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            std::ops::Bound::Included(i) => *i,
            std::ops::Bound::Excluded(i) => i + 1,
            std::ops::Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.log.range(start.to_be_bytes()..) {
            let (k, v) = kv.map_err(read_err)?;
            let index = u64::from_be_bytes(k.as_ref().try_into().map_err(read_err)?);
            if !range.contains(&index) {
                break;
            }
            out.push(unseal(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.read_meta(PURGED)?;
        let last = match self.log.last().map_err(read_err)? {
            Some((_, v)) => Some(unseal(&v)?.log_id),
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
        // Durability comes with the next fsync; losing it only costs a replay.
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
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&entry.log_id.index.to_be_bytes(), seal(&entry));
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.flusher.after_next_sync(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for kv in self.log.range(log_id.index.to_be_bytes()..) {
            batch.remove(kv.map_err(write_err)?.0);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.flusher.sync().await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.vote
            .insert(PURGED, rmp_serde::to_vec(&log_id).map_err(write_err)?)
            .map_err(write_err)?;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(..=log_id.index.to_be_bytes()) {
            batch.remove(kv.map_err(write_err)?.0);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        Ok(())
    }
}
