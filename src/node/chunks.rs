//! Replicating chunks: a chunk goes to every replica of its shard and
//! counts as stored once a majority have fsynced it; reads take the first
//! replica whose copy verifies.
//!
//! A copy counts only on a node that holds the shard. While the layout
//! changes, the coordinator's view and a receiver's may differ: a node the
//! shard just moved away from would otherwise acknowledge a chunk it is
//! about to delete, and the write would count a copy that is gone. So
//! every write carries the coordinator's layout epoch and the chunk's
//! shard; the receiver stores it only if its own layout, at least as new,
//! lists it as a holder, and answers with that layout's epoch, which the
//! coordinator checks before counting the copy.

use crate::chunk::{ChunkError, ChunkStore, Missing};
use crate::placement::Layout;
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
/// How long a receiver whose layout is older than the coordinator's waits
/// to adopt a newer one before refusing (its follower looks every second,
/// and at once when nudged).
const CATCH_UP: Duration = Duration::from_secs(3);
/// How often a receiver behind the coordinator looks at its layout again.
const CATCH_UP_POLL: Duration = Duration::from_millis(50);

/// The answers of a chunk's holders to one write, against the
/// coordinator's layout.
struct Tally {
    /// The coordinator's layout epoch.
    epoch: u64,
    voters: Vec<u64>,
    /// Voters that stored the chunk at an epoch at least `epoch`.
    stored: usize,
    /// Why the voters that did not count did not.
    failed: Vec<String>,
    /// The newest layout epoch a receiver answered with.
    newest: u64,
    /// A voter refused for lack of disk space (see `space`).
    full: bool,
}

impl Tally {
    fn new(layout: &Layout, shard: ShardId) -> Tally {
        Tally {
            epoch: layout.epoch,
            voters: layout.replicas(shard),
            stored: 0,
            failed: Vec::new(),
            newest: layout.epoch,
            full: false,
        }
    }

    fn needed(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Counts one answer: a copy counts only on a voter that confirmed it
    /// holds the shard in a layout at least as new as the coordinator's.
    /// A joining learner receives the chunk but does not count.
    fn record(&mut self, node: u64, answer: Result<u64, ShardError>) {
        let voter = self.voters.contains(&node);
        match answer {
            Ok(epoch) => {
                self.newest = self.newest.max(epoch);
                if voter && epoch >= self.epoch {
                    self.stored += 1;
                } else if voter {
                    self.failed.push(format!(
                        "node {node} stored it at layout epoch {epoch}, older than {}",
                        self.epoch
                    ));
                }
            }
            Err(e) => {
                match &e {
                    ShardError::NotHolder { epoch, .. } => self.newest = self.newest.max(*epoch),
                    ShardError::InsufficientStorage(_) => self.full |= voter,
                    _ => {}
                }
                if voter {
                    self.failed.push(e.to_string());
                }
            }
        }
    }

    fn enough(&self) -> bool {
        self.stored >= self.needed()
    }

    /// True once so many voters failed that a majority cannot be reached.
    fn hopeless(&self) -> bool {
        self.failed.len() > self.voters.len() - self.needed()
    }

    fn error(&self) -> ShardError {
        let why = format!(
            "chunk stored on {} of {} replicas: {}",
            self.stored,
            self.voters.len(),
            self.failed.join("; ")
        );
        // A full disk does not clear up with a retry: say so.
        if self.full {
            ShardError::InsufficientStorage(why)
        } else {
            ShardError::Unavailable(why)
        }
    }
}

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
    /// Slower holders finish in the background. When that fails and a
    /// receiver knew a newer layout than this node, tries once more on the
    /// meta shard's current layout.
    pub async fn replicate(&self, data: Bytes) -> Result<ChunkId, ShardError> {
        let id = ChunkId::of(&data);
        let layout = self.host.layout();
        let tally = self.replicate_on(&layout, id, &data).await;
        if tally.enough() {
            return Ok(id);
        }
        if tally.newest > layout.epoch {
            if let Ok(current) = super::members::current(&self.host).await {
                if current.epoch > layout.epoch {
                    let again = self.replicate_on(&current, id, &data).await;
                    return again.enough().then_some(id).ok_or_else(|| again.error());
                }
            }
        }
        Err(tally.error())
    }

