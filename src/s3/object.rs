//! PutObject, GetObject, HeadObject, DeleteObject(s), CopyObject.

use super::put::{condition, trailer_of, write_id, Announced};
use super::{etag, timestamp, S3Front};
use crate::rpc::pb;
use futures::StreamExt;
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result};
use std::collections::HashMap;

/// The preconditions of a GET or HEAD (RFC 9110 section 13, as S3 applies it).
struct Conditions {
    if_match: Option<ETagCondition>,
    if_none_match: Option<ETagCondition>,
    if_modified_since: Option<Timestamp>,
    if_unmodified_since: Option<Timestamp>,
}

fn matches(cond: &ETagCondition, etag: &str) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(e) => e.value() == etag,
    }
}

fn seconds(t: &Timestamp) -> i64 {
    time::OffsetDateTime::from(t.clone()).unix_timestamp()
}

impl Conditions {
    /// 412 or 304 when the object's state fails a precondition.
    fn check(&self, info: &pb::ObjectInfo) -> S3Result<()> {
        let modified = info.modified_ms.div_euclid(1000);
        if let Some(c) = &self.if_match {
            if !matches(c, &info.etag) {
                return Err(s3_error!(
                    PreconditionFailed,
                    "At least one of the pre-conditions you specified did not hold"
                ));
            }
        } else if let Some(t) = &self.if_unmodified_since {
            if modified > seconds(t) {
                return Err(s3_error!(
                    PreconditionFailed,
                    "At least one of the pre-conditions you specified did not hold"
                ));
            }
        }
        if let Some(c) = &self.if_none_match {
            if matches(c, &info.etag) {
                return Err(s3_error!(NotModified));
            }
        } else if let Some(t) = &self.if_modified_since {
            if modified <= seconds(t) {
                return Err(s3_error!(NotModified));
            }
        }
        Ok(())
    }
}

fn metadata_of(info: &pb::ObjectInfo) -> Option<Metadata> {
    (!info.user_metadata.is_empty()).then(|| info.user_metadata.clone().into_iter().collect())
}

/// Resolves an HTTP range against the object's size: `[start, end)`.
fn resolve(range: &Range, size: u64) -> S3Result<(u64, u64)> {
    let r = range
        .check(size)
        .map_err(|_| s3_error!(InvalidRange, "The requested range is not satisfiable"))?;
    Ok((r.start, r.end))
}

