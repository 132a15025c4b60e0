//! Lumbung: replicated, encrypted, S3-compatible object storage.
//!
//! # Layout
//!
//! - [`gateway`]: the public TLS listener; S3 via `s3s`, SigV4, limits.
//! - [`s3`]: the S3 operations, one file per family, as internal RPCs.
//! - [`node`]: a storage node: the internal RPC server and the object
//!   coordinator that chunks bodies and commits manifests.
//! - [`shard`]: Raft groups (openraft) with their log and state machine.
//! - [`store`]: the state store (redb) behind the shards' state machines.
//! - [`space`]: the reserve of free disk space a node keeps.
//! - [`chunk`]: content-addressed chunk files, verified on every read.
//! - [`crypto`]: tenant keys, the master keyring, sealing data at rest.
//! - [`placement`]: which shard holds what, and which nodes hold a shard.
//! - [`admin`]: cluster creation and status.
//! - [`rpc`], [`tls`], [`config`]: the wire, certificates and config files.
//! - [`watchdog`]: fail-stop, when the runtime or storage stops moving.

pub mod admin;
pub mod chunk;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod gateway;
pub mod node;
pub mod placement;
pub mod rpc;
pub mod s3;
pub mod shard;
pub mod space;
pub mod store;
pub mod tls;
pub mod types;
pub mod watchdog;
