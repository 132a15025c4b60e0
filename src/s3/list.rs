//! ListObjects (v1) and ListObjectsV2.

use super::{etag, timestamp, S3Front};
use crate::rpc::pb;
use base64::Engine;
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result};

/// S3 returns at most this many keys per page.
const MAX_KEYS: i32 = 1000;

/// Names in a listing, URL-encoded when the client asked for
/// `encoding-type=url` (aws-cli always does).
struct Encoder(bool);

impl Encoder {
    fn new(kind: &Option<EncodingType>) -> Encoder {
        Encoder(
            kind.as_ref()
                .is_some_and(|k| k.as_str() == EncodingType::URL),
        )
    }

    fn name(&self, s: &str) -> String {
        if self.0 {
            urlencoding::encode(s).into_owned()
        } else {
            s.to_string()
        }
    }

    fn opt(&self, s: &Option<String>) -> Option<String> {
        s.as_ref().map(|s| self.name(s))
    }
}

struct Page {
    reply: pb::ListReply,
    max_keys: i32,
}

impl Page {
    fn contents(&self, enc: &Encoder) -> Vec<Object> {
        self.reply
            .objects
            .iter()
            .map(|o| Object {
                key: Some(enc.name(&o.key)),
                size: Some(o.size as i64),
                e_tag: Some(etag(&o.etag)),
                last_modified: Some(timestamp(o.modified_ms)),
                storage_class: Some(ObjectStorageClass::from_static(
                    ObjectStorageClass::STANDARD,
                )),
                ..Default::default()
            })
            .collect()
    }

    fn prefixes(&self, enc: &Encoder) -> Vec<CommonPrefix> {
        self.reply
            .common_prefixes
            .iter()
            .map(|p| CommonPrefix {
                prefix: Some(enc.name(p)),
            })
            .collect()
    }
}

impl S3Front {
    async fn list_page(
        &self,
        tenant: String,
        bucket: &str,
        prefix: &Option<String>,
        delimiter: &Option<String>,
        start_after: String,
        max_keys: Option<i32>,
    ) -> S3Result<Page> {
        let max_keys = max_keys.unwrap_or(MAX_KEYS);
        if max_keys < 0 {
            return Err(s3_error!(InvalidArgument, "max-keys must not be negative"));
        }
        let max_keys = max_keys.min(MAX_KEYS);
        let request = pb::ListRequest {
            tenant,
            bucket: bucket.to_string(),
            prefix: prefix.clone().unwrap_or_default(),
            delimiter: delimiter.clone().unwrap_or_default(),
            start_after,
            max_keys: max_keys as u32,
        };
        let reply = self
            .call(request, |mut c, r| async move { c.list_objects(r).await })
            .await?;
        Ok(Page { reply, max_keys })
    }

    pub(super) async fn op_list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let tenant = self.tenant(&req).await?;
        let i = req.input;
        let page = self
            .list_page(
                tenant,
                &i.bucket,
                &i.prefix,
                &i.delimiter,
                i.marker.clone().unwrap_or_default(),
                i.max_keys,
            )
            .await?;
        let enc = Encoder::new(&i.encoding_type);
        let truncated = page.reply.truncated;
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(i.bucket),
            prefix: Some(enc.opt(&i.prefix).unwrap_or_default()),
            marker: enc.opt(&i.marker),
            delimiter: enc.opt(&i.delimiter),
            max_keys: Some(page.max_keys),
            is_truncated: Some(truncated),
            next_marker: truncated.then(|| enc.name(&page.reply.next_marker)),
            contents: Some(page.contents(&enc)),
            common_prefixes: Some(page.prefixes(&enc)),
            encoding_type: i.encoding_type,
            ..Default::default()
        }))
    }

    pub(super) async fn op_list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let tenant = self.tenant(&req).await?;
        let i = req.input;
        // The continuation token is the last name of the previous page.
        let start_after = match &i.continuation_token {
            Some(t) => {
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .map_err(|_| {
                        s3_error!(
                            InvalidArgument,
                            "The continuation token provided is incorrect"
                        )
                    })?;
                String::from_utf8(raw).map_err(|_| {
                    s3_error!(
                        InvalidArgument,
                        "The continuation token provided is incorrect"
                    )
                })?
            }
            None => i.start_after.clone().unwrap_or_default(),
        };
        let page = self
            .list_page(
                tenant,
                &i.bucket,
                &i.prefix,
                &i.delimiter,
                start_after,
                i.max_keys,
            )
            .await?;
        let enc = Encoder::new(&i.encoding_type);
        let truncated = page.reply.truncated;
        let contents = page.contents(&enc);
        let prefixes = page.prefixes(&enc);
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(i.bucket),
            prefix: Some(enc.opt(&i.prefix).unwrap_or_default()),
            delimiter: enc.opt(&i.delimiter),
            start_after: enc.opt(&i.start_after),
            max_keys: Some(page.max_keys),
            key_count: Some((contents.len() + prefixes.len()) as i32),
            is_truncated: Some(truncated),
            continuation_token: i.continuation_token,
            next_continuation_token: truncated.then(|| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&page.reply.next_marker)
            }),
            contents: Some(contents),
            common_prefixes: Some(prefixes),
            encoding_type: i.encoding_type,
            ..Default::default()
        }))
    }
}
