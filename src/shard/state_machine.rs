//! openraft's view of a shard's state: applying committed entries to the
//! `sm/<shard>` tree, and building and installing snapshots of it.
//!
//! Each entry's writes and the new "last applied" id go into one sled batch,
//! so after a crash the tree is exactly the state after some entry and
//! openraft replays the rest from the log. The tree is its own snapshot: a
//! "build" is an fsync plus a checkpoint note, which is what makes purging
//! the log behind it safe; the tree is written out as a file (see
//! [`snapshot`]) only when a lagging follower needs one.

// openraft's trait methods return its large StorageError; ours match them.
#![allow(clippy::result_large_err)]

use super::command::{decode, encode, Command, Reply, Value};
use super::snapshot;
use super::state::{chunk_of_key, State};
use super::TypeConfig;
use crate::types::{NodeId, ShardId};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use std::path::PathBuf;

/// Where a state machine reports the chunks its replica should hold.
pub type ChunkRefs = std::sync::Arc<crate::chunk::Missing>;

type StorageResult<T> = Result<T, StorageError<NodeId>>;
/// The last applied log id and the membership it implies.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

/// Keys of openraft's own bookkeeping; 0xFF never starts a data key.
const APPLIED: &[u8] = b"\xffapplied";
const MEMBERSHIP: &[u8] = b"\xffmembership";

fn sm_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

/// One shard's state machine.
pub struct StateMachine {
    shard: ShardId,
    state: State,
    flusher: super::log_store::Flusher,
    /// Chunks this replica was told about but may not hold yet; the node's
    /// repair task fetches the missing ones from other replicas.
    chunk_refs: ChunkRefs,
    /// Where this node keeps snapshot files.
    snapshots: PathBuf,
    /// The file a snapshot from the leader is being received into.
    receiving: Option<PathBuf>,
    /// False until openraft's start-up has read the checkpoint.
    started: bool,
}

impl StateMachine {
    pub fn new(
        shard: ShardId,
        state: State,
        flusher: super::log_store::Flusher,
        chunk_refs: ChunkRefs,
        snapshots: PathBuf,
    ) -> StateMachine {
        StateMachine {
            shard,
            state,
            flusher,
            chunk_refs,
            snapshots,
            receiving: None,
            started: false,
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

    fn current_path(&self) -> PathBuf {
        snapshot::current_path(&self.snapshots, self.shard)
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.snapshots
            .join(format!("shard-{}.checkpoint", self.shard))
    }

    fn meta_now(&self) -> StorageResult<snapshot::Meta> {
        let (last_applied, membership) = self.applied()?;
        Ok(snapshot::Meta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id: match last_applied {
                Some(l) => format!("{}-{}-{}", self.shard, l.leader_id.term, l.index),
                None => format!("{}-empty", self.shard),
            },
        })
    }

    /// A checkpoint: the tree itself is the snapshot once it is on disk, so
    /// "building" one is an fsync and a note of how far it reaches. Only a
    /// follower that needs a snapshot gets the tree written out as a file.
    async fn checkpoint(&self) -> StorageResult<snapshot::Meta> {
        self.flusher.sync().await.map_err(sm_err)?;
        let meta = self.meta_now()?;
        let path = self.checkpoint_path();
        let bytes = encode(&meta);
        tokio::task::spawn_blocking(move || snapshot::write_small(&path, &bytes))
            .await
            .map_err(sm_err)?
            .map_err(sm_err)?;
        Ok(meta)
    }

    /// Writes the state as it is now to the shard's snapshot file. Runs
    /// while openraft holds the state machine, so no entry is applied
    /// meanwhile and the file is one consistent point of the log.
    async fn write_snapshot(&self) -> StorageResult<snapshot::Meta> {
        self.flusher.sync().await.map_err(sm_err)?;
        let meta = self.meta_now()?;
        let (tree, path, m) = (self.state.tree.clone(), self.current_path(), meta.clone());
        tokio::task::spawn_blocking(move || {
            let pairs = tree
                .range(..&[0xFFu8][..])
                .map(|kv| kv.map_err(|e| std::io::Error::other(e.to_string())));
            snapshot::write(&path, &m, pairs)
        })
        .await
        .map_err(sm_err)?
        .map_err(sm_err)?;
        Ok(meta)
    }
}

/// Hands openraft the checkpoint taken when it asked for a builder.
/// openraft keeps only the meta of a snapshot it built; the data handle is
/// the checkpoint file and is never sent.
pub struct Builder {
    path: PathBuf,
    written: Result<snapshot::Meta, String>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let meta = self.written.clone().map_err(sm_err)?;
        let file = tokio::fs::File::open(&self.path).await.map_err(sm_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

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
                                    self.chunk_refs.name(*id);
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
        Builder {
            path: self.checkpoint_path(),
            written: self.checkpoint().await.map_err(|e| e.to_string()),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let path = self
            .snapshots
            .join(format!("shard-{}.receiving", self.shard));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(sm_err)?;
        self.receiving = Some(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        use std::io::Seek;
        let mut file = *snapshot;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(sm_err)?;
        let mut file = file.into_std().await;
        file.rewind().map_err(sm_err)?;
        let tree = self.state.tree.clone();
        // Old state out, new state in, one atomic batch; nothing is applied
        // unless the whole file verified.
        let (mut batch, chunks) = tokio::task::spawn_blocking(move || {
            let mut batch = sled::Batch::default();
            for kv in tree.iter() {
                batch.remove(kv.map_err(sm_err)?.0);
            }
            let mut chunks = Vec::new();
            snapshot::read(file, |k, v| {
                if let Some(id) = chunk_of_key(&k) {
                    chunks.push(id);
                }
                batch.insert(k, v);
            })
            .map_err(sm_err)?;
            Ok::<_, StorageError<NodeId>>((batch, chunks))
        })
        .await
        .map_err(sm_err)??;
        batch.insert(APPLIED, encode(&meta.last_log_id));
        batch.insert(MEMBERSHIP, encode(&meta.last_membership));
        self.state.tree.apply_batch(batch).map_err(sm_err)?;
        self.flusher.sync().await.map_err(sm_err)?;
        // The received file is now this replica's snapshot too.
        if let Some(path) = self.receiving.take() {
            std::fs::rename(&path, self.current_path()).map_err(sm_err)?;
        }
        self.checkpoint().await?;
        tracing::info!(
            shard = %self.shard,
            upto = ?meta.last_log_id,
            chunks = chunks.len(),
            "installed snapshot from the leader"
        );
        for id in chunks {
            self.chunk_refs.name(id);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        if !std::mem::replace(&mut self.started, true) {
            // Start-up only wants to know how far the last checkpoint reaches.
            let path = self.checkpoint_path();
            if !path.exists() {
                return Ok(None);
            }
            let meta: snapshot::Meta =
                decode(&std::fs::read(&path).map_err(sm_err)?).map_err(sm_err)?;
            let file = tokio::fs::File::open(&path).await.map_err(sm_err)?;
            return Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(file),
            }));
        }
        // A follower needs the state: write it out as it is now, which is
        // at least as far as any checkpoint the log was purged behind.
        if self.applied()?.0.is_none() {
            return Ok(None);
        }
        let meta = self.write_snapshot().await?;
        let file = tokio::fs::File::open(self.current_path())
            .await
            .map_err(sm_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}
