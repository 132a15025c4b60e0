//! Multipart uploads: Create, UploadPart, UploadPartCopy, Complete, Abort,
//! ListParts, ListMultipartUploads.

use super::put::{condition, trailer_of, write_id, Announced};
use super::{etag, timestamp, S3Front};
use crate::rpc::pb;
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result};

/// S3's part numbers run from 1 to 10,000.
fn part_number(n: i32) -> S3Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| {
            s3_error!(
                InvalidArgument,
                "Part number must be an integer between 1 and 10000, inclusive"
            )
        })
}

/// Parses `bytes=first-last` (inclusive) into `[first, last + 1)`.
fn copy_range(header: &str) -> S3Result<(u64, u64)> {
    let bad = || {
        s3_error!(
            InvalidArgument,
            "The x-amz-copy-source-range value must be of the form bytes=first-last"
        )
    };
    let spec = header.strip_prefix("bytes=").ok_or_else(bad)?;
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a > b {
        return Err(bad());
    }
    Ok((a, b + 1))
}

impl S3Front {
    pub(super) async fn op_create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let tenant = self.tenant(&req).await?;
        let i = req.input;
        let request = pb::CreateUploadRequest {
            tenant,
            bucket: i.bucket.clone(),
            key: i.key.clone(),
            content_type: i.content_type.unwrap_or_default(),
            user_metadata: i.metadata.unwrap_or_default().into_iter().collect(),
        };
        let reply = self
            .call(request, |mut c, r| async move { c.create_upload(r).await })
            .await?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(reply.upload_id),
            ..Default::default()
        }))
    }

    pub(super) async fn op_upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let tenant = self.tenant(&req).await?;
        let trailer = trailer_of(&req.headers);
        let i = req.input;
        let header = pb::PutHeader {
            tenant,
            bucket: i.bucket,
            key: i.key,
            content_type: String::new(),
            user_metadata: Default::default(),
            upload_id: i.upload_id,
            part_number: part_number(i.part_number)?,
            declared_size: i.content_length.and_then(|n| u64::try_from(n).ok()),
            ..Default::default()
        };
        let announced = Announced {
            content_md5: i.content_md5,
            algorithm: i.checksum_algorithm,
            crc32: i.checksum_crc32,
            crc32c: i.checksum_crc32c,
            crc64nvme: i.checksum_crc64nvme,
            sha1: i.checksum_sha1,
            sha256: i.checksum_sha256,
            trailer,
        };
        let reply = self
            .stream_put(header, i.body, announced, req.trailing_headers)
            .await?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(etag(&reply.etag)),
            ..Default::default()
        }))
    }

    pub(super) async fn op_upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let tenant = self.tenant(&req).await?;
        let i = req.input;
        let CopySource::Bucket { bucket, key, .. } = &i.copy_source else {
            return Err(s3_error!(
                NotImplemented,
                "access point copy sources are not supported"
            ));
        };
        let range = i.copy_source_range.as_deref().map(copy_range).transpose()?;
        let request = pb::CopyRequest {
            tenant,
            src_bucket: bucket.to_string(),
            src_key: key.to_string(),
            dst_bucket: i.bucket,
            dst_key: i.key,
            upload_id: i.upload_id,
            part_number: part_number(i.part_number)?,
            ranged: range.is_some(),
            start: range.map(|r| r.0).unwrap_or(0),
            end: range.map(|r| r.1).unwrap_or(0),
            ..Default::default()
        };
        let reply = self
            .call(request, |mut c, r| async move { c.copy_object(r).await })
            .await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(etag(&reply.etag)),
                last_modified: Some(timestamp(reply.modified_ms)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    pub(super) async fn op_complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let tenant = self.tenant(&req).await?;
        let i = req.input;
        let listed = i
            .multipart_upload
            .and_then(|m| m.parts)
            .ok_or_else(|| s3_error!(MalformedXML, "The XML you provided was not well-formed or did not validate against our published schema"))?;
        let mut parts = Vec::with_capacity(listed.len());
        for p in listed {
            let number = p
                .part_number
                .ok_or_else(|| s3_error!(MalformedXML, "every Part needs a PartNumber"))?;
            let tag = p
                .e_tag
                .ok_or_else(|| s3_error!(MalformedXML, "every Part needs an ETag"))?;
            parts.push(pb::CompletedPart {
                part_number: part_number(number)?,
                etag: tag.value().to_string(),
            });
        }
        let request = pb::CompleteRequest {
            tenant,
            bucket: i.bucket.clone(),
            key: i.key.clone(),
            upload_id: i.upload_id,
            parts,
            if_match: condition(i.if_match),
            if_none_match: condition(i.if_none_match),
            write_id: write_id(),
        };
        let reply = self
            .call(
                request,
                |mut c, r| async move { c.complete_upload(r).await },
            )
            .await?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            location: Some(format!("/{}/{}", i.bucket, i.key)),
            bucket: Some(i.bucket),
            key: Some(i.key),
            e_tag: Some(etag(&reply.etag)),
            ..Default::default()
        }))
    }

    pub(super) async fn op_abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let tenant = self.tenant(&req).await?;
        let i = req.input;
        let request = pb::UploadRequest {
            tenant,
            bucket: i.bucket,
            key: i.key,
            upload_id: i.upload_id,
        };
        self.call(request, |mut c, r| async move { c.abort_upload(r).await })
            .await?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    pub(super) async fn op_list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let tenant = self.tenant(&req).await?;
        let i = req.input;
        let max_parts = i.max_parts.unwrap_or(1000).clamp(0, 1000);
        let request = pb::ListPartsRequest {
            tenant,
            bucket: i.bucket.clone(),
            key: i.key.clone(),
            upload_id: i.upload_id.clone(),
            part_number_marker: i.part_number_marker.unwrap_or(0).max(0) as u32,
            max_parts: max_parts as u32,
        };
        let reply = self
            .call(request, |mut c, r| async move { c.list_parts(r).await })
            .await?;
        let parts = reply
            .parts
            .into_iter()
            .map(|p| Part {
                part_number: Some(p.part_number as i32),
                e_tag: Some(etag(&p.etag)),
                size: Some(p.size as i64),
                last_modified: Some(timestamp(p.modified_ms)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(i.upload_id),
            part_number_marker: i.part_number_marker,
            next_part_number_marker: Some(reply.next_marker as i32),
            max_parts: Some(max_parts),
            is_truncated: Some(reply.truncated),
            parts: Some(parts),
            ..Default::default()
        }))
    }

    pub(super) async fn op_list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let tenant = self.tenant(&req).await?;
        let i = req.input;
        let max = i.max_uploads.unwrap_or(1000).clamp(0, 1000);
        let request = pb::ListUploadsRequest {
            tenant,
            bucket: i.bucket.clone(),
            prefix: i.prefix.clone().unwrap_or_default(),
            key_marker: i.key_marker.clone().unwrap_or_default(),
            upload_id_marker: i.upload_id_marker.clone().unwrap_or_default(),
            max_uploads: max as u32,
        };
        let reply = self
            .call(request, |mut c, r| async move { c.list_uploads(r).await })
            .await?;
        let last = reply.uploads.last().cloned();
        let uploads = reply
            .uploads
            .into_iter()
            .map(|u| MultipartUpload {
                key: Some(u.key),
                upload_id: Some(u.upload_id),
                initiated: Some(timestamp(u.initiated_ms)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(i.bucket),
            prefix: i.prefix,
            key_marker: i.key_marker,
            upload_id_marker: i.upload_id_marker,
            max_uploads: Some(max),
            is_truncated: Some(reply.truncated),
            next_key_marker: last.as_ref().map(|u| u.key.clone()),
            next_upload_id_marker: last.map(|u| u.upload_id),
            uploads: Some(uploads),
            ..Default::default()
        }))
    }
}
