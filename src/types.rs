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

/// A chunk's name: the BLAKE3 hash of the bytes stored on disk. It is
/// written as 32 bytes (msgpack bin: 34 bytes, where an array of numbers
/// took about 50), and read in either form: records and log entries
/// written before hold arrays.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ChunkId, D::Error> {
        d.deserialize_any(ChunkIdVisitor)
    }
}

struct ChunkIdVisitor;

impl<'de> serde::de::Visitor<'de> for ChunkIdVisitor {
    type Value = ChunkId;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("32 bytes, or an array of 32 numbers")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ChunkId, E> {
        ChunkId::from_slice(v).ok_or_else(|| E::invalid_length(v.len(), &self))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ChunkId, A::Error> {
        let mut id = [0u8; 32];
        for (i, b) in id.iter_mut().enumerate() {
            *b = seq
                .next_element()?
                .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
        }
        if seq.next_element::<u8>()?.is_some() {
            return Err(serde::de::Error::invalid_length(33, &self));
        }
        Ok(ChunkId(id))
    }
}

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

#[cfg(test)]
mod chunk_id_tests {
    use super::ChunkId;

    #[test]
    fn chunk_ids_are_written_as_bytes_and_read_in_either_form() {
        let id = ChunkId::of(b"granary");
        let new = rmp_serde::to_vec_named(&id).unwrap();
        assert_eq!(new.len(), 34, "msgpack bin 8: two bytes of header");
        assert_eq!(rmp_serde::from_slice::<ChunkId>(&new).unwrap(), id);
        // As the derived form wrote it: an array of 32 numbers.
        let old = rmp_serde::to_vec_named(&id.0).unwrap();
        assert!(old.len() > 34);
        assert_eq!(rmp_serde::from_slice::<ChunkId>(&old).unwrap(), id);
        let short = rmp_serde::to_vec_named(serde_bytes::Bytes::new(&[1; 31])).unwrap();
        assert!(rmp_serde::from_slice::<ChunkId>(&short).is_err());
    }
}
