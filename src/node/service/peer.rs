//! What other nodes call: Raft messages, shard calls forwarded to this
//! node as leader, chunk copies and the master-key steps.

use super::{bad, ok, NodeService, Rpc};
use crate::rpc::pb;
use crate::rpc::status_of;
use crate::shard::command::MembershipOp;
use crate::shard::{decode, encode, Command, Query, TypeConfig};
use crate::types::{ChunkId, ShardId};
use openraft::raft::AppendEntriesRequest;
use tonic::Response;
use tonic::{Request, Status};

pub(super) async fn raft(
    this: &NodeService,
    req: Request<pb::RaftMessage>,
) -> Rpc<pb::RaftMessage> {
    let msg = req.into_inner();
    let shard = ShardId(msg.shard);
    let raft = this
        .objects
        .chunks
        .host
        .raft_for_peer(shard)
        .ok_or_else(|| Status::not_found(format!("no replica of shard {shard} here")))?;
    let de = |e: rmp_serde::decode::Error| Status::invalid_argument(e.to_string());
    let payload = match msg.kind.as_str() {
        "append" => {
            let rpc: AppendEntriesRequest<TypeConfig> =
                crate::shard::command::from_msgpack(&msg.payload).map_err(de)?;
            if let Some(leader) = rpc.vote.leader_id().voted_for() {
                this.objects.chunks.host.heard_from_leader(shard, leader);
            }
            encode(&raft.append_entries(rpc).await)
        }
        "vote" => encode(
            &raft
                .vote(crate::shard::command::from_msgpack(&msg.payload).map_err(de)?)
                .await,
        ),
        "snapshot" => encode(
            &raft
                .install_snapshot(crate::shard::command::from_msgpack(&msg.payload).map_err(de)?)
                .await,
        ),
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown raft message {other}"
            )))
        }
    };
    ok(pb::RaftMessage {
        shard: msg.shard,
        kind: msg.kind,
        payload: payload.into(),
    })
}

pub(super) async fn propose(
    this: &NodeService,
    req: Request<pb::ShardCall>,
) -> Rpc<pb::ShardReply> {
    let call = req.into_inner();
    let cmd: Command = decode(&call.payload).map_err(status_of)?;
    let reply = this
        .objects
        .chunks
        .host
        .propose_here(ShardId(call.shard), &cmd)
        .await;
    ok(pb::ShardReply {
        payload: encode(&reply).into(),
    })
}

pub(super) async fn query(this: &NodeService, req: Request<pb::ShardCall>) -> Rpc<pb::ShardReply> {
    let call = req.into_inner();
    let q: Query = decode(&call.payload).map_err(status_of)?;
    let reply = this
        .objects
        .chunks
        .host
        .query_here(ShardId(call.shard), &q)
        .await;
    ok(pb::ShardReply {
        payload: encode(&reply).into(),
    })
}

pub(super) async fn change_membership(
    this: &NodeService,
    req: Request<pb::ShardCall>,
) -> Rpc<pb::ShardReply> {
    let call = req.into_inner();
    let op: MembershipOp = decode(&call.payload).map_err(status_of)?;
    let reply = this
        .objects
        .chunks
        .host
        .membership_here(ShardId(call.shard), &op)
        .await;
    ok(pb::ShardReply {
        payload: encode(&reply).into(),
    })
}

pub(super) async fn local_layout(
    this: &NodeService,
    _req: Request<pb::Empty>,
) -> Rpc<pb::ShardReply> {
    let layout = this.objects.chunks.host.layout();
    ok(pb::ShardReply {
        payload: encode(&*layout).into(),
    })
}

pub(super) async fn shard_chunks(
    this: &NodeService,
    req: Request<pb::ShardRequest>,
) -> Rpc<pb::ShardChunkCount> {
    let shard = ShardId(req.into_inner().shard);
    let chunks = this.objects.chunks.clone();
    let count = tokio::task::spawn_blocking(move || chunks.count_in(shard))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("no replica of shard {shard} here")))?;
    ok(count)
}

pub(super) async fn put_chunk(
    this: &NodeService,
    req: Request<pb::ChunkWrite>,
) -> Rpc<pb::ChunkStored> {
    let epoch = this
        .objects
        .chunks
        .accept(req.into_inner())
        .await
        .map_err(status_of)?;
    ok(pb::ChunkStored { epoch })
}

pub(super) async fn get_chunk(this: &NodeService, req: Request<pb::ChunkRef>) -> Rpc<pb::Chunk> {
    let r = req.into_inner();
    let id = ChunkId::from_slice(&r.id).ok_or_else(|| bad("chunk id must be 32 bytes"))?;
    match this.objects.chunks.store.get_verified(id).await {
        Ok(Some(data)) => ok(pb::Chunk { id: r.id, data }),
        Ok(None) => Err(Status::not_found("chunk not on this replica")),
        Err(e) => Err(Status::internal(e.to_string())),
    }
}

pub(super) async fn master_key_step(
    this: &NodeService,
    req: Request<pb::MasterKeyStepRequest>,
) -> Rpc<pb::MasterKeyState> {
    let r = req.into_inner();
    crate::node::key_admin::apply_master_step(&this.objects.keys.master, &r)
        .map(Response::new)
        .map_err(status_of)
}

pub(super) async fn forget_tenant_keys(
    this: &NodeService,
    req: Request<pb::TenantRequest>,
) -> Rpc<pb::Empty> {
    this.objects.keys.forget(&req.into_inner().tenant);
    ok(pb::Empty {})
}
