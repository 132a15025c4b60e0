//! Shards: many small Raft groups sharing one node.
//!
//! A shard is one openraft group of `replication` replicas on distinct
//! nodes. Every change to a shard's state is a [`Command`] in its log; a
//! command takes effect once a majority of the replicas have fsynced it,
//! and only then is the client told it succeeded. That is why an
//! acknowledged write survives the loss of any minority of replicas:
//! every future leader is elected by a majority, and any two majorities
//! share a replica that has the write.
//!
//! Reads are linearizable: a query runs on the leader only after it has
//! confirmed with a quorum that it still leads (openraft's read index), so
//! it sees every write acknowledged before it began, whichever gateway or
//! node took that write.
//!
//! All shards of a node share one segment log (their Raft entries), one
//! state store (`sm/<shard>` spaces), one meta store (`vote/<shard>`) and
//! one fsync loop, so a burst of small writes to many shards costs one
//! fsync, not one per shard.

pub mod command;
pub mod flusher;
pub mod host;
pub mod log_compactor;
pub mod log_keeper;
pub mod log_store;
pub mod low_disk;
pub mod network;
pub mod read_gate;
pub mod segment_log;
pub mod snapshot;
pub mod state;
pub mod state_machine;

pub use command::{decode, encode, Command, Query, Reply, ShardError, Value};
pub use host::ShardHost;

openraft::declare_raft_types!(
    /// The types of Lumbung's Raft groups.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = crate::types::NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
