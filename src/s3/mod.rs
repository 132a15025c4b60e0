//! The S3 operations: each turns one s3s request into internal RPCs.
//!
//! One file per family: buckets, objects, listings, multipart uploads.
//! Every call is bound to the tenant of the access key that signed it;
//! bucket names are looked up only inside that tenant, so another
//! tenant's bucket answers exactly like a missing one.

mod bucket;
mod list;
mod multipart;
mod object;
mod put;

use crate::gateway::auth::KeyCache;
use crate::gateway::limits::RequestRates;
use crate::gateway::router::NodeRouter;
use crate::rpc::{error_of, pb, NodeClient};
use crate::shard::ShardError;
use s3s::dto::*;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};
use std::sync::Arc;

/// The gateway's implementation of the S3 API.
pub struct S3Front {
    router: Arc<NodeRouter>,
    keys: Arc<KeyCache>,
    rates: Arc<RequestRates>,
}

impl S3Front {
    pub fn new(router: Arc<NodeRouter>, keys: Arc<KeyCache>, rates: Arc<RequestRates>) -> S3Front {
        S3Front {
            router,
            keys,
            rates,
        }
    }

    /// The tenant of the request's signer, if it is within its request rate.
    async fn tenant<T>(&self, req: &S3Request<T>) -> S3Result<String> {
        let creds = req
            .credentials
            .as_ref()
            .ok_or_else(|| s3_error!(AccessDenied, "Signature is required"))?;
        let tenant = self.keys.lookup(&creds.access_key).await?.tenant;
        self.rates.check_tenant(&tenant)?;
        Ok(tenant)
    }

    /// Runs a unary RPC with `request` on the node the router chooses for
    /// it, retrying on another node when the first could not be reached
    /// (nothing was done there). Every outcome is reported to the router.
    async fn call<Req, T, F, Fut>(&self, request: Req, f: F) -> S3Result<T>
    where
        Req: Clone + Routed,
        F: Fn(NodeClient, Req) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = None;
        for attempt in 0..self.router.len().min(3) {
            let (i, client) = match request.bucket() {
                Some((tenant, bucket)) if attempt == 0 => {
                    self.router.pick_for_bucket(tenant, bucket)
                }
                _ => self.router.pick(),
            };
            match f(client, request.clone()).await {
                Ok(r) => {
                    self.router.report_success(i);
                    return Ok(r.into_inner());
                }
                Err(s) if is_unreachable(&s) => {
                    self.router.report_failure(i);
                    last = Some(s);
                }
                Err(s) => {
                    // The node answered; its answer is about the request.
                    self.router.report_success(i);
                    return Err(s3_error_of(&s));
                }
            }
        }
        Err(s3_error_of(
            &last.unwrap_or_else(|| tonic::Status::unavailable("no node")),
        ))
    }
}

/// The bucket a request concerns, which decides the node it goes to.
trait Routed {
    fn bucket(&self) -> Option<(&str, &str)>;
}

macro_rules! routed_by {
    ($field:ident: $($t:ty),*) => {
        $(impl Routed for $t {
            fn bucket(&self) -> Option<(&str, &str)> {
                Some((&self.tenant, &self.$field))
            }
        })*
    };
}

routed_by!(bucket: pb::BucketRequest, pb::ObjectRequest, pb::ListRequest, pb::CreateUploadRequest,
    pb::UploadRequest, pb::CompleteRequest, pb::ListPartsRequest, pb::ListUploadsRequest,
    pb::GetRequest);
// A copy writes its destination, so it is coordinated there.
routed_by!(dst_bucket: pb::CopyRequest);

impl Routed for pb::TenantRequest {
    fn bucket(&self) -> Option<(&str, &str)> {
        None
    }
}

/// A transport failure before the request reached a node's handler.
fn is_unreachable(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.metadata().get("x-lumbung-error").is_none()
}

