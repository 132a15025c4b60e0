//! openraft's network: each Raft message of each shard is one `Raft` RPC
//! to the target node, tagged with the shard id; the node's RPC server
//! hands it to that shard's `Raft` (see node::service).

use super::TypeConfig;
use crate::rpc::{pb, Pool};
use crate::types::{NodeId, ShardId};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// Creates connections to peers for one shard.
pub struct Network {
    pub shard: ShardId,
    pub pool: Arc<Pool>,
}

/// A connection to one peer for one shard.
pub struct Peer {
    shard: ShardId,
    target: NodeId,
    addr: String,
    pool: Arc<Pool>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            shard: self.shard,
            target,
            addr: node.addr.clone(),
            pool: self.pool.clone(),
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Peer {
    async fn call<Req, Resp, E>(
        &self,
        kind: &str,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let addr = self
            .addr
            .parse()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        // Raft's own connection: heartbeats never wait behind chunks.
        let mut client = self
            .pool
            .raft_client(addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let msg = pb::RaftMessage {
            shard: self.shard.0,
            kind: kind.to_string(),
            payload: rmp_serde::to_vec_named(req)
                .expect("raft messages serialize")
                .into(),
        };
        let reply = tokio::time::timeout(option.hard_ttl(), client.raft(msg))
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?
            .map_err(|s| {
                // NotFound: the peer has no replica of the shard yet (the
                // layout just gave it one); retried after a backoff too.
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::NotFound) {
                    RPCError::Unreachable(Unreachable::new(&s))
                } else {
                    RPCError::Network(NetworkError::new(&s))
                }
            })?;
        let decoded: Result<Resp, RaftError<NodeId, E>> =
            crate::shard::command::from_msgpack(&reply.into_inner().payload)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call("vote", &rpc, &option).await
    }

    /// Waits before retrying an unreachable peer: briefly at first (a
    /// replica the layout just assigned opens within a few hundred
    /// milliseconds), then longer, so a dead node costs little.
    fn backoff(&self) -> Backoff {
        let first = Duration::from_millis(50);
        Backoff::new(std::iter::successors(Some(first), |d| {
            Some((*d * 2).min(Duration::from_secs(1)))
        }))
    }
}