impl S3Front {
    pub(super) async fn op_put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let tenant = self.tenant(&req).await?;
        let trailer = trailer_of(&req.headers);
        let input = req.input;
        let header = pb::PutHeader {
            tenant,
            bucket: input.bucket,
            key: input.key,
            content_type: input.content_type.unwrap_or_default(),
            user_metadata: input.metadata.unwrap_or_default().into_iter().collect(),
            upload_id: String::new(),
            part_number: 0,
            declared_size: input.content_length.and_then(|n| u64::try_from(n).ok()),
            if_match: condition(input.if_match),
            if_none_match: condition(input.if_none_match),
            write_id: write_id(),
        };
        let announced = Announced {
            content_md5: input.content_md5,
            algorithm: input.checksum_algorithm,
            crc32: input.checksum_crc32,
            crc32c: input.checksum_crc32c,
            crc64nvme: input.checksum_crc64nvme,
            sha1: input.checksum_sha1,
            sha256: input.checksum_sha256,
            trailer,
        };
        let reply = self
            .stream_put(header, input.body, announced, req.trailing_headers)
            .await?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&reply.etag)),
            ..Default::default()
        }))
    }

    async fn object_info(&self, tenant: &str, bucket: &str, key: &str) -> S3Result<pb::ObjectInfo> {
        let req = pb::ObjectRequest {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            write_id: Default::default(),
        };
        self.call(req, |mut c, r| async move { c.head_object(r).await })
            .await
    }

    pub(super) async fn op_get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let tenant = self.tenant(&req).await?;
        let input = req.input;
        let conditions = Conditions {
            if_match: input.if_match,
            if_none_match: input.if_none_match,
            if_modified_since: input.if_modified_since,
            if_unmodified_since: input.if_unmodified_since,
        };
        // A range needs the size first; so does a precondition we can
        // refuse before any byte moves.
        let mut range = None;
        if let Some(r) = &input.range {
            let info = self.object_info(&tenant, &input.bucket, &input.key).await?;
            conditions.check(&info)?;
            range = Some(resolve(r, info.size)?);
        }
        let request = pb::GetRequest {
            tenant,
            bucket: input.bucket,
            key: input.key,
            ranged: range.is_some(),
            start: range.map(|r| r.0).unwrap_or(0),
            end: range.map(|r| r.1).unwrap_or(0),
        };
        let opened = super::get::open(&self.router, &request).await?;
        let info = opened.info.clone();
        conditions.check(&info)?;
        let (start, end) = range.unwrap_or((0, info.size));
        let body = super::get::body(self.router.clone(), request, opened);
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(body)),
            content_length: Some((end - start) as i64),
            content_range: range
                .map(|(s, e)| format!("bytes {s}-{}/{}", e.saturating_sub(1), info.size)),
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&info.etag)),
            last_modified: Some(timestamp(info.modified_ms)),
            content_type: (!info.content_type.is_empty()).then(|| info.content_type.clone()),
            metadata: metadata_of(&info),
            ..Default::default()
        }))
    }

    pub(super) async fn op_head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let tenant = self.tenant(&req).await?;
        let input = req.input;
        let info = self.object_info(&tenant, &input.bucket, &input.key).await?;
        Conditions {
            if_match: input.if_match,
            if_none_match: input.if_none_match,
            if_modified_since: input.if_modified_since,
            if_unmodified_since: input.if_unmodified_since,
        }
        .check(&info)?;
        let (length, content_range) = match &input.range {
            Some(r) => {
                let (s, e) = resolve(r, info.size)?;
                (
                    e - s,
                    Some(format!("bytes {s}-{}/{}", e.saturating_sub(1), info.size)),
                )
            }
            None => (info.size, None),
        };
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(length as i64),
            content_range,
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&info.etag)),
            last_modified: Some(timestamp(info.modified_ms)),
            content_type: (!info.content_type.is_empty()).then(|| info.content_type.clone()),
            metadata: metadata_of(&info),
            ..Default::default()
        }))
    }

    async fn delete_one(&self, tenant: &str, bucket: &str, key: &str) -> S3Result<()> {
        let req = pb::ObjectRequest {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            write_id: write_id(),
        };
        self.call(req, |mut c, r| async move { c.delete_object(r).await })
            .await
            .map(|_| ())
    }

    pub(super) async fn op_delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let tenant = self.tenant(&req).await?;
        self.delete_one(&tenant, &req.input.bucket, &req.input.key)
            .await?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    pub(super) async fn op_delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let tenant = self.tenant(&req).await?;
        let input = req.input;
        if input.delete.objects.len() > 1000 {
            return Err(s3_error!(
                MalformedXML,
                "at most 1000 keys may be deleted at once"
            ));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        // A few at a time: each is one replicated write.
        let bucket = &input.bucket;
        let tenant = &tenant;
        let outcomes: Vec<_> = futures::stream::iter(input.delete.objects)
            .map(|obj| async move {
                let r = self.delete_one(tenant, bucket, &obj.key).await;
                (obj, r)
            })
            .buffered(16)
            .collect()
            .await;
        for (obj, outcome) in outcomes {
            match outcome {
                Ok(()) => {
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(obj.key),
                            ..Default::default()
                        })
                    }
                }
                Err(e) => errors.push(Error {
                    code: Some(e.code().as_str().to_string()),
                    key: Some(obj.key),
                    message: e.message().map(str::to_string),
                    version_id: None,
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    pub(super) async fn op_copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let tenant = self.tenant(&req).await?;
        let input = req.input;
        let CopySource::Bucket { bucket, key, .. } = &input.copy_source else {
            return Err(s3_error!(
                NotImplemented,
                "access point copy sources are not supported"
            ));
        };
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let request = pb::CopyRequest {
            tenant,
            src_bucket: bucket.to_string(),
            src_key: key.to_string(),
            dst_bucket: input.bucket,
            dst_key: input.key,
            replace_metadata: replace,
            content_type: input.content_type.unwrap_or_default(),
            user_metadata: input
                .metadata
                .unwrap_or_default()
                .into_iter()
                .collect::<HashMap<_, _>>(),
            write_id: write_id(),
            ..Default::default()
        };
        let reply = self
            .call(request, |mut c, r| async move { c.copy_object(r).await })
            .await?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(etag(&reply.etag)),
                last_modified: Some(timestamp(reply.modified_ms)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}
