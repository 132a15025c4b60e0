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
use crate::types::{ChunkId, NodeId, ShardId};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use std::path::{Path, PathBuf};

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

    /// Present while a snapshot is being loaded into the tree.
    fn install_marker(&self) -> PathBuf {
        self.snapshots
            .join(format!("shard-{}.installing", self.shard))
    }

    /// Finishes a snapshot install that a crash interrupted, before
    /// anything reads the tree: it holds part of the old state and part of
    /// the new, so the (verified) snapshot file is loaded again.
    pub async fn finish_interrupted_install(&self) -> anyhow::Result<()> {
        let marker = self.install_marker();
        if !marker.exists() {
            return Ok(());
        }
        let (tree, current) = (self.state.tree.clone(), self.current_path());
        let chunks = tokio::task::spawn_blocking(move || load(&tree, &current, &marker)).await??;
        tracing::info!(shard = %self.shard, chunks = chunks.len(), "finished an interrupted snapshot install");
        for id in chunks {
            self.chunk_refs.name(id);
        }
        Ok(())
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

/// Bytes of pairs written to the tree in one batch while loading a
/// snapshot: a shard's state can be far larger than memory allows at once.
const LOAD_BATCH_BYTES: usize = 8 << 20;

/// Replaces the whole of `tree` with the snapshot file at `path`, batch by
/// batch, and returns the chunks it records. Not atomic, so `marker` says a
/// load is under way until it has finished and reached the disk; a replica
/// that finds the marker at start-up loads the same file again.
fn load(tree: &sled::Tree, path: &Path, marker: &Path) -> std::io::Result<Vec<ChunkId>> {
    let io = |e: sled::Error| std::io::Error::other(e.to_string());
    snapshot::write_small(marker, b"")?;
    tree.clear().map_err(io)?;
    let mut chunks = Vec::new();
    let mut batch = sled::Batch::default();
    let mut batched = 0;
    let meta = snapshot::read(std::fs::File::open(path)?, |k, v| {
        if let Some(id) = chunk_of_key(&k) {
            chunks.push(id);
        }
        batched += k.len() + v.len();
        batch.insert(k, v);
        if batched >= LOAD_BATCH_BYTES {
            tree.apply_batch(std::mem::take(&mut batch)).map_err(io)?;
            batched = 0;
        }
        Ok(())
    })?;
    batch.insert(APPLIED, encode(&meta.last_log_id));
    batch.insert(MEMBERSHIP, encode(&meta.last_membership));
    tree.apply_batch(batch).map_err(io)?;
    tree.flush().map_err(io)?;
    std::fs::remove_file(marker)?;
    Ok(chunks)
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
        let mut file = *snapshot;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(sm_err)?;
        file.sync_all().await.map_err(sm_err)?;
        drop(file);
        let received = self
            .receiving
            .take()
            .ok_or_else(|| sm_err("no snapshot was being received"))?;
        let (current, marker) = (self.current_path(), self.install_marker());
        let tree = self.state.tree.clone();
        let chunks = tokio::task::spawn_blocking(move || {
            // Nothing reaches the tree unless the whole file verified.
            snapshot::read(std::fs::File::open(&received)?, |_, _| Ok(()))?;
            std::fs::rename(&received, &current)?;
            std::fs::File::open(current.parent().unwrap_or(Path::new(".")))?.sync_all()?;
            load(&tree, &current, &marker)
        })
        .await
        .map_err(sm_err)?
        .map_err(sm_err)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loading_a_snapshot_replaces_the_tree_in_batches_and_clears_its_marker() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("sm/1").unwrap();
        tree.insert(b"old key", b"gone after the load".as_slice())
            .unwrap();

        // A source tree larger than one load batch, with one chunk record.
        let source = db.open_tree("source").unwrap();
        let chunk = ChunkId([7; 32]);
        source
            .insert(super::super::state::chunk_key(&chunk), b"10".as_slice())
            .unwrap();
        let value = vec![0xAB; 64 * 1024];
        for i in 0..300u32 {
            source
                .insert(format!("k{i:05}").as_bytes(), value.as_slice())
                .unwrap();
        }
        let meta = snapshot::Meta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 42)),
            last_membership: StoredMembership::default(),
            snapshot_id: "1-3-42".into(),
        };
        let path = dir.path().join("shard-1.snap");
        let pairs = source
            .iter()
            .map(|kv| kv.map_err(|e| std::io::Error::other(e.to_string())));
        snapshot::write(&path, &meta, pairs).unwrap();

        let marker = dir.path().join("shard-1.installing");
        let chunks = load(&tree, &path, &marker).unwrap();
        assert_eq!(chunks, [chunk]);
        assert!(!marker.exists(), "the marker outlived the load");
        assert!(tree.get(b"old key").unwrap().is_none());
        assert_eq!(tree.get(b"k00299").unwrap().unwrap(), value.as_slice());
        let applied: Option<LogId<NodeId>> = decode(&tree.get(APPLIED).unwrap().unwrap()).unwrap();
        assert_eq!(applied, meta.last_log_id);
        // Every source pair plus the two bookkeeping keys.
        assert_eq!(tree.len(), source.len() + 2);
    }
}
