//! Where data lives: which shard holds a bucket's index or a chunk, and which
//! nodes hold a shard's replicas.
//!
//! Which shard holds what is a pure function of the shard count, fixed at
//! creation. Which nodes hold a shard is the layout: it starts as a pure
//! function of the node list every node file carries, and from the first
//! change on (a node added, a replica moved) the meta shard keeps it, with
//! an epoch that grows by one per change so every node can tell the newer
//! of two layouts.

pub mod planner;

use crate::config::ClusterSpec;
use crate::types::{ChunkId, NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Capacity given to a node whose admin named none: only ratios matter, so
/// nodes left at the default share equally.
pub const DEFAULT_CAPACITY: u64 = 1 << 40;

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Internal address of its RPC server.
    pub addr: SocketAddr,
    /// Failure domain (rack, room); empty when none was given.
    pub zone: String,
    /// Relative weight of the bytes and replicas it should hold.
    pub capacity: u64,
    pub state: MemberState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Holds replicas and takes new ones.
    Active,
    /// Its replicas are moving off; it takes no new ones.
    Draining,
    /// Holds nothing; it may be stopped and removed.
    Drained,
    /// Removed for good (drained, or dead); its replicas, if any, are
    /// re-created elsewhere. Its id is never used again.
    Removed,
}

impl MemberState {
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Draining => "draining",
            MemberState::Drained => "drained",
            MemberState::Removed => "removed",
        }
    }
}

/// The shape of a cluster: its nodes and who holds each shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// 0 for the layout the node files describe; +1 per change.
    pub epoch: u64,
    /// Number of Raft groups, shard 0 included.
    pub shards: u32,
    /// Replicas per shard (never below 2).
    pub replication: usize,
    pub members: BTreeMap<NodeId, Member>,
    /// Voters of each shard, indexed by shard number.
    pub voters: Vec<Vec<NodeId>>,
    /// A node being added to a shard as a learner, by shard number: it
    /// receives the shard's chunks before it becomes a voter.
    pub joining: BTreeMap<u32, NodeId>,
}

impl Layout {
    /// The layout a fresh cluster starts with: shard `s` on `replication`
    /// consecutive nodes starting at node `s mod n`, so replicas are on
    /// distinct nodes and every node gets an equal share.
    pub fn initial(spec: &ClusterSpec) -> Layout {
        let mut ids: Vec<NodeId> = spec.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        let n = ids.len();
        let voters = (0..spec.shards as usize)
            .map(|s| {
                (0..spec.replication.min(n))
                    .map(|i| ids[(s + i) % n])
                    .collect()
            })
            .collect();
        let members = spec
            .nodes
            .iter()
            .map(|e| {
                let member = Member {
                    addr: e.addr,
                    zone: String::new(),
                    capacity: DEFAULT_CAPACITY,
                    state: MemberState::Active,
                };
                (e.id, member)
            })
            .collect();
        Layout {
            epoch: 0,
            shards: spec.shards,
            replication: spec.replication,
            members,
            voters,
            joining: BTreeMap::new(),
        }
    }

    /// Ids of every member, in ascending order.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.members.keys().copied().collect()
    }

    /// Ids of the members not removed: the nodes that should answer.
    pub fn live_nodes(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| m.state != MemberState::Removed)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn addr_of(&self, node: NodeId) -> Option<SocketAddr> {
        self.members.get(&node).map(|m| m.addr)
    }

    /// The shard holding the object index of `bucket` of `tenant`. Never the
    /// meta shard, so object traffic does not queue behind tenant changes.
    pub fn shard_for_bucket(&self, tenant: &str, bucket: &str) -> ShardId {
        bucket_shard(self.shards, tenant, bucket)
    }

    /// The shard recording a chunk; spreads one object's chunks over all nodes.
    pub fn shard_for_chunk(&self, chunk: &ChunkId) -> ShardId {
        data_shard(self.shards, &chunk.0)
    }

    /// The voters of `shard`.
    pub fn replicas(&self, shard: ShardId) -> Vec<NodeId> {
        self.voters
            .get(shard.0 as usize)
            .cloned()
            .unwrap_or_default()
    }

    /// The nodes that hold or are receiving `shard`'s data: its voters and
    /// a joining learner. Chunks are written to all of them.
    pub fn holders(&self, shard: ShardId) -> Vec<NodeId> {
        let mut nodes = self.replicas(shard);
        nodes.extend(self.joining.get(&shard.0));
        nodes
    }

    /// All shards that `node` holds or is receiving.
    pub fn shards_of(&self, node: NodeId) -> Vec<ShardId> {
        (0..self.shards)
            .map(ShardId)
            .filter(|s| self.holders(*s).contains(&node))
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
        let nodes = (1..=4)
            .map(|id| crate::config::NodeEntry {
                id,
                addr: format!("127.0.0.1:{}", 7000 + id).parse().unwrap(),
            })
            .collect();
        Layout::initial(&ClusterSpec {
            shards: 64,
            replication: 3,
            nodes,
        })
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
