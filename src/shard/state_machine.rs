//! openraft's view of a shard's state: applying committed entries to the
//! `sm/<shard>` tree, and building and installing snapshots of it.
//!
//! Each entry's writes and the new "last applied" id go into one sled batch,
//! so after a crash the tree is exactly the state after some entry and
//! openraft replays the rest from the log. Snapshots are built from the live
//! tree after an fsync, which is what makes purging the log behind them safe.

// openraft's trait methods return its large StorageError; ours match them.
#![allow(clippy::result_large_err)]

use super::command::{decode, encode, Command, Reply, Value};
use super::state::{chunk_of_key, State};
use super::TypeConfig;
use crate::types::{ChunkId, NodeId, ShardId};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use std::io::Cursor;
use std::time::Instant;
use tokio::sync::mpsc;

/// Where a state machine reports the chunks it learns of, and when.
pub type ChunkRefs = mpsc::UnboundedSender<(ChunkId, Instant)>;

type StorageResult<T> = Result<T, StorageError<NodeId>>;
/// The last applied log id and the membership it implies.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

/// Keys of openraft's own bookkeeping; 0xFF never starts a data key.
const APPLIED: &[u8] = b"\xffapplied";
const MEMBERSHIP: &[u8] = b"\xffmembership";

fn sm_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

/// The serialized form of a snapshot: every data key and value of the tree.
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotBody {
    pairs: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
}

/// One shard's state machine.
pub struct StateMachine {
    shard: ShardId,
    state: State,
    flusher: super::log_store::Flusher,
    /// Chunks this replica was told about but may not hold yet; the node's
    /// repair task fetches the missing ones from other replicas.
    chunk_refs: ChunkRefs,
}

impl StateMachine {
    pub fn new(
        shard: ShardId,
        state: State,
        flusher: super::log_store::Flusher,
        chunk_refs: ChunkRefs,
    ) -> StateMachine {
        StateMachine {
            shard,
            state,
            flusher,
            chunk_refs,
        }
    }

    fn read<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> StorageResult<Option<T>> {
        match self.state.tree.get(k).map_err(sm_err)? {
            Some(v) => Ok(Some(decode(&v).map_err(sm_err)?)),
            None => Ok(None),
        }
    }

    fn applied(&self) -> StorageResult<AppliedState> {
        Ok((
            self.read(APPLIED)?,
            self.read(MEMBERSHIP)?.unwrap_or_default(),
        ))
    }

    fn snapshot_now(&self) -> StorageResult<Snapshot<TypeConfig>> {
        let (last_applied, membership) = self.applied()?;
        let mut pairs = Vec::new();
        for kv in self.state.tree.range(..&[0xFFu8][..]) {
            let (k, v) = kv.map_err(sm_err)?;
            pairs.push((k.to_vec().into(), v.to_vec().into()));
        }
        let data = encode(&SnapshotBody { pairs });
        let id = match last_applied {
            Some(l) => format!("{}-{}-{}", self.shard, l.leader_id.term, l.index),
            None => format!("{}-empty", self.shard),
        };
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: last_applied,
                last_membership: membership,
                snapshot_id: id,
            },
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // The log is purged behind the snapshot: the state must be on disk.
        self.flusher.sync().await.map_err(sm_err)?;
        self.snapshot_now()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> StorageResult<AppliedState> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Reply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        for entry in entries {
            let mut batch = sled::Batch::default();
            let reply = match &entry.payload {
                EntryPayload::Blank => Ok(Value::Done),
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                    batch.insert(MEMBERSHIP, encode(&stored));
                    Ok(Value::Done)
                }
                EntryPayload::Normal(cmd) => {
                    let reply = self.state.apply(cmd, &mut batch);
                    match &reply {
                        Err(e) if !e.is_deterministic() => {
                            // Replicas must never diverge: stop this one.
                            return Err(sm_err(format!("applying {}: {e}", entry.log_id)));
                        }
                        Err(_) => batch = sled::Batch::default(),
                        Ok(_) => {
                            if let Command::AddChunks { chunks } = cmd {
                                for (id, _) in chunks {
                                    let _ = self.chunk_refs.send((*id, Instant::now()));
                                }
                            }
                        }
                    }
                    reply
                }
            };
            // The applied marker goes last in the same atomic batch.
            batch.insert(APPLIED, encode(&Some(entry.log_id)));
            self.state.tree.apply_batch(batch).map_err(sm_err)?;
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachine {
            shard: self.shard,
            state: self.state.clone(),
            flusher: self.flusher.clone(),
            chunk_refs: self.chunk_refs.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let body: SnapshotBody = decode(snapshot.get_ref()).map_err(sm_err)?;
        let mut batch = sled::Batch::default();
        for kv in self.state.tree.iter() {
            batch.remove(kv.map_err(sm_err)?.0);
        }
        for (k, v) in &body.pairs {
            batch.insert(k.as_slice(), v.as_slice());
        }
        batch.insert(APPLIED, encode(&meta.last_log_id));
        batch.insert(MEMBERSHIP, encode(&meta.last_membership));
        self.state.tree.apply_batch(batch).map_err(sm_err)?;
        self.flusher.sync().await.map_err(sm_err)?;
        for (k, _) in &body.pairs {
            if let Some(id) = chunk_of_key(k) {
                let _ = self.chunk_refs.send((id, Instant::now()));
            }
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        // The live state is always a valid snapshot of itself.
        let (applied, _) = self.applied()?;
        if applied.is_none() {
            return Ok(None);
        }
        self.flusher.sync().await.map_err(sm_err)?;
        self.snapshot_now().map(Some)
    }
}
