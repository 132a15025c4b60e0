//! Streaming a request body to a node: shared by PutObject and UploadPart.
//!
//! The body is forwarded in frames of [`FRAME`] bytes as it arrives, so a
//! gateway holds only a frame or two of any upload. Checksums the client
//! announced (headers, or trailers of an aws-chunked body) are computed on
//! the way; only when they match does the gateway send the commit frame.
//! Without it the node stores nothing.
//!
//! A PutObject body under one frame is still whole in the gateway when it
//! is sent; if that send fails in transport, the gateway sends it again
//! elsewhere with the same write id, which the index shard applies once.

use super::errors::s3_error_of_failure;
use super::retry::with_retries_named;
use super::{s3_error_of, S3Front};
use crate::rpc::{pb, Failure};
use base64::Engine;
use bytes::BytesMut;
use futures::StreamExt;
use s3s::checksum::ChecksumHasher;
use s3s::dto::{ChecksumAlgorithm, ETagCondition, StreamingBlob};
use s3s::{s3_error, S3Error, S3Result, TrailingHeaders};

/// Bytes per data frame sent to the node.
const FRAME: usize = 1024 * 1024;

/// Bodies larger than this (or of unknown size) are coordinated by any
/// node in turn rather than by their shard's leader: one node
/// coordinating every part of a large upload would carry all its buffers.
const SPREAD_ABOVE: u64 = 1 << 20;

/// The checksums a client announced for a body.
#[derive(Default)]
pub(super) struct Announced {
    pub content_md5: Option<String>,
    pub algorithm: Option<ChecksumAlgorithm>,
    pub crc32: Option<String>,
    pub crc32c: Option<String>,
    pub crc64nvme: Option<String>,
    pub sha1: Option<String>,
    pub sha256: Option<String>,
    /// The `x-amz-trailer` header: names a checksum sent after the body.
    pub trailer: Option<String>,
}

/// A conditional write's `If-Match` or `If-None-Match` as the internal
/// RPC carries it: `*`, an unquoted ETag, or empty for none.
pub(super) fn condition(c: Option<ETagCondition>) -> String {
    match c {
        None => String::new(),
        Some(ETagCondition::Any) => "*".into(),
        Some(ETagCondition::ETag(e)) => e.value().to_string(),
    }
}

/// A fresh id naming one client request that writes, so that the node
/// that applies it recognises the request when the gateway sends it again
/// (to another node, after the first could not be reached).
pub(super) fn write_id() -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&crate::types::WriteId::random().to_bytes())
}

/// The `x-amz-trailer` header of a request, naming a trailing checksum.
pub(super) fn trailer_of(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("x-amz-trailer")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl Announced {
    fn hasher(&self) -> ChecksumHasher {
        let mut h = ChecksumHasher::default();
        let named = |n: &str| {
            self.algorithm
                .as_ref()
                .is_some_and(|a| a.as_str().eq_ignore_ascii_case(n))
                || self
                    .trailer
                    .as_deref()
                    .is_some_and(|t| t.eq_ignore_ascii_case(&format!("x-amz-checksum-{n}")))
        };
        if self.crc32.is_some() || named("crc32") {
            h.crc32 = Some(Default::default());
        }
        if self.crc32c.is_some() || named("crc32c") {
            h.crc32c = Some(Default::default());
        }
        if self.crc64nvme.is_some() || named("crc64nvme") {
            h.crc64nvme = Some(Default::default());
        }
        if self.sha1.is_some() || named("sha1") {
            h.sha1 = Some(Default::default());
        }
        if self.sha256.is_some() || named("sha256") {
            h.sha256 = Some(Default::default());
        }
        h
    }

    /// Takes trailer values into the announced set, then compares.
    fn verify(mut self, hasher: ChecksumHasher, trailers: Option<TrailingHeaders>) -> S3Result<()> {
        if let Some(map) = trailers.and_then(|t| t.take()) {
            let get = |n: &str| map.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            self.crc32 = self.crc32.or(get("x-amz-checksum-crc32"));
            self.crc32c = self.crc32c.or(get("x-amz-checksum-crc32c"));
            self.crc64nvme = self.crc64nvme.or(get("x-amz-checksum-crc64nvme"));
            self.sha1 = self.sha1.or(get("x-amz-checksum-sha1"));
            self.sha256 = self.sha256.or(get("x-amz-checksum-sha256"));
        }
        let got = hasher.finalize();
        let pairs = [
            ("CRC32", &self.crc32, &got.checksum_crc32),
            ("CRC32C", &self.crc32c, &got.checksum_crc32c),
            ("CRC64NVME", &self.crc64nvme, &got.checksum_crc64nvme),
            ("SHA1", &self.sha1, &got.checksum_sha1),
            ("SHA256", &self.sha256, &got.checksum_sha256),
        ];
        for (name, want, got) in pairs {
            if let (Some(w), Some(g)) = (want, got) {
                if w != g {
                    return Err(s3_error!(
                        BadDigest,
                        "The {name} you specified did not match the calculated checksum."
                    ));
                }
            }
        }
        Ok(())
    }

    /// The Content-MD5 header as hex, or an InvalidDigest error.
    fn md5_hex(&self) -> S3Result<String> {
        let Some(b64) = &self.content_md5 else {
            return Ok(String::new());
        };
        match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
            Ok(raw) if raw.len() == 16 => Ok(hex::encode(raw)),
            _ => Err(s3_error!(
                InvalidDigest,
                "The Content-MD5 you specified was not valid."
            )),
        }
    }
}

