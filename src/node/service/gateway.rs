//! What gateways call: the object API (buckets, objects, listings,
//! multipart uploads), the routing table and their reports.

use super::{bad, ok, NodeService, Rpc};
use crate::node::objects::Target;
use crate::rpc::pb;
use crate::rpc::{error_of, status_of};
use crate::shard::command::{ETagMatch, Manifest, ObjectMeta, Precondition};
use crate::shard::ShardError;
use crate::types::WriteId;
use bytes::Bytes;
use futures::stream::StreamExt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::{Request, Status};

/// GetObject's answer: the object's info, then its bytes.
pub(super) type GetObjectStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::GetFrame, Status>> + Send>>;

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

pub(super) async fn lookup_access_key(
    this: &NodeService,
    req: Request<pb::AccessKeyRequest>,
) -> Rpc<pb::AccessKeyReply> {
    let r = req.into_inner();
    match this
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

pub(super) async fn list_buckets(
    this: &NodeService,
    req: Request<pb::TenantRequest>,
) -> Rpc<pb::BucketList> {
    let r = req.into_inner();
    let buckets = this
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

pub(super) async fn create_bucket(
    this: &NodeService,
    req: Request<pb::BucketRequest>,
) -> Rpc<pb::Empty> {
    let r = req.into_inner();
    let creation = write_id_of(&r.write_id)?;
    this.objects
        .create_bucket(&r.tenant, &r.bucket, creation)
        .await
        .map_err(status_of)?;
    ok(pb::Empty {})
}

pub(super) async fn delete_bucket(
    this: &NodeService,
    req: Request<pb::BucketRequest>,
) -> Rpc<pb::Empty> {
    let r = req.into_inner();
    this.objects
        .delete_bucket(&r.tenant, &r.bucket)
        .await
        .map_err(status_of)?;
    ok(pb::Empty {})
}

pub(super) async fn head_bucket(
    this: &NodeService,
    req: Request<pb::BucketRequest>,
) -> Rpc<pb::Empty> {
    let r = req.into_inner();
    this.objects
        .head_bucket(&r.tenant, &r.bucket)
        .await
        .map_err(status_of)?;
    ok(pb::Empty {})
}

pub(super) async fn put_object(
    this: &NodeService,
    req: Request<Streaming<pb::PutFrame>>,
) -> Rpc<pb::PutReply> {
    let mut frames = req.into_inner();
    let header = match frames.next().await {
        Some(Ok(pb::PutFrame {
            frame: Some(pb::put_frame::Frame::Header(h)),
        })) => h,
        _ => return Err(bad("a PUT stream must start with its header")),
    };
    let write_id = write_id_of(&header.write_id)?;
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
        write_id,
        precondition,
    };
    let commit = Arc::new(std::sync::Mutex::new(None));
    let body = body_of(frames, commit.clone());
    let keys = this
        .objects
        .tenant_keys(&target.tenant, None)
        .await
        .map_err(status_of)?;
    let check = this.objects.check_target(&target, header.declared_size);
    let data = this
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
    let (etag, size, modified_ms) = this
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

pub(super) async fn get_object(
    this: &NodeService,
    req: Request<pb::GetRequest>,
) -> Rpc<GetObjectStream> {
    let r = req.into_inner();
    let m = this
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
    let meta = this
        .objects
        .open_meta(&r.tenant, &m.meta)
        .await
        .map_err(status_of)?;
    let first = pb::GetFrame {
        frame: Some(pb::get_frame::Frame::Info(info(&r.key, &m, Some(meta)))),
    };
    let data = this
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

pub(super) async fn head_object(
    this: &NodeService,
    req: Request<pb::ObjectRequest>,
) -> Rpc<pb::ObjectInfo> {
    let r = req.into_inner();
    let m = this
        .objects
        .manifest(&r.tenant, &r.bucket, &r.key)
        .await
        .map_err(status_of)?;
    let meta = this
        .objects
        .open_meta(&r.tenant, &m.meta)
        .await
        .map_err(status_of)?;
    ok(info(&r.key, &m, Some(meta)))
}

pub(super) async fn delete_object(
    this: &NodeService,
    req: Request<pb::ObjectRequest>,
) -> Rpc<pb::Empty> {
    let r = req.into_inner();
    this.objects
        .delete(&r.tenant, &r.bucket, &r.key, write_id_of(&r.write_id)?)
        .await
        .map_err(status_of)?;
    ok(pb::Empty {})
}

pub(super) async fn copy_object(
    this: &NodeService,
    req: Request<pb::CopyRequest>,
) -> Rpc<pb::PutReply> {
    let r = req.into_inner();
    let write_id = write_id_of(&r.write_id)?;
    let (etag, size, modified_ms) = if r.upload_id.is_empty() {
        let replace = r.replace_metadata.then(|| {
            (
                r.content_type.clone(),
                r.user_metadata.clone().into_iter().collect(),
            )
        });
        this.objects
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
        this.copy_part(r).await.map_err(status_of)?
    };
    ok(pb::PutReply {
        etag,
        size,
        modified_ms,
    })
}

pub(super) async fn list_objects(
    this: &NodeService,
    req: Request<pb::ListRequest>,
) -> Rpc<pb::ListReply> {
    let r = req.into_inner();
    let page = this
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
        objects: page
            .objects
            .iter()
            .map(|(key, o)| pb::ObjectInfo {
                key: key.clone(),
                size: o.size,
                etag: o.etag.clone(),
                modified_ms: o.modified_ms,
                ..Default::default()
            })
            .collect(),
        common_prefixes: page.common_prefixes,
        truncated: page.truncated,
        next_marker: page.next_marker,
    })
}

pub(super) async fn create_upload(
    this: &NodeService,
    req: Request<pb::CreateUploadRequest>,
) -> Rpc<pb::UploadId> {
    let r = req.into_inner();
    let upload_id = this
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

pub(super) async fn complete_upload(
    this: &NodeService,
    req: Request<pb::CompleteRequest>,
) -> Rpc<pb::PutReply> {
    let r = req.into_inner();
    let parts = r
        .parts
        .into_iter()
        .map(|p| (p.part_number, p.etag))
        .collect();
    let write_id = write_id_of(&r.write_id)?;
    let precondition = precondition_of(&r.if_match, &r.if_none_match);
    let upload = (&*r.tenant, &*r.bucket, &*r.key, &*r.upload_id);
    let m = this
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

pub(super) async fn abort_upload(
    this: &NodeService,
    req: Request<pb::UploadRequest>,
) -> Rpc<pb::Empty> {
    let r = req.into_inner();
    this.objects
        .abort_upload(&r.tenant, &r.bucket, &r.key, &r.upload_id)
        .await
        .map_err(status_of)?;
    ok(pb::Empty {})
}

pub(super) async fn list_parts(
    this: &NodeService,
    req: Request<pb::ListPartsRequest>,
) -> Rpc<pb::ListPartsReply> {
    let r = req.into_inner();
    let (parts, truncated) = this
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

pub(super) async fn list_uploads(
    this: &NodeService,
    req: Request<pb::ListUploadsRequest>,
) -> Rpc<pb::ListUploadsReply> {
    let r = req.into_inner();
    let (uploads, truncated) = this
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

pub(super) async fn routes(this: &NodeService, _req: Request<pb::Empty>) -> Rpc<pb::RouteTable> {
    let host = &this.objects.chunks.host;
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

pub(super) async fn report_view(
    this: &NodeService,
    req: Request<pb::GatewayView>,
) -> Rpc<pb::Empty> {
    let view = req.into_inner();
    let mut views = this.gateway_views.lock().unwrap_or_else(|e| e.into_inner());
    views.insert(view.gateway.clone(), (view, Instant::now()));
    ok(pb::Empty {})
}

impl NodeService {
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
