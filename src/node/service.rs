//! The node's RPC server: the `Node` service of proto/lumbung.proto.
//! Each handler decodes, calls the shard host or the object coordinator,
//! and encodes; no logic lives here.

use super::objects::{Objects, Target};
use super::{members, rebalance};
use crate::placement::{Layout, Member, MemberState, DEFAULT_CAPACITY};
use crate::rpc::{error_of, pb, status_of};
use crate::shard::command::MembershipOp;
use crate::shard::command::{ETagMatch, Manifest, ObjectMeta, Precondition};
use crate::shard::command::{Rebalance, RebalanceState};
use crate::shard::{decode, encode, Command, Query, ShardError};
use crate::types::{ChunkId, ShardId, WriteId};
use bytes::Bytes;
use futures::stream::StreamExt;
use pb::node_server::Node;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::wrappers::ReceiverStream;
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

/// An object as the gateway sees it; listings pass no `meta`, as S3
/// listings carry neither content type nor user metadata.
fn info(key: &str, m: &Manifest, meta: Option<ObjectMeta>) -> pb::ObjectInfo {
    let meta = meta.unwrap_or_default();
    pb::ObjectInfo {
        key: key.to_string(),
        size: m.size,
        etag: m.etag.clone(),
        content_type: meta.content_type,
        modified_ms: m.modified_ms,
        user_metadata: meta.user_metadata.into_iter().collect(),
    }
}

fn quota_of(spec: &pb::TenantSpec) -> crate::shard::command::Quota {
    crate::shard::command::Quota {
        bytes: spec.quota_bytes,
        objects: spec.quota_objects,
    }
}

fn members_of(layout: &Layout) -> pb::Members {
    pb::Members {
        epoch: layout.epoch,
        members: layout
            .members
            .iter()
            .map(|(&id, m)| pb::Member {
                node_id: id,
                addr: m.addr.to_string(),
                zone: m.zone.clone(),
                capacity: m.capacity,
                state: m.state.name().into(),
                replicas: layout.shards_of(id).len() as u32,
            })
            .collect(),
    }
}

fn rebalance_status(r: Option<&Rebalance>) -> pb::RebalanceStatus {
    let Some(r) = r else {
        return pb::RebalanceStatus::default();
    };
    pb::RebalanceStatus {
        exists: true,
        id: r.id,
        state: match &r.state {
            RebalanceState::Running => "running".into(),
            RebalanceState::Done => "done".into(),
            RebalanceState::Cancelled => "cancelled".into(),
            RebalanceState::Failed(why) => format!("failed: {why}"),
        },
        moves: r
            .moves
            .iter()
            .map(|m| pb::PlannedMove {
                shard: m.shard.0,
                from: m.from,
                to: m.to,
                bytes: m.bytes,
            })
            .collect(),
        done: r.done as u32,
        bytes_copied: r.bytes_copied,
        rate: r.rate,
        cancel: r.cancel,
        updated_ms: r.updated_ms,
    }
}

/// The id a request names for itself, or a fresh one when it names none
/// (the node is then the first to see the request).
fn write_id_of(bytes: &[u8]) -> Result<WriteId, Status> {
    if bytes.is_empty() {
        return Ok(WriteId::random());
    }
    WriteId::from_slice(bytes).ok_or_else(|| bad("write_id must be 16 bytes"))
}

/// A conditional write's `If-Match` and `If-None-Match` as the wire
/// carries them: `*`, an ETag, or empty for none.
fn precondition_of(if_match: &str, if_none_match: &str) -> Precondition {
    let one = |v: &str| match v.trim().trim_matches('"') {
        "" => None,
        "*" => Some(ETagMatch::Any),
        etag => Some(ETagMatch::ETag(etag.to_string())),
    };
    Precondition {
        if_match: one(if_match),
        if_none_match: one(if_none_match),
    }
}

fn ok<T>(v: T) -> Rpc<T> {
    Ok(Response::new(v))
}

fn bad(msg: impl Into<String>) -> Status {
    status_of(ShardError::InvalidArgument(msg.into()))
}

