//! The Raft log and vote of one shard.
//!
//! Entries go to the node's shared [`SegmentLog`]; the vote, the purge point
//! and the committed id go to the shard's `vote/<shard>` store space. openraft
//! is told an append is durable only after the node's flusher has
//! fsynced the segment: one fsync covers every append that arrived from any
//! shard while the previous fsync ran (group commit). Entries carry a BLAKE3
//! checksum that is checked on every read, so a corrupt log is detected,
//! never replayed.

// openraft's trait methods return its large StorageError; ours match them.
#![allow(clippy::result_large_err)]

use super::flusher::Flusher;
use super::segment_log::SegmentLog;
use super::TypeConfig;
use crate::space::SpaceGuard;
use crate::store::{Batch, Store};
use crate::types::{NodeId, ShardId};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// One shard's log and vote.
#[derive(Clone)]
pub struct LogStore {
    shard: ShardId,
    log: Arc<SegmentLog>,
    /// The node's meta store, where the vote, last purged log id and
    /// committed log id live.
    store: Store,
    space: String,
    flusher: Flusher,
    /// The data disk's free space: appends wait while it is critical.
    disk: Arc<SpaceGuard>,
    /// Raised while an append waits for that space.
    held: AppendHeld,
    /// When the committed id was last written: it changes on every commit,
    /// and is worth at most one store write a second (see save_committed).
    committed_written: Option<std::time::Instant>,
}

/// Whether a replica's log append is waiting for room on a nearly full
/// disk. Its Raft core waits with the append: it sends no heartbeats and
/// answers nothing, so while it leads, calls must not wait on it (see
/// `ShardHost::propose_here`); its followers elect another leader.
#[derive(Clone)]
pub struct AppendHeld(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for AppendHeld {
    fn default() -> Self {
        AppendHeld(Arc::new(tokio::sync::watch::Sender::new(false)))
    }
}

impl AppendHeld {
    pub fn is_held(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once an append is held (at once if one is).
    pub async fn until_held(&self) {
        let mut held = self.0.subscribe();
        // An error means the log store is gone: then nothing will commit.
        let _ = held.wait_for(|h| *h).await;
    }

    fn set(&self, held: bool) {
        self.0.send_replace(held);
    }
}

/// How often the committed id is written to the store.
const COMMITTED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

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
    pub async fn open(
        store: &Store,
        log: Arc<SegmentLog>,
        shard: ShardId,
        flusher: Flusher,
        disk: Arc<SpaceGuard>,
        held: AppendHeld,
    ) -> anyhow::Result<LogStore> {
        let store = LogStore {
            shard,
            log,
            store: store.clone(),
            space: space_of(shard),
            flusher,
            disk,
            held,
            committed_written: None,
        };
        // Entries up to the purge point may still sit in older segments.
        if let Some(purged) = store.purged().await? {
            store.log.purge(shard, purged.index)?;
        }
        Ok(store)
    }

    async fn read_meta<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        k: &'static [u8],
    ) -> StorageResult<Option<T>> {
        let space = self.space.clone();
        let value = self
            .store
            .blocking(move |s| s.get(&space, k))
            .await
            .map_err(read_err)?;
        value
            .map(|v| crate::shard::command::from_msgpack(&v).map_err(read_err))
            .transpose()
    }

    /// Sets `k` in the shard's space; durable only after the next sync.
    async fn write_meta(&self, k: &'static [u8], value: Vec<u8>) -> crate::store::Result<()> {
        let space = self.space.clone();
        self.store
            .blocking(move |s| {
                let mut b = Batch::default();
                b.insert(k, value);
                s.apply(&space, b)
            })
            .await
    }

    /// Runs `f` on the segment log from tokio's blocking pool: a write can
    /// wait on the disk (dirty-page throttling, a full or failing disk),
    /// and a runtime worker must not.
    async fn on_log<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SegmentLog) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || f(&log))
            .await
            .map_err(std::io::Error::other)?
    }

    async fn purged(&self) -> StorageResult<Option<LogId<NodeId>>> {
        self.read_meta(PURGED).await
    }
}

/// The store space of `shard`'s vote, purge point and committed id.
pub fn space_of(shard: ShardId) -> String {
    format!("vote/{shard}")
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
        let shard = self.shard;
        let payloads = self
            .on_log(move |log| log.read(shard, from, to))
            .await
            .map_err(read_err)?;
        payloads.iter().map(|p| decode_entry(p)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged = self.purged().await?;
        let shard = self.shard;
        let last_entry = self
            .on_log(move |log| log.last(shard))
            .await
            .map_err(read_err)?;
        let last = match last_entry {
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
        let bytes = rmp_serde::to_vec(vote).map_err(vote_err)?;
        self.write_meta(VOTE, bytes).await.map_err(vote_err)?;
        self.flusher.sync_meta().await.map_err(vote_err)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.read_meta(VOTE).await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Only an optimisation: after a restart it lets a replica apply what
        // it knew was committed before hearing from a leader. Durability
        // comes with a later fsync, and an older value only costs a replay,
        // so it is written at most once a second, not on every commit.
        if self
            .committed_written
            .is_some_and(|at| at.elapsed() < COMMITTED_EVERY)
        {
            return Ok(());
        }
        let bytes = rmp_serde::to_vec(&committed).map_err(write_err)?;
        self.write_meta(COMMITTED, bytes).await.map_err(write_err)?;
        self.committed_written = Some(std::time::Instant::now());
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let committed = self
            .read_meta::<Option<LogId<NodeId>>>(COMMITTED)
            .await?
            .flatten();
        // The committed id reaches the disk with whatever persist comes
        // next, which may be before the log's fsync of the entries it names
        // (a checkpoint of another shard, say). Entries the log does have
        // up to it were committed, so the log's end is as far as it holds.
        let last = self.get_log_state().await?.last_log_id;
        Ok(match (committed, last) {
            (Some(c), Some(l)) if c.index > l.index => Some(l),
            (Some(_), None) => None,
            (c, _) => c,
        })
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
        // On a nearly full disk the replica falls behind rather than fail:
        // a failed append would stop it for good.
        if self.disk.is_critical() {
            self.held.set(true);
            self.disk.wait_for_room().await;
            self.held.set(false);
        }
        let shard = self.shard;
        self.on_log(move |log| log.append(shard, &encoded))
            .await
            .map_err(write_err)?;
        self.flusher.after_next_sync(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let shard = self.shard;
        self.on_log(move |log| log.truncate(shard, log_id.index))
            .await
            .map_err(write_err)?;
        self.flusher.sync_log().await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // The purge point is durable before any segment is deleted.
        let bytes = rmp_serde::to_vec(&log_id).map_err(write_err)?;
        self.write_meta(PURGED, bytes).await.map_err(write_err)?;
        self.flusher.sync_meta().await.map_err(write_err)?;
        let shard = self.shard;
        self.on_log(move |log| log.purge(shard, log_id.index))
            .await
            .map_err(write_err)
    }
}
