//! The internal RPC: generated from proto/lumbung.proto, carried by tonic
//! over mutual TLS.
//!
//! Domain errors cross the wire exactly ([`status_of`] puts the
//! [`ShardError`] in the status's metadata). Anything else that fails a
//! call is a transport failure, classified once in [`failure`]; [`pool`]
//! holds the connections every peer uses.

pub mod failure;
pub mod pool;

use crate::shard::ShardError;

pub use failure::{CallKind, Failure};
pub use pool::{client_of, NodeChannel, Pool};

/// Generated messages and service stubs.
pub mod pb {
    tonic::include_proto!("lumbung");
}

/// A client of one node's RPC service, over one of the pool's connections.
pub type NodeClient = pb::node_client::NodeClient<NodeChannel>;

/// The largest message on the wire: a chunk plus framing.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Header that carries a [`ShardError`] across the wire.
const ERROR_DETAIL: &str = "x-lumbung-error";

/// Wraps a domain error in a gRPC status, keeping the exact variant.
pub fn status_of(e: ShardError) -> tonic::Status {
    use tonic::Code;
    let code = match &e {
        ShardError::NotLeader { .. } | ShardError::Unavailable(_) => Code::Unavailable,
        ShardError::Internal(_) => Code::Internal,
        _ => Code::FailedPrecondition,
    };
    let mut status = tonic::Status::new(code, e.to_string());
    let encoded = hex::encode(crate::shard::encode(&e));
    if let Ok(v) = encoded.parse() {
        status.metadata_mut().insert(ERROR_DETAIL, v);
    }
    status
}

/// Recovers the domain error from a status; a transport failure becomes
/// `Unavailable` (transient), never `Internal`.
pub fn error_of(status: &tonic::Status) -> ShardError {
    Failure::of(status).into_error()
}