    /// Writes the chunk `id` to the holders of its shard in `layout`, until
    /// a majority of the voters has it or cannot.
    async fn replicate_on(&self, layout: &Layout, id: ChunkId, data: &Bytes) -> Tally {
        let shard = layout.shard_for_chunk(&id);
        let mut tally = Tally::new(layout, shard);
        let mut writes: FuturesUnordered<_> = layout
            .holders(shard)
            .into_iter()
            .map(|node| {
                let this = self.clone();
                let write = pb::ChunkWrite {
                    id: Bytes::copy_from_slice(&id.0),
                    data: data.clone(),
                    epoch: layout.epoch,
                    shard: shard.0,
                };
                let write = tokio::spawn(async move { this.put_on(node, write).await });
                async move { (node, write.await) }
            })
            .collect();
        while let Some((node, r)) = writes.next().await {
            let answer = r
                .map_err(|e| ShardError::Internal(e.to_string()))
                .and_then(|r| r);
            tally.record(node, answer);
            if tally.enough() || tally.hopeless() {
                break;
            }
        }
        tally
    }

    /// Sends one chunk write to `node` (this node directly); returns the
    /// epoch at which it confirmed holding the shard.
    async fn put_on(&self, node: u64, write: pb::ChunkWrite) -> Result<u64, ShardError> {
        if node == self.host.id {
            return self.accept(write).await;
        }
        let mut client = self.client_for(node)?;
        match tokio::time::timeout(Duration::from_secs(30), client.put_chunk(write)).await {
            Ok(Ok(stored)) => Ok(stored.into_inner().epoch),
            Ok(Err(s)) => Err(error_of(&s)),
            Err(_) => Err(ShardError::Unavailable(format!("node {node} timed out"))),
        }
    }

    /// Stores a chunk a coordinator sent, if this node's layout, at least
    /// as new as the coordinator's, lists it as a holder of the chunk's
    /// shard; returns that layout's epoch.
    pub async fn accept(&self, write: pb::ChunkWrite) -> Result<u64, ShardError> {
        let id = ChunkId::from_slice(&write.id)
            .ok_or_else(|| ShardError::InvalidArgument("chunk id must be 32 bytes".into()))?;
        let shard = ShardId(write.shard);
        let layout = self.layout_at_least(write.epoch, shard).await?;
        if layout.shard_for_chunk(&id) != shard {
            return Err(ShardError::InvalidArgument(format!(
                "chunk {} belongs to shard {}, not {shard}",
                id.to_hex(),
                layout.shard_for_chunk(&id)
            )));
        }
        if !layout.holders(shard).contains(&self.host.id) {
            return Err(ShardError::NotHolder {
                node: self.host.id,
                shard: shard.0,
                epoch: layout.epoch,
            });
        }
        self.store
            .put_verified(id, write.data)
            .await
            .map_err(|e| match e {
                ChunkError::NoSpace(why) => ShardError::InsufficientStorage(why),
                e => ShardError::Unavailable(e.to_string()),
            })?;
        Ok(layout.epoch)
    }

    /// This node's layout once it is at `epoch` or newer. A node behind
    /// has its layout follower look now and waits up to [`CATCH_UP`].
    async fn layout_at_least(&self, epoch: u64, shard: ShardId) -> Result<Arc<Layout>, ShardError> {
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        loop {
            let layout = self.host.layout();
            if layout.epoch >= epoch {
                return Ok(layout);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ShardError::Unavailable(format!(
                    "node {} is at layout epoch {}, behind the coordinator's {epoch}; it has not caught up yet",
                    self.host.id, layout.epoch
                )));
            }
            // Asking for the Raft of a shard this node lacks is how a
            // peer's message tells the follower to look for a newer
            // layout; with a replica, the follower's next poll finds it.
            let _ = self.host.raft_for_peer(shard);
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }

    /// Records chunks in their shards' logs, touched at `stamp_ms`, so
    /// replicas that missed the write learn about them and fetch them.
    pub async fn record(&self, spans: &[ChunkSpan], stamp_ms: i64) -> Result<(), ShardError> {
        let by_shard = self.by_shard(spans.iter().map(|s| (s.id, s.len)));
        self.propose_each(by_shard, |chunks| Command::AddChunks { chunks, stamp_ms })
            .await
    }

