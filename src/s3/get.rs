//! GetObject's internal stream: opened with retries, resumed if it breaks.
//!
//! A GET is a read, so it is retried like one (see `retry`) for as long
//! as the client has seen nothing: the gateway waits for the object's info
//! and its first piece of data before it answers, so a connection that
//! breaks in between costs the client nothing. For an object of one piece
//! (up to a chunk, 4 MiB) that covers the whole body.
//!
//! Once the status line is sent an error can no longer be reported, so a
//! stream that breaks later is resumed: a ranged GET of what is left, on
//! another node, pinned to the ETag the client was promised so the bytes
//! are of the same object. Up to [`RESUMES`] times; past that, or if the
//! object changed meanwhile, the body ends short and the client's length
//! check fails the read, which clients retry.

use super::errors::s3_error_of_failure;
use super::retry::with_retries;
use crate::gateway::router::NodeRouter;
use crate::rpc::{pb, status_of, CallKind, Failure};
use crate::shard::ShardError;
use bytes::Bytes;
use pb::get_frame::Frame;
use s3s::S3Result;
use std::sync::Arc;

/// How many times one body's stream is resumed after breaking.
const RESUMES: u32 = 3;

/// A GET whose first piece of data has arrived.
pub(super) struct Opened {
    /// The router's index of the node streaming it.
    node: usize,
    /// The object's info, the first frame of every GET.
    pub info: pb::ObjectInfo,
    /// The first piece of data; `None` when the range is empty.
    first: Option<Bytes>,
    /// The frames after it; `None` when the first piece was all of it.
    rest: Option<tonic::Streaming<pb::GetFrame>>,
}

/// Sends `request` to a node, again elsewhere while that is allowed, until
/// its info and first piece have arrived.
pub(super) async fn open(router: &NodeRouter, request: &pb::GetRequest) -> S3Result<Opened> {
    open_with_retries(router, request)
        .await
        .map_err(s3_error_of_failure)
}

async fn open_with_retries(
    router: &NodeRouter,
    request: &pb::GetRequest,
) -> Result<Opened, Failure> {
    let bucket = Some((request.tenant.as_str(), request.bucket.as_str()));
    with_retries(router, bucket, |node, mut client| {
        let request = request.clone();
        async move {
            let mut rest = client.get_object(request.clone()).await?.into_inner();
            let info = match rest.message().await? {
                Some(pb::GetFrame {
                    frame: Some(Frame::Info(info)),
                }) => info,
                _ => return Err(protocol_error("the node sent no object info")),
            };
            let first = match rest.message().await? {
                Some(pb::GetFrame {
                    frame: Some(Frame::Data(d)),
                }) => Some(d),
                None => None,
                Some(_) => return Err(protocol_error("the node sent a frame out of turn")),
            };
            let (start, end) = span(&request, &info);
            let sent = first.as_ref().map_or(0, |d| d.len() as u64);
            if sent < end.saturating_sub(start) {
                return Ok(Opened {
                    node,
                    info,
                    first,
                    rest: Some(rest),
                });
            }
            // All of it came in one piece: wait for the stream's end too,
            // whose status says whether the node finished well, and which
            // closes the stream without a reset.
            match rest.message().await? {
                None => Ok(Opened {
                    node,
                    info,
                    first,
                    rest: None,
                }),
                Some(_) => Err(protocol_error("the node sent more than was asked for")),
            }
        }
    })
    .await
}

/// The part of the object a GET asks for: `[start, end)`.
fn span(request: &pb::GetRequest, info: &pb::ObjectInfo) -> (u64, u64) {
    if request.ranged {
        (request.start, request.end)
    } else {
        (0, info.size)
    }
}

/// A node that does not follow the protocol: its answer, not a transport
/// failure, so it is neither retried nor hidden.
fn protocol_error(what: &str) -> tonic::Status {
    status_of(ShardError::Internal(what.to_string()))
}

