//! Replicating chunks: a chunk goes to every replica of its shard and
//! counts as stored once a majority have fsynced it; reads take the first
//! replica whose copy verifies.

use crate::chunk::{ChunkError, ChunkStore, Missing};
use crate::rpc::{error_of, pb};
use crate::shard::command::ChunkSpan;
use crate::shard::{Command, ShardError, ShardHost};
use crate::types::{ChunkId, ShardId};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Chunks a node copies from its peers at once while repairing.
const REPAIRS_AT_ONCE: usize = 4;

/// The chunk side of a node: local files plus the replicas of other nodes.
#[derive(Clone)]
pub struct Chunks {
    pub host: Arc<ShardHost>,
    pub store: Arc<ChunkStore>,
    /// Chunks the local replicas record but this node may not hold yet.
    pub missing: Arc<Missing>,
}

impl Chunks {
    fn client_for(&self, node: u64) -> Result<crate::rpc::NodeClient, ShardError> {
        let addr = self
            .host
            .addr_of(node)
            .ok_or_else(|| ShardError::Internal(format!("unknown node {node}")))?;
        self.host.pool().client(addr)
    }

    /// Writes `data` to every holder of its shard (voters and a joining
    /// learner); returns once a majority of the voters has it on disk.
    /// Slower holders finish in the background.
    pub async fn replicate(&self, data: Bytes) -> Result<ChunkId, ShardError> {
        let id = ChunkId::of(&data);
        let layout = self.host.layout();
        let shard = layout.shard_for_chunk(&id);
        let voters = layout.replicas(shard);
        let needed = voters.len() / 2 + 1;
        let mut writes: FuturesUnordered<_> = layout
            .holders(shard)
            .into_iter()
            .map(|node| {
                let this = self.clone();
                let data = data.clone();
                let write = tokio::spawn(async move { this.put_on(node, id, data).await });
                async move { (node, write.await) }
            })
            .collect();
        let (mut ok, mut failed, mut full) = (0, Vec::new(), None);
        while let Some((node, r)) = writes.next().await {
            let voter = voters.contains(&node);
            match r
                .map_err(|e| ShardError::Internal(e.to_string()))
                .and_then(|r| r)
            {
                Ok(()) if voter => ok += 1,
                Ok(()) => {}
                Err(e) if voter => {
                    if let ShardError::InsufficientStorage(why) = &e {
                        full = Some(why.clone());
                    }
                    failed.push(e.to_string());
                }
                Err(_) => {}
            }
            if ok >= needed {
                return Ok(id);
            }
            if failed.len() > voters.len() - needed {
                break;
            }
        }
        let why = format!(
            "chunk stored on {ok} of {} replicas: {}",
            voters.len(),
            failed.join("; ")
        );
        // A full disk does not clear up with a retry: say so.
        Err(match full {
            Some(_) => ShardError::InsufficientStorage(why),
            None => ShardError::Unavailable(why),
        })
    }

    async fn put_on(&self, node: u64, id: ChunkId, data: Bytes) -> Result<(), ShardError> {
        if node == self.host.id {
            return self
                .store
                .put_verified(id, data)
                .await
                .map_err(|e| match e {
                    ChunkError::NoSpace(why) => ShardError::InsufficientStorage(why),
                    e => ShardError::Unavailable(e.to_string()),
                });
        }
        let mut client = self.client_for(node)?;
        let msg = pb::Chunk {
            id: Bytes::copy_from_slice(&id.0),
            data,
        };
        match tokio::time::timeout(Duration::from_secs(30), client.put_chunk(msg)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(error_of(&s)),
            Err(_) => Err(ShardError::Unavailable(format!("node {node} timed out"))),
        }
    }

    /// Records chunks in their shards' logs, so replicas that missed the
    /// write learn about them and fetch them.
    pub async fn record(&self, spans: &[ChunkSpan]) -> Result<(), ShardError> {
        let mut by_shard: BTreeMap<ShardId, Vec<(ChunkId, u64)>> = BTreeMap::new();
        for s in spans {
            by_shard
                .entry(self.host.layout().shard_for_chunk(&s.id))
                .or_default()
                .push((s.id, s.len));
        }
        let proposals = by_shard.into_iter().map(|(shard, chunks)| {
            let host = self.host.clone();
            async move { host.propose(shard, &Command::AddChunks { chunks }).await }
        });
        for r in futures::future::join_all(proposals).await {
            r?;
        }
        Ok(())
    }