/// Reads a tonic stream of PUT frames as a plain byte stream, and remembers
/// the commit frame when it comes.
fn body_of(
    frames: Streaming<pb::PutFrame>,
    commit: Arc<std::sync::Mutex<Option<pb::PutCommit>>>,
) -> impl futures::Stream<Item = Result<Bytes, ShardError>> + Unpin {
    frames
        .filter_map(move |f| {
            let commit = commit.clone();
            async move {
                match f {
                    Err(s) => Some(Err(error_of(&s))),
                    Ok(pb::PutFrame {
                        frame: Some(pb::put_frame::Frame::Data(d)),
                    }) => Some(Ok(d)),
                    Ok(pb::PutFrame {
                        frame: Some(pb::put_frame::Frame::Commit(c)),
                    }) => {
                        *commit.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                        None
                    }
                    Ok(_) => Some(Err(ShardError::InvalidArgument(
                        "unexpected frame in PUT body".into(),
                    ))),
                }
            }
        })
        .boxed()
}

impl NodeService {
    /// Refuses, changing nothing, while a rebalance runs.
    async fn refuse_if_rebalancing(&self) -> Result<(), Status> {
        let latest = rebalance::latest(&self.objects.chunks.host)
            .await
            .map_err(status_of)?;
        match latest {
            Some(r) if r.running() => Err(bad(format!(
                "a rebalance is already running ({} of {} moves done); wait for it, or stop it with `rebalance --cancel`",
                r.done,
                r.moves.len()
            ))),
            _ => Ok(()),
        }
    }

