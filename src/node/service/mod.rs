//! The node's RPC server: the `Node` service of proto/lumbung.proto.
//!
//! Each handler decodes, calls the shard host or the object coordinator,
//! and encodes; no logic lives here. Handlers live with the role that may
//! call them (see `access`): [`peer`] for other nodes (Raft, chunks, key
//! steps), [`gateway`] for the object API, [`admin`] for the admin CLI.
//! This file only routes the generated trait's methods to them.

mod admin;
mod gateway;
mod peer;

use super::objects::Objects;
use crate::rpc::{pb, status_of};
use crate::shard::ShardError;
use pb::node_server::Node;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};

/// The RPC face of one node.
pub struct NodeService {
    pub objects: Objects,
    /// The last view each gateway reported, and when.
    pub gateway_views: Mutex<HashMap<String, (pb::GatewayView, Instant)>>,
}

/// A gateway view older than this is a gateway gone; `status` drops it.
const VIEW_KEPT: Duration = Duration::from_secs(60);

type Rpc<T> = Result<Response<T>, Status>;

fn ok<T>(v: T) -> Rpc<T> {
    Ok(Response::new(v))
}

fn bad(msg: impl Into<String>) -> Status {
    status_of(ShardError::InvalidArgument(msg.into()))
}

impl NodeService {
    pub fn new(objects: Objects) -> NodeService {
        NodeService {
            objects,
            gateway_views: Mutex::new(HashMap::new()),
        }
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    type GetObjectStream = gateway::GetObjectStream;

    async fn raft(&self, req: Request<pb::RaftMessage>) -> Rpc<pb::RaftMessage> {
        peer::raft(self, req).await
    }

    async fn propose(&self, req: Request<pb::ShardCall>) -> Rpc<pb::ShardReply> {
        peer::propose(self, req).await
    }

    async fn query(&self, req: Request<pb::ShardCall>) -> Rpc<pb::ShardReply> {
        peer::query(self, req).await
    }

    async fn change_membership(&self, req: Request<pb::ShardCall>) -> Rpc<pb::ShardReply> {
        peer::change_membership(self, req).await
    }

    async fn local_layout(&self, req: Request<pb::Empty>) -> Rpc<pb::ShardReply> {
        peer::local_layout(self, req).await
    }

    async fn shard_chunks(&self, req: Request<pb::ShardRequest>) -> Rpc<pb::ShardChunkCount> {
        peer::shard_chunks(self, req).await
    }

    async fn put_chunk(&self, req: Request<pb::ChunkWrite>) -> Rpc<pb::ChunkStored> {
        peer::put_chunk(self, req).await
    }

    async fn get_chunk(&self, req: Request<pb::ChunkRef>) -> Rpc<pb::Chunk> {
        peer::get_chunk(self, req).await
    }

    async fn lookup_access_key(
        &self,
        req: Request<pb::AccessKeyRequest>,
    ) -> Rpc<pb::AccessKeyReply> {
        gateway::lookup_access_key(self, req).await
    }

    async fn list_buckets(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::BucketList> {
        gateway::list_buckets(self, req).await
    }

    async fn create_bucket(&self, req: Request<pb::BucketRequest>) -> Rpc<pb::Empty> {
        gateway::create_bucket(self, req).await
    }

    async fn delete_bucket(&self, req: Request<pb::BucketRequest>) -> Rpc<pb::Empty> {
        gateway::delete_bucket(self, req).await
    }

    async fn head_bucket(&self, req: Request<pb::BucketRequest>) -> Rpc<pb::Empty> {
        gateway::head_bucket(self, req).await
    }

    async fn put_object(&self, req: Request<Streaming<pb::PutFrame>>) -> Rpc<pb::PutReply> {
        gateway::put_object(self, req).await
    }

    async fn get_object(&self, req: Request<pb::GetRequest>) -> Rpc<Self::GetObjectStream> {
        gateway::get_object(self, req).await
    }

    async fn head_object(&self, req: Request<pb::ObjectRequest>) -> Rpc<pb::ObjectInfo> {
        gateway::head_object(self, req).await
    }

    async fn delete_object(&self, req: Request<pb::ObjectRequest>) -> Rpc<pb::Empty> {
        gateway::delete_object(self, req).await
    }

    async fn copy_object(&self, req: Request<pb::CopyRequest>) -> Rpc<pb::PutReply> {
        gateway::copy_object(self, req).await
    }

    async fn list_objects(&self, req: Request<pb::ListRequest>) -> Rpc<pb::ListReply> {
        gateway::list_objects(self, req).await
    }

    async fn create_upload(&self, req: Request<pb::CreateUploadRequest>) -> Rpc<pb::UploadId> {
        gateway::create_upload(self, req).await
    }

    async fn complete_upload(&self, req: Request<pb::CompleteRequest>) -> Rpc<pb::PutReply> {
        gateway::complete_upload(self, req).await
    }

    async fn abort_upload(&self, req: Request<pb::UploadRequest>) -> Rpc<pb::Empty> {
        gateway::abort_upload(self, req).await
    }

    async fn list_parts(&self, req: Request<pb::ListPartsRequest>) -> Rpc<pb::ListPartsReply> {
        gateway::list_parts(self, req).await
    }

    async fn list_uploads(
        &self,
        req: Request<pb::ListUploadsRequest>,
    ) -> Rpc<pb::ListUploadsReply> {
        gateway::list_uploads(self, req).await
    }

    async fn create_tenant(&self, req: Request<pb::TenantSpec>) -> Rpc<pb::Empty> {
        admin::create_tenant(self, req).await
    }

    async fn set_quota(&self, req: Request<pb::TenantSpec>) -> Rpc<pb::Empty> {
        admin::set_quota(self, req).await
    }

    async fn show_tenant(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::TenantInfo> {
        admin::show_tenant(self, req).await
    }

    async fn list_tenants(&self, req: Request<pb::Empty>) -> Rpc<pb::TenantList> {
        admin::list_tenants(self, req).await
    }

    async fn create_access_key(
        &self,
        req: Request<pb::TenantRequest>,
    ) -> Rpc<pb::AccessKeyCreated> {
        admin::create_access_key(self, req).await
    }

    async fn list_access_keys(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::AccessKeyList> {
        admin::list_access_keys(self, req).await
    }

    async fn revoke_access_key(&self, req: Request<pb::AccessKeyRequest>) -> Rpc<pb::Empty> {
        admin::revoke_access_key(self, req).await
    }

    async fn master_key_step(
        &self,
        req: Request<pb::MasterKeyStepRequest>,
    ) -> Rpc<pb::MasterKeyState> {
        peer::master_key_step(self, req).await
    }

    async fn forget_tenant_keys(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::Empty> {
        peer::forget_tenant_keys(self, req).await
    }

    async fn rotate_tenant_key(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::TenantInfo> {
        admin::rotate_tenant_key(self, req).await
    }

    async fn delete_tenant(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::TenantDeletion> {
        admin::delete_tenant(self, req).await
    }

    async fn rotate_master_key(&self, req: Request<pb::Empty>) -> Rpc<pb::MasterRotation> {
        admin::rotate_master_key(self, req).await
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Rpc<pb::Members> {
        admin::add_node(self, req).await
    }

    async fn drain_node(&self, req: Request<pb::NodeRequest>) -> Rpc<pb::RebalanceStatus> {
        admin::drain_node(self, req).await
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Rpc<pb::RebalanceStatus> {
        admin::remove_node(self, req).await
    }

    async fn rebalance(&self, req: Request<pb::RebalanceRequest>) -> Rpc<pb::RebalanceStatus> {
        admin::rebalance(self, req).await
    }

    async fn rebalance_progress(&self, req: Request<pb::Empty>) -> Rpc<pb::RebalanceStatus> {
        admin::rebalance_progress(self, req).await
    }

    async fn collect_garbage(&self, req: Request<pb::GcRequest>) -> Rpc<pb::GcReport> {
        admin::collect_garbage(self, req).await
    }

    async fn scrub(&self, _req: Request<pb::Empty>) -> Rpc<pb::ScrubStatus> {
        ok(self.objects.scrub.start())
    }

    async fn list_nodes(&self, req: Request<pb::Empty>) -> Rpc<pb::Members> {
        admin::list_nodes(self, req).await
    }

    async fn status(&self, req: Request<pb::Empty>) -> Rpc<pb::NodeStatus> {
        admin::status(self, req).await
    }

    async fn routes(&self, req: Request<pb::Empty>) -> Rpc<pb::RouteTable> {
        gateway::routes(self, req).await
    }

    async fn report_view(&self, req: Request<pb::GatewayView>) -> Rpc<pb::Empty> {
        gateway::report_view(self, req).await
    }
}

/// Resident memory of this process, from /proc.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}