    /// Reads a chunk from the first replica whose copy verifies, this node
    /// first.
    pub async fn fetch(&self, id: ChunkId) -> Result<Bytes, ShardError> {
        let layout = self.host.layout();
        let mut members = layout.holders(layout.shard_for_chunk(&id));
        members.sort_by_key(|n| *n != self.host.id);
        let mut errors = Vec::new();
        for node in members {
            match self.get_from(node, id).await {
                Ok(Some(data)) => return Ok(data),
                Ok(None) => errors.push(format!("node {node}: missing")),
                Err(e) => errors.push(format!("node {node}: {e}")),
            }
        }
        Err(ShardError::Unavailable(format!(
            "chunk {} unreadable on every replica ({})",
            id.to_hex(),
            errors.join("; ")
        )))
    }

    async fn get_from(&self, node: u64, id: ChunkId) -> Result<Option<Bytes>, ShardError> {
        if node == self.host.id {
            return self
                .store
                .get_verified(id)
                .await
                .map_err(|e| ShardError::Unavailable(e.to_string()));
        }
        let mut client = self.client_for(node)?;
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            client.get_chunk(pb::ChunkRef {
                id: Bytes::copy_from_slice(&id.0),
            }),
        )
        .await
        .map_err(|_| ShardError::Unavailable(format!("node {node} timed out")))?;
        match reply {
            Ok(r) => {
                let data = r.into_inner().data;
                // Never trust a peer: the name is the hash.
                Ok((ChunkId::of(&data) == id).then_some(data))
            }
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(error_of(&s)),
        }
    }

    /// How many of the chunks this node's replica of `shard` records are on
    /// disk; `None` if it has no replica of the shard.
    pub fn count_in(&self, shard: ShardId) -> Option<pb::ShardChunkCount> {
        let mut count = pb::ShardChunkCount::default();
        let recorded = match self.host.recorded_chunks_of(shard)? {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%shard, "counting recorded chunks: {e}");
                return None;
            }
        };
        for (id, len) in recorded {
            count.recorded += 1;
            count.recorded_bytes += len;
            if !self.store.contains(&id) {
                count.missing += 1;
                count.missing_bytes += len;
            }
        }
        Some(count)
    }

    /// Names every recorded chunk this node lacks, so the repair task
    /// fetches it: a node killed between applying a record and fetching
    /// its chunk would otherwise never learn of it again.
    fn audit(&self) -> Result<usize, ShardError> {
        let recorded = self.host.recorded_chunks()?;
        Ok(recorded
            .into_iter()
            .filter(|id| self.missing.name(*id))
            .count())
    }

    /// Fetches chunks this node should hold but does not, after auditing
    /// what the local replicas record, from the other replicas of their
    /// shards.
    pub async fn repair(self) {
        let audit = self.clone();
        match tokio::task::spawn_blocking(move || audit.audit()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(named)) => tracing::info!(named, "start-up audit found chunks to repair"),
            Ok(Err(e)) => tracing::error!("start-up chunk audit failed: {e}"),
            Err(e) => tracing::error!("start-up chunk audit failed: {e}"),
        }
        // A few copies at once: each waits mostly on a peer and an fsync.
        // The set is dropped with this task, which aborts the copies too.
        let mut copies = tokio::task::JoinSet::new();
        loop {
            while copies.len() >= REPAIRS_AT_ONCE {
                copies.join_next().await;
            }
            let id = self.missing.next().await;
            let this = self.clone();
            copies.spawn(async move {
                if this.store.contains(&id) || this.copy_from_peers(id).await {
                    this.missing.done(id);
                } else {
                    let attempts = this.missing.retry(id);
                    tracing::warn!(chunk = %id.to_hex(), attempts, "no replica could give a missing chunk yet");
                }
            });
            // Reap finished copies so the set does not grow.
            while copies.try_join_next().is_some() {}
        }
    }

    /// Copies one chunk from the first other replica whose copy verifies.
    async fn copy_from_peers(&self, id: ChunkId) -> bool {
        let layout = self.host.layout();
        let members = layout.holders(layout.shard_for_chunk(&id));
        for node in members.into_iter().filter(|n| *n != self.host.id) {
            if let Ok(Some(data)) = self.get_from(node, id).await {
                match self.store.put_verified(id, data).await {
                    Ok(()) => return true,
                    Err(e) => tracing::warn!(chunk = %id.to_hex(), "repair write failed: {e}"),
                }
            }
        }
        false
    }
}