impl S3Front {
    /// Sends `header`, then `body`, then the commit frame to one node.
    pub(super) async fn stream_put(
        &self,
        header: pb::PutHeader,
        body: Option<StreamingBlob>,
        announced: Announced,
        trailers: Option<TrailingHeaders>,
    ) -> S3Result<pb::PutReply> {
        let md5_hex = announced.md5_hex()?;
        let mut hasher = announced.hasher();
        // Only a PutObject is named by its write id; a part is not.
        let named = header.upload_id.is_empty() && !header.write_id.is_empty();
        let again = named.then(|| header.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::PutFrame>(2);
        // A small body is cheapest on the leader of its bucket's shard; a
        // large one is mostly chunk work, which is spread over the nodes.
        let (i, mut client) = match header.declared_size {
            Some(size) if size <= SPREAD_ABOVE => {
                self.router.pick_for_bucket(&header.tenant, &header.bucket)
            }
            _ => self.router.pick(),
        };
        let call = tokio::spawn(async move {
            client
                .put_object(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let frame = |f| pb::PutFrame { frame: Some(f) };
        let mut open = tx
            .send(frame(pb::put_frame::Frame::Header(header)))
            .await
            .is_ok();
        let mut size = 0u64;
        let mut buf = BytesMut::new();
        // A data frame went before the body ended: it is no longer whole.
        let mut flushed = false;
        let mut complete = body.is_none();
        let mut body_error: Option<S3Error> = None;
        if let Some(mut body) = body {
            // On while the node takes the body, or, for a named PUT still
            // held whole, to send it elsewhere once the node is gone.
            while open || (again.is_some() && !flushed) {
                let Some(piece) = body.next().await else {
                    complete = true;
                    break;
                };
                let piece = match piece {
                    Ok(p) => p,
                    Err(e) => {
                        body_error = Some(match e.downcast::<S3Error>() {
                            Ok(s3) => *s3,
                            Err(e) => s3_error!(IncompleteBody, "reading the request body: {e}"),
                        });
                        break;
                    }
                };
                hasher.update(&piece);
                size += piece.len() as u64;
                buf.extend_from_slice(&piece);
                if buf.len() >= FRAME {
                    if !open {
                        break; // too large to hold for another send
                    }
                    flushed = true;
                    let data = buf.split().freeze();
                    open = tx
                        .send(frame(pb::put_frame::Frame::Data(data)))
                        .await
                        .is_ok();
                }
            }
        }
        let verdict = match body_error {
            Some(e) => Err(e),
            // The node stopped listening before the body ended, so the
            // checksums cover only part of it; the node's answer says why.
            None if !complete => Ok(()),
            None => announced.verify(hasher, trailers),
        };
        // The rest of the body and the commit, once it is all read and its
        // checksums match.
        let tail: Option<Vec<pb::PutFrame>> = (verdict.is_ok() && complete).then(|| {
            let data = (!buf.is_empty()).then(|| frame(pb::put_frame::Frame::Data(buf.freeze())));
            let commit = frame(pb::put_frame::Frame::Commit(pb::PutCommit {
                content_md5_hex: md5_hex,
                size,
            }));
            data.into_iter().chain([commit]).collect()
        });
        for f in tail.iter().flatten() {
            if !open {
                break;
            }
            open = tx.send(f.clone()).await.is_ok();
        }
        // The frames after the header, when the body was held whole.
        let whole = tail.filter(|_| !flushed);
        drop(tx);
        let reply = call
            .await
            .map_err(|e| s3_error!(InternalError, "upload task: {e}"))?;
        verdict?;
        match reply {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => {
                if !Failure::of(&s).in_transport() {
                    return Err(s3_error_of(&s));
                }
                // Passed over for a while, so that no later call (the
                // send below, or the client's own retry) waits on it.
                self.router.report_failure(i);
                let (Some(header), Some(body)) = (again, whole) else {
                    return Err(s3_error_of(&s));
                };
                let bucket = (header.tenant.as_str(), header.bucket.as_str());
                let first = frame(pb::put_frame::Frame::Header(header.clone()));
                let frames: Vec<_> = [first].into_iter().chain(body).collect();
                with_retries_named(&self.router, Some(bucket), |_, mut client| {
                    let frames = tokio_stream::iter(frames.clone());
                    async move { client.put_object(frames).await }
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(s3_error_of_failure)
            }
        }
    }
}
