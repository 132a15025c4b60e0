//! Where data lives: which shard holds a bucket's index or a chunk, and which
//! nodes hold a shard's replicas.
//!
//! Placement is a pure function of the cluster layout fixed at creation, so
//! every node and gateway computes the same answer without asking anyone.
//! Rebalancing (a later issue) will move this map into the meta shard.

use crate::types::{ChunkId, NodeId, ShardId};

/// The fixed shape of a cluster: its nodes, shard count and replication.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Node ids in ascending order.
    pub nodes: Vec<NodeId>,
    /// Number of Raft groups, shard 0 included.
    pub shards: u32,
    /// Replicas per shard (never below 2).
    pub replication: usize,
}

impl Layout {
    /// The shard holding the object index of `bucket` of `tenant`. Never the
    /// meta shard, so object traffic does not queue behind tenant changes.
    pub fn shard_for_bucket(&self, tenant: &str, bucket: &str) -> ShardId {
        bucket_shard(self.shards, tenant, bucket)
    }

    /// The shard recording a chunk; spreads one object's chunks over all nodes.
    pub fn shard_for_chunk(&self, chunk: &ChunkId) -> ShardId {
        self.data_shard(&chunk.0)
    }

    fn data_shard(&self, hash: &[u8; 32]) -> ShardId {
        data_shard(self.shards, hash)
    }

    /// The nodes holding `shard`: `replication` consecutive nodes starting at
    /// the shard's number, so replicas are on distinct nodes and every node
    /// gets an equal share.
    pub fn replicas(&self, shard: ShardId) -> Vec<NodeId> {
        let n = self.nodes.len();
        let start = shard.0 as usize % n;
        (0..self.replication.min(n))
            .map(|i| self.nodes[(start + i) % n])
            .collect()
    }

    /// All shards that have a replica on `node`.
    pub fn shards_of(&self, node: NodeId) -> Vec<ShardId> {
        (0..self.shards)
            .map(ShardId)
            .filter(|s| self.replicas(*s).contains(&node))
            .collect()
    }
}

/// The shard holding a bucket's index among `shards` shards; what
/// [`Layout::shard_for_bucket`] answers, for a gateway that knows only the
/// shard count.
pub fn bucket_shard(shards: u32, tenant: &str, bucket: &str) -> ShardId {
    let mut h = blake3::Hasher::new();
    h.update(tenant.as_bytes());
    h.update(&[0]);
    h.update(bucket.as_bytes());
    data_shard(shards, h.finalize().as_bytes())
}

fn data_shard(shards: u32, hash: &[u8; 32]) -> ShardId {
    let n = u64::from_le_bytes(hash[..8].try_into().unwrap_or_default());
    let data_shards = u64::from(shards.max(2) - 1);
    ShardId(1 + (n % data_shards) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            nodes: vec![1, 2, 3, 4],
            shards: 64,
            replication: 3,
        }
    }

    #[test]
    fn replicas_are_distinct_and_balanced() {
        let l = layout();
        let mut per_node = std::collections::HashMap::new();
        for s in 0..l.shards {
            let r = l.replicas(ShardId(s));
            let mut d = r.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3, "shard {s} has duplicate replicas {r:?}");
            for n in r {
                *per_node.entry(n).or_insert(0) += 1;
            }
        }
        assert!(per_node.values().all(|&c| c == 48), "{per_node:?}");
    }

    #[test]
    fn buckets_never_land_on_the_meta_shard() {
        let l = layout();
        for i in 0..1000 {
            assert_ne!(l.shard_for_bucket("t", &format!("b{i}")), ShardId::META);
        }
    }
}
