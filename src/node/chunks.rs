//! Replicating chunks: a chunk goes to every replica of its shard and
//! counts as stored once a majority have fsynced it; reads take the first
//! replica whose copy verifies.

use crate::chunk::ChunkStore;
use crate::rpc::{error_of, pb};
use crate::shard::command::ChunkSpan;
use crate::shard::{Command, ShardError, ShardHost};
use crate::types::{ChunkId, ShardId};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The chunk side of a node: local files plus the replicas of other nodes.
#[derive(Clone)]
pub struct Chunks {
    pub host: Arc<ShardHost>,
    pub store: Arc<ChunkStore>,
}

impl Chunks {
    fn client_for(&self, node: u64) -> Result<crate::rpc::NodeClient, ShardError> {
        let addr = self
            .host
            .addr_of(node)
            .ok_or_else(|| ShardError::Internal(format!("unknown node {node}")))?;
        self.host.pool().client(addr)
    }

    /// Writes `data` to every replica of its shard; returns once a majority
    /// has it on disk. Slower replicas finish in the background.
    pub async fn replicate(&self, data: Bytes) -> Result<ChunkId, ShardError> {
        let id = ChunkId::of(&data);
        let members = self
            .host
            .layout
            .replicas(self.host.layout.shard_for_chunk(&id));
        let needed = members.len() / 2 + 1;
        let mut writes: FuturesUnordered<_> = members
            .iter()
            .map(|&node| {
                let this = self.clone();
                let data = data.clone();
                tokio::spawn(async move { this.put_on(node, id, data).await })
            })
            .collect();
        let (mut ok, mut failed) = (0, Vec::new());
        while let Some(r) = writes.next().await {
            match r
                .map_err(|e| ShardError::Internal(e.to_string()))
                .and_then(|r| r)
            {
                Ok(()) => ok += 1,
                Err(e) => failed.push(e.to_string()),
            }
            if ok >= needed {
                return Ok(id);
            }
            if failed.len() > members.len() - needed {
                break;
            }
        }
        Err(ShardError::Unavailable(format!(
            "chunk stored on {ok} of {} replicas: {}",
            members.len(),
            failed.join("; ")
        )))
    }

    async fn put_on(&self, node: u64, id: ChunkId, data: Bytes) -> Result<(), ShardError> {
        if node == self.host.id {
            return self
                .store
                .put_verified(id, data)
                .await
                .map_err(|e| ShardError::Unavailable(e.to_string()));
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
                .entry(self.host.layout.shard_for_chunk(&s.id))
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
        let mut members = self
            .host
            .layout
            .replicas(self.host.layout.shard_for_chunk(&id));
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

    /// Fetches chunks this node should hold but does not, as the shards'
    /// logs and snapshots name them. Each is looked at a moment after it
    /// was named, so a write still in flight is not copied twice.
    pub async fn repair(self, mut named: mpsc::UnboundedReceiver<(ChunkId, std::time::Instant)>) {
        while let Some((id, named_at)) = named.recv().await {
            if self.store.contains(&id) {
                continue;
            }
            tokio::time::sleep_until((named_at + Duration::from_millis(500)).into()).await;
            if self.store.contains(&id) {
                continue;
            }
            let members = self
                .host
                .layout
                .replicas(self.host.layout.shard_for_chunk(&id));
            for node in members.into_iter().filter(|n| *n != self.host.id) {
                if let Ok(Some(data)) = self.get_from(node, id).await {
                    if let Err(e) = self.store.put_verified(id, data).await {
                        tracing::warn!(chunk = ?id, "repair write failed: {e}");
                    }
                    break;
                }
            }
        }
    }
}