/// The body of an opened GET: the first piece at once, the rest pumped
/// by a task that resumes the stream when it breaks.
pub(super) fn body(
    router: Arc<NodeRouter>,
    request: pb::GetRequest,
    opened: Opened,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    use futures::StreamExt;
    let (start, end) = span(&request, &opened.info);
    let first_len = opened.first.as_ref().map_or(0, |d| d.len() as u64);
    let first = futures::stream::iter(opened.first.map(Ok));
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    if let Some(frames) = opened.rest {
        let rest = Rest {
            router,
            request,
            etag: opened.info.etag,
            node: opened.node,
            next: start + first_len,
            end,
            pending: None,
            frames: Some(frames),
            resumes: RESUMES,
        };
        tokio::spawn(rest.pump(tx));
    }
    first.chain(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What is left of a body, and how to fetch it again.
struct Rest {
    router: Arc<NodeRouter>,
    /// The object (tenant, bucket, key) the client asked for.
    request: pb::GetRequest,
    /// The router's index of the node streaming it now.
    node: usize,
    /// The ETag the client was promised; a resumed stream must match it.
    etag: String,
    /// Offset in the object of the next byte to send.
    next: u64,
    /// Offset just past the last byte to send.
    end: u64,
    /// A piece a resumed stream delivered with its info, not sent yet.
    pending: Option<Bytes>,
    /// The node's stream; `None` once it broke.
    frames: Option<tonic::Streaming<pb::GetFrame>>,
    /// Resumes left.
    resumes: u32,
}

impl Rest {
    /// Sends every piece to `tx`, until the end, an error, or the client
    /// going away.
    async fn pump(mut self, tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>) {
        while self.next < self.end {
            let piece = self.next_piece().await;
            let failed = piece.is_err();
            if tx.send(piece).await.is_err() || failed {
                return;
            }
        }
        // Read the stream to its end, so it closes without a reset.
        if let Some(frames) = self.frames.as_mut() {
            let _ = frames.message().await;
        }
    }

    async fn next_piece(&mut self) -> std::io::Result<Bytes> {
        loop {
            if let Some(d) = self.pending.take() {
                self.next += d.len() as u64;
                return Ok(d);
            }
            let frame = match self.frames.as_mut() {
                Some(frames) => frames.message().await,
                None => {
                    self.resume().await?;
                    continue;
                }
            };
            let broke = match frame {
                Ok(Some(pb::GetFrame {
                    frame: Some(Frame::Data(d)),
                })) => {
                    self.next += d.len() as u64;
                    return Ok(d);
                }
                Ok(Some(_)) => {
                    return Err(std::io::Error::other("the node sent a frame out of turn"))
                }
                Ok(None) => Failure::Lost("the stream ended early".into()),
                Err(s) => Failure::of(&s),
            };
            if broke.in_transport() {
                // Passed over for a while: the resume goes elsewhere.
                self.router.report_failure(self.node);
            }
            if !broke.may_retry(CallKind::Read) || self.resumes == 0 {
                return Err(std::io::Error::other(format!(
                    "reading the object: {broke:?}"
                )));
            }
            tracing::debug!(key = %self.request.key, at = self.next, "GET stream broke, resuming: {broke:?}");
            self.resumes -= 1;
            self.frames = None;
        }
    }

    /// Reopens the stream at `next`, on the same version of the object.
    async fn resume(&mut self) -> std::io::Result<()> {
        let request = pb::GetRequest {
            ranged: true,
            start: self.next,
            end: self.end,
            ..self.request.clone()
        };
        let opened = open_with_retries(&self.router, &request)
            .await
            .map_err(|f| std::io::Error::other(format!("resuming the object: {f:?}")))?;
        if opened.info.etag != self.etag {
            return Err(std::io::Error::other(
                "the object changed while it was read",
            ));
        }
        self.node = opened.node;
        self.pending = opened.first;
        self.frames = opened.rest;
        Ok(())
    }
}
