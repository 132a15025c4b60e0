//! Domain identifiers. Each is a real type so a shard number can never be
//! passed where a node id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A node of the cluster. openraft needs a plain integer, so this one is an
/// alias; ids are never reused after a node is removed.
pub type NodeId = u64;

/// One Raft group. Shard 0 is the meta shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl ShardId {
    /// The shard holding tenants, access keys and the bucket catalogue.
    pub const META: ShardId = ShardId(0);
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A chunk's name: the BLAKE3 hash of the bytes stored on disk.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`, as every replica recomputes it on read.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<ChunkId> {
        Some(ChunkId(bytes.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

/// Names one client request that writes (an object, or a bucket): chosen
/// at random once per request by the node coordinating it and stored with
/// what the request made, so the same request applied again (a proposal
/// retried after a timeout or a leader change) is recognised and answered
/// as the first time instead of being refused or done twice.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WriteId(pub u128);

impl WriteId {
    /// A fresh id; 128 random bits never collide in practice.
    pub fn random() -> WriteId {
        WriteId(rand::random())
    }

    /// The id in 16 bytes (big-endian), as the internal RPC carries it.
    pub fn from_slice(bytes: &[u8]) -> Option<WriteId> {
        Some(WriteId(u128::from_be_bytes(bytes.try_into().ok()?)))
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl fmt::Debug for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WriteId({:032x})", self.0)
    }
}

/// Milliseconds since the Unix epoch, as stamped by the coordinating node.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