    /// Marks recorded chunks as in use now, so no collection takes them
    /// for a grace period; returns the stamp. Fails with ChunksStale if
    /// one was collected already.
    pub async fn touch(&self, spans: &[ChunkSpan]) -> Result<i64, ShardError> {
        let stamp_ms = crate::types::now_ms();
        let by_shard = self.by_shard(spans.iter().map(|s| (s.id, ())));
        self.propose_each(by_shard, |chunks| Command::TouchChunks {
            ids: chunks.into_iter().map(|(id, ())| id).collect(),
            stamp_ms,
        })
        .await?;
        Ok(stamp_ms)
    }

    fn by_shard<T>(
        &self,
        chunks: impl Iterator<Item = (ChunkId, T)>,
    ) -> BTreeMap<ShardId, Vec<(ChunkId, T)>> {
        let layout = self.host.layout();
        let mut by_shard: BTreeMap<ShardId, Vec<(ChunkId, T)>> = BTreeMap::new();
        for (id, t) in chunks {
            by_shard
                .entry(layout.shard_for_chunk(&id))
                .or_default()
                .push((id, t));
        }
        by_shard
    }

    /// Proposes one command per shard, all at once.
    async fn propose_each<T>(
        &self,
        by_shard: BTreeMap<ShardId, Vec<(ChunkId, T)>>,
        command: impl Fn(Vec<(ChunkId, T)>) -> Command,
    ) -> Result<(), ShardError> {
        let proposals = by_shard.into_iter().map(|(shard, chunks)| {
            let host = self.host.clone();
            let cmd = command(chunks);
            async move { host.propose(shard, &cmd).await }
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
            let read = self
                .store
                .get_verified(id)
                .await
                .map_err(|e| ShardError::Unavailable(e.to_string()))?;
            if read.is_none() {
                self.repair_if_recorded(id).await;
            }
            return Ok(read);
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

    /// True if a local replica records `id` (read off the runtime).
    pub async fn recorded_here(&self, id: ChunkId) -> bool {
        let host = self.host.clone();
        tokio::task::spawn_blocking(move || host.records_chunk(&id))
            .await
            .unwrap_or(false)
    }

    /// Names `id` for repair now if a local replica records it: a read
    /// found its file corrupt (moved aside) or gone.
    async fn repair_if_recorded(&self, id: ChunkId) {
        if self.recorded_here(id).await {
            self.missing.name(id);
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
    pub fn audit(&self) -> Result<usize, ShardError> {
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
                    // A corrupt copy moved aside has served its purpose.
                    this.store.forget_corrupt(&id);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Shard 1 on voters 1, 2, 3 with node 4 joining, at epoch 5.
    fn layout() -> Layout {
        let nodes = (1..=4)
            .map(|id| crate::config::NodeEntry {
                id,
                addr: format!("127.0.0.1:{}", 7000 + id).parse().unwrap(),
            })
            .collect();
        let mut l = Layout::initial(&crate::config::ClusterSpec {
            shards: 2,
            replication: 3,
            nodes,
        });
        l.epoch = 5;
        l.voters[1] = vec![1, 2, 3];
        l.joining.insert(1, 4);
        l
    }

    fn not_holder(node: u64, epoch: u64) -> Result<u64, ShardError> {
        Err(ShardError::NotHolder {
            node,
            shard: 1,
            epoch,
        })
    }

    #[test]
    fn a_copy_counts_only_on_a_voter_confirming_an_epoch_at_least_the_coordinators() {
        let mut t = Tally::new(&layout(), ShardId(1));
        t.record(4, Ok(5));
        t.record(1, Ok(4));
        assert_eq!(t.stored, 0, "a learner's or an older layout's copy counted");
        t.record(2, Ok(5));
        assert!(!t.enough());
        t.record(3, Ok(6));
        assert!(t.enough());
        assert_eq!(t.newest, 6);
    }

    #[test]
    fn refusals_from_nodes_that_no_longer_hold_the_shard_leave_the_others_to_decide() {
        let mut t = Tally::new(&layout(), ShardId(1));
        t.record(1, not_holder(1, 6));
        assert!(!t.hopeless());
        t.record(2, Ok(6));
        t.record(3, Ok(5));
        assert!(t.enough());
        assert_eq!(t.newest, 6);

        let mut t = Tally::new(&layout(), ShardId(1));
        t.record(1, not_holder(1, 6));
        t.record(2, not_holder(2, 6));
        assert!(t.hopeless());
        assert!(t
            .error()
            .to_string()
            .contains("node 2 does not hold shard 1"));
    }
}