    /// Changes the layout (draining or removing a node), then starts the
    /// rebalance that moves replicas accordingly, if any need to move.
    async fn change_then_rebalance(
        &self,
        change: impl Fn(&mut Layout) -> Result<(), ShardError>,
    ) -> Rpc<pb::RebalanceStatus> {
        self.refuse_if_rebalancing().await?;
        let chunks = &self.objects.chunks;
        members::change(&chunks.host, change)
            .await
            .map_err(status_of)?;
        let planned = rebalance::plan(chunks, None, 0).await.map_err(status_of)?;
        if planned.moves.is_empty() {
            return ok(rebalance_status(None));
        }
        rebalance::start(&chunks.host, &planned)
            .await
            .map_err(status_of)?;
        ok(rebalance_status(Some(&planned)))
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn raft(&self, req: Request<pb::RaftMessage>) -> Rpc<pb::RaftMessage> {
        let msg = req.into_inner();
        let shard = ShardId(msg.shard);
        let raft = self
            .objects
            .chunks
            .host
            .raft_for_peer(shard)
            .ok_or_else(|| Status::not_found(format!("no replica of shard {shard} here")))?;
        let de = |e: rmp_serde::decode::Error| Status::invalid_argument(e.to_string());
        let payload = match msg.kind.as_str() {
            "append" => encode(
                &raft
                    .append_entries(crate::shard::command::from_msgpack(&msg.payload).map_err(de)?)
                    .await,
            ),
            "vote" => encode(
                &raft
                    .vote(crate::shard::command::from_msgpack(&msg.payload).map_err(de)?)
                    .await,
            ),
            "snapshot" => encode(
                &raft
                    .install_snapshot(
                        crate::shard::command::from_msgpack(&msg.payload).map_err(de)?,
                    )
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

    async fn propose(&self, req: Request<pb::ShardCall>) -> Rpc<pb::ShardReply> {
        let call = req.into_inner();
        let cmd: Command = decode(&call.payload).map_err(status_of)?;
        let reply = self
            .objects
            .chunks
            .host
            .propose_here(ShardId(call.shard), &cmd)
            .await;
        ok(pb::ShardReply {
            payload: encode(&reply).into(),
        })
    }

    async fn query(&self, req: Request<pb::ShardCall>) -> Rpc<pb::ShardReply> {
        let call = req.into_inner();
        let q: Query = decode(&call.payload).map_err(status_of)?;
        let reply = self
            .objects
            .chunks
            .host
            .query_here(ShardId(call.shard), &q)
            .await;
        ok(pb::ShardReply {
            payload: encode(&reply).into(),
        })
    }

    async fn change_membership(&self, req: Request<pb::ShardCall>) -> Rpc<pb::ShardReply> {
        let call = req.into_inner();
        let op: MembershipOp = decode(&call.payload).map_err(status_of)?;
        let reply = self
            .objects
            .chunks
            .host
            .membership_here(ShardId(call.shard), &op)
            .await;
        ok(pb::ShardReply {
            payload: encode(&reply).into(),
        })
    }

    async fn local_layout(&self, _req: Request<pb::Empty>) -> Rpc<pb::ShardReply> {
        let layout = self.objects.chunks.host.layout();
        ok(pb::ShardReply {
            payload: encode(&*layout).into(),
        })
    }

    async fn shard_chunks(&self, req: Request<pb::ShardRequest>) -> Rpc<pb::ShardChunkCount> {
        let shard = ShardId(req.into_inner().shard);
        let chunks = self.objects.chunks.clone();
        let count = tokio::task::spawn_blocking(move || chunks.count_in(shard))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("no replica of shard {shard} here")))?;
        ok(count)
    }

    async fn put_chunk(&self, req: Request<pb::ChunkWrite>) -> Rpc<pb::ChunkStored> {
        let epoch = self
            .objects
            .chunks
            .accept(req.into_inner())
            .await
            .map_err(status_of)?;
        ok(pb::ChunkStored { epoch })
    }

    async fn get_chunk(&self, req: Request<pb::ChunkRef>) -> Rpc<pb::Chunk> {
        let r = req.into_inner();
        let id = ChunkId::from_slice(&r.id).ok_or_else(|| bad("chunk id must be 32 bytes"))?;
        match self.objects.chunks.store.get_verified(id).await {
            Ok(Some(data)) => ok(pb::Chunk { id: r.id, data }),
            Ok(None) => Err(Status::not_found("chunk not on this replica")),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn lookup_access_key(
        &self,
        req: Request<pb::AccessKeyRequest>,
    ) -> Rpc<pb::AccessKeyReply> {
        let r = req.into_inner();
        match self
            .objects
            .access_key(&r.access_key)
            .await
            .map_err(status_of)?
        {
            Some(k) => ok(pb::AccessKeyReply {
                tenant: k.tenant,
                secret_key: k.secret_key,
            }),
            None => Err(Status::not_found("no such access key")),
        }
    }

    async fn list_buckets(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::BucketList> {
        let r = req.into_inner();
        let buckets = self
            .objects
            .list_buckets(&r.tenant)
            .await
            .map_err(status_of)?;
        ok(pb::BucketList {
            buckets: buckets
                .into_iter()
                .map(|(name, created_ms)| pb::BucketEntry { name, created_ms })
                .collect(),
        })
    }

    async fn create_bucket(&self, req: Request<pb::BucketRequest>) -> Rpc<pb::Empty> {
        let r = req.into_inner();
        let creation = write_id_of(&r.write_id)?;
        self.objects
            .create_bucket(&r.tenant, &r.bucket, creation)
            .await
            .map_err(status_of)?;
        ok(pb::Empty {})
    }

    async fn delete_bucket(&self, req: Request<pb::BucketRequest>) -> Rpc<pb::Empty> {
        let r = req.into_inner();
        self.objects
            .delete_bucket(&r.tenant, &r.bucket)
            .await
            .map_err(status_of)?;
        ok(pb::Empty {})
    }

    async fn head_bucket(&self, req: Request<pb::BucketRequest>) -> Rpc<pb::Empty> {
        let r = req.into_inner();
        self.objects
            .head_bucket(&r.tenant, &r.bucket)
            .await
            .map_err(status_of)?;
        ok(pb::Empty {})
    }

    async fn put_object(&self, req: Request<Streaming<pb::PutFrame>>) -> Rpc<pb::PutReply> {
        let mut frames = req.into_inner();
        let header = match frames.next().await {
            Some(Ok(pb::PutFrame {
                frame: Some(pb::put_frame::Frame::Header(h)),
            })) => h,
            _ => return Err(bad("a PUT stream must start with its header")),
        };
        let part =
            (!header.upload_id.is_empty()).then(|| (header.upload_id.clone(), header.part_number));
        // S3 takes no conditions on UploadPart.
        let precondition = match part {
            None => precondition_of(&header.if_match, &header.if_none_match),
            Some(_) => Precondition::default(),
        };
        let target = Target {
            tenant: header.tenant,
            bucket: header.bucket,
            key: header.key,
            content_type: header.content_type,
            user_metadata: header.user_metadata.into_iter().collect(),
            part,
            write_id: WriteId::random(),
            precondition,
        };
        let commit = Arc::new(std::sync::Mutex::new(None));
        let body = body_of(frames, commit.clone());
        let keys = self
            .objects
            .tenant_keys(&target.tenant, None)
            .await
            .map_err(status_of)?;
        let check = self.objects.check_target(&target, header.declared_size);
        let data = self
            .objects
            .ingest(body, keys.clone(), target.part.is_none(), check)
            .await
            .map_err(status_of)?;
        let commit = commit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Status::aborted("the PUT stream ended without its commit frame"))?;
        if commit.size != data.size {
            return Err(bad(format!(
                "received {} bytes, the gateway sent {}",
                data.size, commit.size
            )));
        }
        if !commit.content_md5_hex.is_empty() && commit.content_md5_hex != data.md5_hex {
            return Err(status_of(ShardError::BadDigest));
        }
        let (etag, size, modified_ms) = self
            .objects
            .commit(target, &keys, data)
            .await
            .map_err(status_of)?;
        ok(pb::PutReply {
            etag,
            size,
            modified_ms,
        })
    }

    type GetObjectStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::GetFrame, Status>> + Send>>;

    async fn get_object(&self, req: Request<pb::GetRequest>) -> Rpc<Self::GetObjectStream> {
        let r = req.into_inner();
        let m = self
            .objects
            .manifest(&r.tenant, &r.bucket, &r.key)
            .await
            .map_err(status_of)?;
        let (start, end) = if r.ranged {
            (r.start, r.end)
        } else {
            (0, m.size)
        };
        if start > end || end > m.size {
            return Err(status_of(ShardError::InvalidRange));
        }
        let meta = self
            .objects
            .open_meta(&r.tenant, &m.meta)
            .await
            .map_err(status_of)?;
        let first = pb::GetFrame {
            frame: Some(pb::get_frame::Frame::Info(info(&r.key, &m, Some(meta)))),
        };
        let data = self
            .objects
            .read(&r.tenant, &m, start, end)
            .await
            .map_err(status_of)?
            .map(|piece| {
                piece
                    .map(|d| pb::GetFrame {
                        frame: Some(pb::get_frame::Frame::Data(d)),
                    })
                    .map_err(status_of)
            });
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let mut frames = futures::stream::once(async { Ok(first) })
                .chain(data)
                .boxed();
            while let Some(f) = frames.next().await {
                if tx.send(f).await.is_err() {
                    break;
                }
            }
        });
        ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn head_object(&self, req: Request<pb::ObjectRequest>) -> Rpc<pb::ObjectInfo> {
        let r = req.into_inner();
        let m = self
            .objects
            .manifest(&r.tenant, &r.bucket, &r.key)
            .await
            .map_err(status_of)?;
        let meta = self
            .objects
            .open_meta(&r.tenant, &m.meta)
            .await
            .map_err(status_of)?;
        ok(info(&r.key, &m, Some(meta)))
    }

    async fn delete_object(&self, req: Request<pb::ObjectRequest>) -> Rpc<pb::Empty> {
        let r = req.into_inner();
        self.objects
            .delete(&r.tenant, &r.bucket, &r.key)
            .await
            .map_err(status_of)?;
        ok(pb::Empty {})
    }

    async fn copy_object(&self, req: Request<pb::CopyRequest>) -> Rpc<pb::PutReply> {
        let r = req.into_inner();
        let write_id = write_id_of(&r.write_id)?;
        let (etag, size, modified_ms) = if r.upload_id.is_empty() {
            let replace = r.replace_metadata.then(|| {
                (
                    r.content_type.clone(),
                    r.user_metadata.clone().into_iter().collect(),
                )
            });
            self.objects
                .copy(
                    &r.tenant,
                    (&r.src_bucket, &r.src_key),
                    (&r.dst_bucket, &r.dst_key),
                    replace,
                    write_id,
                )
                .await
                .map_err(status_of)?
        } else {
            self.copy_part(r).await.map_err(status_of)?
        };
        ok(pb::PutReply {
            etag,
            size,
            modified_ms,
        })
    }

    async fn list_objects(&self, req: Request<pb::ListRequest>) -> Rpc<pb::ListReply> {
        let r = req.into_inner();
        let page = self
            .objects
            .list(
                &r.tenant,
                &r.bucket,
                &r.prefix,
                &r.delimiter,
                &r.start_after,
                r.max_keys,
            )
            .await
            .map_err(status_of)?;
        ok(pb::ListReply {
            objects: page.objects.iter().map(|(k, m)| info(k, m, None)).collect(),
            common_prefixes: page.common_prefixes,
            truncated: page.truncated,
            next_marker: page.next_marker,
        })
    }

    async fn create_upload(&self, req: Request<pb::CreateUploadRequest>) -> Rpc<pb::UploadId> {
        let r = req.into_inner();
        let upload_id = self
            .objects
            .create_upload(
                &r.tenant,
                &r.bucket,
                &r.key,
                r.content_type,
                r.user_metadata.into_iter().collect(),
            )
            .await
            .map_err(status_of)?;
        ok(pb::UploadId { upload_id })
    }

    async fn complete_upload(&self, req: Request<pb::CompleteRequest>) -> Rpc<pb::PutReply> {
        let r = req.into_inner();
        let parts = r
            .parts
            .into_iter()
            .map(|p| (p.part_number, p.etag))
            .collect();
        let write_id = write_id_of(&r.write_id)?;
        let precondition = precondition_of(&r.if_match, &r.if_none_match);
        let upload = (&*r.tenant, &*r.bucket, &*r.key, &*r.upload_id);
        let m = self
            .objects
            .complete_upload(upload, parts, write_id, precondition)
            .await
            .map_err(status_of)?;
        ok(pb::PutReply {
            etag: m.etag,
            size: m.size,
            modified_ms: m.modified_ms,
        })
    }

    async fn abort_upload(&self, req: Request<pb::UploadRequest>) -> Rpc<pb::Empty> {
        let r = req.into_inner();
        self.objects
            .abort_upload(&r.tenant, &r.bucket, &r.key, &r.upload_id)
            .await
            .map_err(status_of)?;
        ok(pb::Empty {})
    }

    async fn list_parts(&self, req: Request<pb::ListPartsRequest>) -> Rpc<pb::ListPartsReply> {
        let r = req.into_inner();
        let (parts, truncated) = self
            .objects
            .list_parts(
                &r.tenant,
                &r.bucket,
                &r.key,
                &r.upload_id,
                r.part_number_marker,
                r.max_parts,
            )
            .await
            .map_err(status_of)?;
        ok(pb::ListPartsReply {
            next_marker: parts.last().map(|p| p.0).unwrap_or(0),
            truncated,
            parts: parts
                .into_iter()
                .map(|(n, p)| pb::PartInfo {
                    part_number: n,
                    etag: p.etag,
                    size: p.size,
                    modified_ms: p.modified_ms,
                })
                .collect(),
        })
    }

    async fn list_uploads(
        &self,
        req: Request<pb::ListUploadsRequest>,
    ) -> Rpc<pb::ListUploadsReply> {
        let r = req.into_inner();
        let (uploads, truncated) = self
            .objects
            .list_uploads(
                &r.tenant,
                &r.bucket,
                &r.prefix,
                &r.key_marker,
                &r.upload_id_marker,
                r.max_uploads,
            )
            .await
            .map_err(status_of)?;
        ok(pb::ListUploadsReply {
            truncated,
            uploads: uploads
                .into_iter()
                .map(|u| pb::UploadInfo {
                    key: u.key,
                    upload_id: u.upload_id,
                    initiated_ms: u.initiated_ms,
                })
                .collect(),
        })
    }

    async fn create_tenant(&self, req: Request<pb::TenantSpec>) -> Rpc<pb::Empty> {
        let r = req.into_inner();
        let quota = quota_of(&r);
        self.objects
            .create_tenant(&r.tenant, quota)
            .await
            .map_err(status_of)?;
        ok(pb::Empty {})
    }

    async fn set_quota(&self, req: Request<pb::TenantSpec>) -> Rpc<pb::Empty> {
        let r = req.into_inner();
        let quota = quota_of(&r);
        self.objects
            .set_quota(&r.tenant, quota)
            .await
            .map_err(status_of)?;
        ok(pb::Empty {})
    }

    async fn show_tenant(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::TenantInfo> {
        let r = req.into_inner();
        self.objects
            .show_tenant(&r.tenant)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn list_tenants(&self, _req: Request<pb::Empty>) -> Rpc<pb::TenantList> {
        let tenants = self.objects.list_tenants().await.map_err(status_of)?;
        ok(pb::TenantList {
            tenants: tenants
                .into_iter()
                .map(|(name, created_ms)| pb::TenantEntry { name, created_ms })
                .collect(),
        })
    }

    async fn create_access_key(
        &self,
        req: Request<pb::TenantRequest>,
    ) -> Rpc<pb::AccessKeyCreated> {
        let r = req.into_inner();
        let (access_key, secret_key) = self
            .objects
            .create_access_key(&r.tenant)
            .await
            .map_err(status_of)?;
        ok(pb::AccessKeyCreated {
            tenant: r.tenant,
            access_key,
            secret_key,
        })
    }

    async fn list_access_keys(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::AccessKeyList> {
        let r = req.into_inner();
        let access_keys = self
            .objects
            .list_access_keys(&r.tenant)
            .await
            .map_err(status_of)?;
        ok(pb::AccessKeyList { access_keys })
    }

    async fn revoke_access_key(&self, req: Request<pb::AccessKeyRequest>) -> Rpc<pb::Empty> {
        let r = req.into_inner();
        self.objects
            .revoke_access_key(&r.access_key)
            .await
            .map_err(status_of)?;
        ok(pb::Empty {})
    }

    async fn master_key_step(
        &self,
        req: Request<pb::MasterKeyStepRequest>,
    ) -> Rpc<pb::MasterKeyState> {
        let r = req.into_inner();
        super::key_admin::apply_master_step(&self.objects.keys.master, &r)
            .map(Response::new)
            .map_err(status_of)
    }

    async fn forget_tenant_keys(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::Empty> {
        self.objects.keys.forget(&req.into_inner().tenant);
        ok(pb::Empty {})
    }

    async fn rotate_tenant_key(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::TenantInfo> {
        let r = req.into_inner();
        self.objects
            .rotate_tenant_key(&r.tenant)
            .await
            .map_err(status_of)?;
        self.objects
            .show_tenant(&r.tenant)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn delete_tenant(&self, req: Request<pb::TenantRequest>) -> Rpc<pb::TenantDeletion> {
        let r = req.into_inner();
        let (buckets, shredded) = self
            .objects
            .delete_tenant(&r.tenant)
            .await
            .map_err(status_of)?;
        ok(pb::TenantDeletion {
            buckets,
            master_generation: self.objects.keys.master.current().0,
            shred_error: shredded.err().map(|e| e.to_string()).unwrap_or_default(),
        })
    }

    async fn rotate_master_key(&self, _req: Request<pb::Empty>) -> Rpc<pb::MasterRotation> {
        let (generation, rewrapped) = self.objects.rotate_master().await.map_err(status_of)?;
        ok(pb::MasterRotation {
            generation,
            rewrapped,
            nodes: self.objects.chunks.host.layout().live_nodes().len() as u32,
        })
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Rpc<pb::Members> {
        let r = req.into_inner();
        let addr = r
            .addr
            .parse()
            .map_err(|e| bad(format!("node address {:?}: {e}", r.addr)))?;
        let member = Member {
            addr,
            zone: r.zone,
            capacity: if r.capacity == 0 {
                DEFAULT_CAPACITY
            } else {
                r.capacity
            },
            state: MemberState::Active,
        };
        let host = &self.objects.chunks.host;
        let layout = members::change(host, |l| members::add(l, r.node_id, member.clone()))
            .await
            .map_err(status_of)?;
        ok(members_of(&layout))
    }

    async fn drain_node(&self, req: Request<pb::NodeRequest>) -> Rpc<pb::RebalanceStatus> {
        let id = req.into_inner().node_id;
        self.change_then_rebalance(|l| members::drain(l, id)).await
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Rpc<pb::RebalanceStatus> {
        let r = req.into_inner();
        self.change_then_rebalance(|l| members::remove(l, r.node_id, r.dead))
            .await
    }

    async fn rebalance(&self, req: Request<pb::RebalanceRequest>) -> Rpc<pb::RebalanceStatus> {
        let r = req.into_inner();
        let chunks = &self.objects.chunks;
        if r.cancel {
            chunks
                .host
                .propose(ShardId::META, &Command::CancelRebalance)
                .await
                .map_err(status_of)?;
            let latest = rebalance::latest(&chunks.host).await.map_err(status_of)?;
            return ok(rebalance_status(latest.as_ref()));
        }
        if !r.dry_run {
            self.refuse_if_rebalancing().await?;
        }
        let max_moves = (r.max_moves > 0).then_some(r.max_moves as usize);
        let planned = rebalance::plan(chunks, max_moves, r.rate)
            .await
            .map_err(status_of)?;
        if !r.dry_run {
            rebalance::start(&chunks.host, &planned)
                .await
                .map_err(status_of)?;
        }
        ok(rebalance_status(Some(&planned)))
    }

    async fn rebalance_progress(&self, _req: Request<pb::Empty>) -> Rpc<pb::RebalanceStatus> {
        let latest = rebalance::latest(&self.objects.chunks.host)
            .await
            .map_err(status_of)?;
        ok(rebalance_status(latest.as_ref()))
    }

    async fn list_nodes(&self, _req: Request<pb::Empty>) -> Rpc<pb::Members> {
        let layout = members::current(&self.objects.chunks.host)
            .await
            .map_err(status_of)?;
        ok(members_of(&layout))
    }

    async fn status(&self, _req: Request<pb::Empty>) -> Rpc<pb::NodeStatus> {
        let host = &self.objects.chunks.host;
        let (chunk_bytes, chunk_count) = self.objects.chunks.store.totals();
        ok(pb::NodeStatus {
            node_id: host.id,
            addr: host
                .addr_of(host.id)
                .map(|a| a.to_string())
                .unwrap_or_default(),
            shards: host.status(),
            chunk_bytes,
            chunk_count,
            chunks_missing: self.objects.chunks.missing.len() as u64,
            rss_bytes: rss_bytes(),
            gateways: self.fresh_gateway_views(),
        })
    }

    async fn routes(&self, _req: Request<pb::Empty>) -> Rpc<pb::RouteTable> {
        let host = &self.objects.chunks.host;
        let layout = host.layout();
        ok(pb::RouteTable {
            node_id: host.id,
            shards: layout.shards,
            nodes: layout
                .live_nodes()
                .into_iter()
                .filter_map(|id| {
                    layout.addr_of(id).map(|a| pb::NodeAddress {
                        id,
                        addr: a.to_string(),
                    })
                })
                .collect(),
            leaders: host
                .status()
                .into_iter()
                .filter(|s| s.leader != 0)
                .map(|s| pb::ShardLeader {
                    shard: s.shard,
                    leader: s.leader,
                    term: s.term,
                })
                .collect(),
        })
    }

    async fn report_view(&self, req: Request<pb::GatewayView>) -> Rpc<pb::Empty> {
        let view = req.into_inner();
        let mut views = self.gateway_views.lock().unwrap_or_else(|e| e.into_inner());
        views.insert(view.gateway.clone(), (view, Instant::now()));
        ok(pb::Empty {})
    }
}

impl NodeService {
    pub fn new(objects: Objects) -> NodeService {
        NodeService {
            objects,
            gateway_views: Mutex::new(HashMap::new()),
        }
    }

    /// Gateway views younger than [`VIEW_KEPT`], by gateway name.
    fn fresh_gateway_views(&self) -> Vec<pb::GatewayView> {
        let mut views = self.gateway_views.lock().unwrap_or_else(|e| e.into_inner());
        views.retain(|_, (_, at)| at.elapsed() < VIEW_KEPT);
        let mut fresh: Vec<_> = views.values().map(|(v, _)| v.clone()).collect();
        fresh.sort_by(|a, b| a.gateway.cmp(&b.gateway));
        fresh
    }

    /// UploadPartCopy: the source range is re-chunked as a new part.
    async fn copy_part(&self, r: pb::CopyRequest) -> Result<(String, u64, i64), ShardError> {
        let m = self
            .objects
            .manifest(&r.tenant, &r.src_bucket, &r.src_key)
            .await?;
        let (start, end) = if r.ranged {
            (r.start, r.end)
        } else {
            (0, m.size)
        };
        if start > end || end > m.size {
            return Err(ShardError::InvalidRange);
        }
        let target = Target {
            tenant: r.tenant,
            bucket: r.dst_bucket,
            key: r.dst_key,
            content_type: String::new(),
            user_metadata: Default::default(),
            part: Some((r.upload_id, r.part_number)),
            write_id: WriteId::random(),
            precondition: Precondition::default(),
        };
        let keys = self.objects.tenant_keys(&target.tenant, None).await?;
        let check = self.objects.check_target(&target, Some(end - start));
        let source = self.objects.read(&target.tenant, &m, start, end).await?;
        let data = self
            .objects
            .ingest(source, keys.clone(), false, check)
            .await?;
        self.objects.commit(target, &keys, data).await
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