/// Maps a node's answer to S3's error codes, once, here at the edge.
pub fn s3_error_of(status: &tonic::Status) -> S3Error {
    match error_of(status) {
        ShardError::NoSuchBucket => s3_error!(NoSuchBucket, "The specified bucket does not exist"),
        ShardError::NoSuchKey => s3_error!(NoSuchKey, "The specified key does not exist."),
        ShardError::BucketNotEmpty => {
            s3_error!(BucketNotEmpty, "The bucket you tried to delete is not empty")
        }
        ShardError::BucketExists => s3_error!(
            BucketAlreadyOwnedByYou,
            "Your previous request to create the named bucket succeeded and you already own it."
        ),
        ShardError::NoSuchUpload => s3_error!(
            NoSuchUpload,
            "The specified multipart upload does not exist. The upload ID might be invalid, or the multipart upload might have been aborted or completed."
        ),
        ShardError::InvalidPart(m) => s3_error!(InvalidPart, "{m}"),
        ShardError::TenantExists
        | ShardError::TenantBeingDeleted
        | ShardError::NoSuchTenant
        | ShardError::NoSuchAccessKey => {
            s3_error!(AccessDenied, "Access Denied")
        }
        ShardError::InvalidPartOrder => s3_error!(
            InvalidPartOrder,
            "The list of parts was not in ascending order. Parts must be ordered by part number."
        ),
        ShardError::EntityTooSmall(m) => s3_error!(EntityTooSmall, "{m}"),
        ShardError::BadDigest => s3_error!(
            BadDigest,
            "The Content-MD5 you specified did not match what we received."
        ),
        ShardError::InvalidRange => s3_error!(InvalidRange, "The requested range is not satisfiable"),
        ShardError::InvalidArgument(m) => s3_error!(InvalidArgument, "{m}"),
        ShardError::QuotaExceeded(m) => {
            // Not one of AWS's codes: AWS has no storage quotas. 403, as
            // MinIO and Ceph answer when a quota is full.
            let mut e = S3Error::with_message(S3ErrorCode::Custom("QuotaExceeded".into()), m);
            e.set_status_code(http::StatusCode::FORBIDDEN);
            e
        }
        ShardError::InsufficientStorage(m) => {
            // Not one of AWS's codes: 507, as WebDAV and MinIO answer.
            let mut e = S3Error::with_message(S3ErrorCode::Custom("InsufficientStorage".into()), m);
            e.set_status_code(http::StatusCode::INSUFFICIENT_STORAGE);
            e
        }
        ShardError::PreconditionFailed => s3_error!(
            PreconditionFailed,
            "At least one of the pre-conditions you specified did not hold"
        ),
        ShardError::NotLeader { .. } | ShardError::NotHolder { .. } | ShardError::Unavailable(_) => {
            s3_error!(ServiceUnavailable, "Please reduce your request rate or retry.")
        }
        // Layout changes come from the admin, never from an S3 request.
        e @ ShardError::LayoutChanged { .. } => {
            tracing::error!("unexpected: {e}");
            s3_error!(InternalError, "We encountered an internal error. Please try again.")
        }
        ShardError::Internal(m) => {
            tracing::error!("internal error: {m}");
            s3_error!(InternalError, "We encountered an internal error. Please try again.")
        }
    }
}

/// Milliseconds since the epoch as an S3 timestamp.
fn timestamp(ms: i64) -> Timestamp {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    Timestamp::from(t)
}

fn etag(value: &str) -> ETag {
    ETag::Strong(value.to_string())
}

#[async_trait::async_trait]
impl S3 for S3Front {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.op_list_buckets(req).await
    }
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.op_create_bucket(req).await
    }
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.op_head_bucket(req).await
    }
    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.op_delete_bucket(req).await
    }
    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.op_get_bucket_location(req).await
    }
    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.op_put_object(req).await
    }
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.op_get_object(req).await
    }
    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.op_head_object(req).await
    }
    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.op_delete_object(req).await
    }
    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.op_delete_objects(req).await
    }
    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        self.op_copy_object(req).await
    }
    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.op_list_objects(req).await
    }
    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.op_list_objects_v2(req).await
    }
    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.op_create_multipart_upload(req).await
    }
    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.op_upload_part(req).await
    }
    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.op_upload_part_copy(req).await
    }
    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.op_complete_multipart_upload(req).await
    }
    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.op_abort_multipart_upload(req).await
    }
    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.op_list_parts(req).await
    }
    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        self.op_list_multipart_uploads(req).await
    }
}
