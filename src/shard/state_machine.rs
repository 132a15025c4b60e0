//! openraft's view of a shard's state: applying committed entries to the
//! shard's `sm/<shard>` space, and building and installing snapshots of it.
//!
//! Each entry's writes and the new "last applied" id go into one atomic
//! store write, so after a crash the space is exactly the state after some
//! entry and openraft replays the rest from the log. The space is its own
//! snapshot: a "build" is a persist plus a checkpoint note, which is what
//! makes purging the log behind it safe; the space is written out as a file
//! (see [`snapshot`]) only when a lagging follower needs one.

// openraft's trait methods return its large StorageError; ours match them.
#![allow(clippy::result_large_err)]

use super::command::{decode, encode, Command, Reply, Value};
use super::snapshot;
use super::state::{chunk_of_key, State};
use super::TypeConfig;
use crate::store::{Batch, Reader, Store, StoreError, Writer};
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

/// Entries applied in one store write: bounded, as replaying a long log
/// after a restart hands the state machine thousands at once.
const APPLY_BATCH_BYTES: usize = 8 << 20;

fn sm_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

/// The store space of `shard`'s state machine.
pub fn space_of(shard: ShardId) -> String {
    format!("sm/{shard}")
}

/// One shard's state machine.
pub struct StateMachine {
    shard: ShardId,
    store: Store,
    space: String,
    flusher: super::flusher::Flusher,
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
        store: Store,
        flusher: super::flusher::Flusher,
        chunk_refs: ChunkRefs,
        snapshots: PathBuf,
    ) -> StateMachine {
        StateMachine {
            shard,
            space: space_of(shard),
            store,
            flusher,
            chunk_refs,
            snapshots,
            receiving: None,
            started: false,
        }
    }

    async fn applied(&self) -> StorageResult<AppliedState> {
        let space = self.space.clone();
        self.store
            .blocking(move |s| Ok(applied_state(&*s.read(&space)?)))
            .await
            .map_err(sm_err)?
    }

    fn current_path(&self) -> PathBuf {
        snapshot::current_path(&self.snapshots, self.shard)
    }

    /// Present while a snapshot is being loaded into the space.
    fn install_marker(&self) -> PathBuf {
        self.snapshots
            .join(format!("shard-{}.installing", self.shard))
    }

    /// Finishes a snapshot install that a crash interrupted, before
    /// anything reads the space: it holds part of the old state and part of
    /// the new, so the (verified) snapshot file is loaded again.
    /// Without an install to finish, removes the snapshot files a crash
    /// left behind: one written for a follower, or one half received.
    pub async fn finish_interrupted_install(&self) -> anyhow::Result<()> {
        let marker = self.install_marker();
        if !marker.exists() {
            for stale in [self.current_path(), self.receiving_path()] {
                remove_if_present(&stale)?;
            }
            return Ok(());
        }
        let (space, current) = (self.space.clone(), self.current_path());
        let chunks = self
            .store
            .blocking(move |s| Ok(load(s, &space, &current, &marker)))
            .await??;
        tracing::info!(shard = %self.shard, chunks = chunks.len(), "finished an interrupted snapshot install");
        for id in chunks {
            self.chunk_refs.name(id);
        }
        Ok(())
    }

    fn receiving_path(&self) -> PathBuf {
        self.snapshots
            .join(format!("shard-{}.receiving", self.shard))
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.snapshots
            .join(format!("shard-{}.checkpoint", self.shard))
    }

    async fn meta_now(&self) -> StorageResult<snapshot::Meta> {
        let (last_applied, membership) = self.applied().await?;
        Ok(self.meta_of(last_applied, membership))
    }

    fn meta_of(
        &self,
        last_applied: Option<LogId<NodeId>>,
        membership: StoredMembership<NodeId, BasicNode>,
    ) -> snapshot::Meta {
        snapshot::Meta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id: match last_applied {
                Some(l) => format!("{}-{}-{}", self.shard, l.leader_id.term, l.index),
                None => format!("{}-empty", self.shard),
            },
        }
    }

    /// A checkpoint: the space itself is the snapshot once it is on disk,
    /// so "building" one is a persist and a note of how far it reaches.
    /// Only a follower that needs a snapshot gets it written out as a file.
    async fn checkpoint(&self) -> StorageResult<snapshot::Meta> {
        self.flusher.sync_all().await.map_err(sm_err)?;
        let meta = self.meta_now().await?;
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
    /// meanwhile, and reads one store snapshot, so the file is one
    /// consistent point of the log.
    async fn write_snapshot(&self) -> StorageResult<snapshot::Meta> {
        let (space, path) = (self.space.clone(), self.current_path());
        let (last_applied, membership) = self
            .store
            .blocking(move |s| {
                let r = s.read(&space)?;
                let applied = applied_state(&*r).map_err(StoreError::of)?;
                let meta = snapshot::Meta {
                    last_log_id: applied.0,
                    last_membership: applied.1.clone(),
                    snapshot_id: String::new(),
                };
                let pairs = r
                    .range(b"", Some(b"\xff"))?
                    .map(|kv| kv.map_err(std::io::Error::from));
                snapshot::write(&path, &meta, pairs).map_err(StoreError::of)?;
                Ok(applied)
            })
            .await
            .map_err(sm_err)?;
        Ok(self.meta_of(last_applied, membership))
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The applied id and membership recorded in a state-machine space.
fn applied_state(r: &dyn Reader) -> StorageResult<AppliedState> {
    let applied = match r.get(APPLIED).map_err(sm_err)? {
        Some(v) => decode(&v).map_err(sm_err)?,
        None => None,
    };
    let membership = match r.get(MEMBERSHIP).map_err(sm_err)? {
        Some(v) => decode(&v).map_err(sm_err)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// Bytes of pairs written to the space in one batch while loading a
/// snapshot: a shard's state can be far larger than memory allows at once.
const LOAD_BATCH_BYTES: usize = 8 << 20;

/// Replaces the whole of `space` with the snapshot file at `path`, batch by
/// batch, and returns the chunks it records. Not atomic, so `marker` says a
/// load is under way until it has finished and reached the disk; a replica
/// that finds the marker at start-up loads the same file again.
fn load(store: &Store, space: &str, path: &Path, marker: &Path) -> std::io::Result<Vec<ChunkId>> {
    snapshot::write_small(marker, b"")?;
    store.remove_space(space)?;
    let mut chunks = Vec::new();
    let mut batch = Batch::default();
    let meta = snapshot::read(std::fs::File::open(path)?, |k, v| {
        if let Some(id) = chunk_of_key(&k) {
            chunks.push(id);
        }
        batch.insert(k, v);
        if batch.bytes() >= LOAD_BATCH_BYTES {
            store.apply(space, std::mem::take(&mut batch))?;
        }
        Ok(())
    })?;
    batch.insert(APPLIED, encode(&meta.last_log_id));
    batch.insert(MEMBERSHIP, encode(&meta.last_membership));
    store.apply(space, batch)?;
    store.persist()?;
    std::fs::remove_file(marker)?;
    Ok(chunks)
}

/// What applying a run of entries produced.
struct Applied {
    replies: Vec<Reply>,
    /// Chunks named by `AddChunks` entries, for the repair task.
    chunks: Vec<ChunkId>,
    /// Chunks `DropChunks` entries dropped, whose files go.
    dropped: Vec<ChunkId>,
}

/// Applies `entries` to `space` in store writes of at most
/// [`APPLY_BATCH_BYTES`]; each write carries its last entry's id as the
/// applied mark.
fn apply_entries(
    store: &Store,
    space: &str,
    entries: Vec<Entry<TypeConfig>>,
) -> crate::store::Result<Applied> {
    let mut out = Applied {
        replies: Vec::with_capacity(entries.len()),
        chunks: Vec::new(),
        dropped: Vec::new(),
    };
    let mut entries = entries.into_iter().peekable();
    while entries.peek().is_some() {
        store.write(space, |w| {
            let mut written = 0;
            while let Some(entry) = entries.next_if(|_| written < APPLY_BATCH_BYTES) {
                written += apply_one(w, &entry, &mut out)?;
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// Applies one entry inside a store write; returns the bytes it wrote. A
/// failure that is not deterministic fails the write: replicas must never
/// diverge, so the replica stops rather than skip the entry.
fn apply_one(
    w: &mut dyn Writer,
    entry: &Entry<TypeConfig>,
    out: &mut Applied,
) -> crate::store::Result<usize> {
    let mut batch = Batch::default();
    let reply = match &entry.payload {
        EntryPayload::Blank => Ok(Value::Done),
        EntryPayload::Membership(m) => {
            let stored = StoredMembership::new(Some(entry.log_id), m.clone());
            batch.insert(MEMBERSHIP, encode(&stored));
            Ok(Value::Done)
        }
        EntryPayload::Normal(cmd) => {
            let reply = State::new(w).apply_once(cmd, &mut batch);
            match &reply {
                Err(e) if !e.is_deterministic() => {
                    return Err(StoreError(format!("applying {}: {e}", entry.log_id)));
                }
                Err(_) => {}
                Ok(Value::Dropped(dropped)) => {
                    out.dropped.extend(dropped.iter().map(|(id, _)| *id));
                }
                Ok(_) => {
                    if let Command::AddChunks { chunks, .. } = cmd {
                        out.chunks.extend(chunks.iter().map(|(id, _)| *id));
                    }
                }
            }
            reply
        }
    };
    // The applied mark goes last in the same atomic write.
    batch.insert(APPLIED, encode(&Some(entry.log_id)));
    let bytes = batch.bytes();
    w.apply(batch)?;
    out.replies.push(reply);
    Ok(bytes)
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
        self.applied().await
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Reply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let space = self.space.clone();
        let applied = self
            .store
            .blocking(move |s| apply_entries(s, &space, entries))
            .await
            .map_err(sm_err)?;
        for id in applied.chunks {
            self.chunk_refs.name(id);
        }
        if !applied.dropped.is_empty() {
            // The entries are committed: replaying them after a crash
            // drops the same chunks, so the files may go now.
            let missing = self.chunk_refs.clone();
            let unlink = move || {
                applied
                    .dropped
                    .into_iter()
                    .for_each(|id| missing.collected(id))
            };
            tokio::task::spawn_blocking(unlink).await.map_err(sm_err)?;
        }
        Ok(applied.replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Builder {
            path: self.checkpoint_path(),
            written: self.checkpoint().await.map_err(|e| e.to_string()),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let path = self.receiving_path();
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
        let space = self.space.clone();
        let chunks = self
            .store
            .blocking(move |s| {
                // Nothing reaches the space unless the whole file verified.
                let loaded = (|| {
                    snapshot::read(std::fs::File::open(&received)?, |_, _| Ok(()))?;
                    std::fs::rename(&received, &current)?;
                    std::fs::File::open(current.parent().unwrap_or(Path::new(".")))?.sync_all()?;
                    load(s, &space, &current, &marker)
                })();
                Ok(loaded)
            })
            .await
            .map_err(sm_err)?
            .map_err(sm_err)?;
        self.checkpoint().await?;
        // Loaded and checkpointed: nothing reads the file again.
        remove_if_present(&self.current_path()).map_err(sm_err)?;
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
        if self.applied().await?.0.is_none() {
            return Ok(None);
        }
        let meta = self.write_snapshot().await?;
        let file = tokio::fs::File::open(self.current_path())
            .await
            .map_err(sm_err)?;
        // The open file is all openraft reads: unlinked now, its space
        // comes back once the snapshot is sent.
        remove_if_present(&self.current_path()).map_err(sm_err)?;
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
    fn loading_a_snapshot_replaces_the_space_in_batches_and_clears_its_marker() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb"), 1 << 20).unwrap();
        let mut old = Batch::default();
        old.insert(b"old key".to_vec(), b"gone after the load".to_vec());
        store.apply("sm/1", old).unwrap();

        // A source larger than one load batch, with one chunk record.
        let chunk = ChunkId([7; 32]);
        let value = vec![0xAB; 64 * 1024];
        let mut pairs = vec![(super::super::state::chunk_key(&chunk), b"10".to_vec())];
        for i in 0..300u32 {
            pairs.push((format!("k{i:05}").into_bytes(), value.clone()));
        }
        let meta = snapshot::Meta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 42)),
            last_membership: StoredMembership::default(),
            snapshot_id: "1-3-42".into(),
        };
        let path = dir.path().join("shard-1.snap");
        snapshot::write(&path, &meta, pairs.clone().into_iter().map(Ok)).unwrap();

        let marker = dir.path().join("shard-1.installing");
        let chunks = load(&store, "sm/1", &path, &marker).unwrap();
        assert_eq!(chunks, [chunk]);
        assert!(!marker.exists(), "the marker outlived the load");
        assert!(store.get("sm/1", b"old key").unwrap().is_none());
        assert_eq!(store.get("sm/1", b"k00299").unwrap().unwrap(), value);
        let r = store.read("sm/1").unwrap();
        let (applied, _) = applied_state(&*r).unwrap();
        assert_eq!(applied, meta.last_log_id);
        // Every source pair plus the two bookkeeping keys.
        assert_eq!(r.range(b"", None).unwrap().count(), pairs.len() + 2);
    }
}
