//! Calls to nodes, tried again where that is safe.
//!
//! An internal connection can fail under any call: an h2 GOAWAY, a reset
//! stream, a node restarting. The client must not pay for that with a 500,
//! nor, for a write, with a second application it did not ask for. So:
//!
//! - a call is sent again only when [`Failure::may_retry`] allows it for
//!   the call's kind: a read, or a write named by a write id, after any
//!   transient failure; another write only when it provably never ran
//!   (see `rpc::failure`);
//! - at most [`ATTEMPTS`] tries, none started later than [`WINDOW`] after
//!   the first, with a pause that doubles (plus jitter, so the calls a
//!   GOAWAY failed together do not come back together);
//! - each try after a failure goes to another node when one is usable
//!   (the router's choice: the shard's leader unless that was the one that
//!   failed), and every transport failure is reported to the router, which
//!   passes the node over for a while;
//! - what still fails maps to S3 once (`s3::errors`): transient failures
//!   as 503 SlowDown, which clients retry themselves.
//!
//! The kind of a call is read off the RPC it made (`NodeChannel::noting`),
//! so no call site can label a write a read.

use super::errors::s3_error_of_failure;
use super::S3Front;
use crate::gateway::router::NodeRouter;
use crate::rpc::{client_of, pb, CallKind, Failure, NodeClient};
use rand::Rng;
use s3s::S3Result;
use std::future::Future;
use std::time::{Duration, Instant};

/// Tries of one call, the first included.
const ATTEMPTS: u32 = 3;
/// Pause before the second try; doubled before each later one.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// No try starts later than this after the first: past it the client is
/// better served by a quick 503 and its own retry. It outlasts finding a
/// silent node dead (a keep-alive ping unanswered, at most 1.5 s, see
/// `rpc::pool`) and a new leader's election (at most 2 s, see
/// `config::RaftTuning`), so a read stuck on a paused node is still tried
/// elsewhere.
const WINDOW: Duration = Duration::from_secs(6);

/// Runs `attempt` with a client of the node chosen for `bucket` (and that
/// node's index in the router), and again, elsewhere, when its failure
/// allows; the last failure otherwise.
pub(super) async fn with_retries<T, F, Fut>(
    router: &NodeRouter,
    bucket: Option<(&str, &str)>,
    attempt: F,
) -> Result<T, Failure>
where
    F: FnMut(usize, NodeClient) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    retrying(router, bucket, false, attempt).await
}

/// As [`with_retries`], for a write its request names with a write id
/// though its RPC may carry unnamed writes too (PutObject also carries
/// UploadPart): the caller vouches for the id, and the write is repeated
/// as a named write is.
pub(super) async fn with_retries_named<T, F, Fut>(
    router: &NodeRouter,
    bucket: Option<(&str, &str)>,
    attempt: F,
) -> Result<T, Failure>
where
    F: FnMut(usize, NodeClient) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    retrying(router, bucket, true, attempt).await
}

async fn retrying<T, F, Fut>(
    router: &NodeRouter,
    bucket: Option<(&str, &str)>,
    named: bool,
    mut attempt: F,
) -> Result<T, Failure>
where
    F: FnMut(usize, NodeClient) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    let mut avoid = None;
    let mut tries = 0;
    loop {
        tries += 1;
        let (i, channel) = router.channel_for(bucket, avoid);
        let (channel, note) = channel.noting();
        let status = match attempt(i, client_of(channel)).await {
            Ok(r) => {
                router.report_success(i);
                return Ok(r);
            }
            Err(s) => s,
        };
        let failure = Failure::of(&status);
        match &failure {
            // The node answered: it is reachable, whatever it said.
            Failure::Answered(_) => router.report_success(i),
            Failure::NotDelivered(m) | Failure::Lost(m) => {
                tracing::debug!(node = i, tries, "call failed in transport: {m}");
                router.report_failure(i);
            }
        }
        // A failure before any call went out cannot be a write's.
        let kind = match note.kind() {
            Some(CallKind::Write) if named => CallKind::NamedWrite,
            kind => kind.unwrap_or(CallKind::Read),
        };
        let jitter = rand::thread_rng().gen_range(Duration::ZERO..=pause / 2);
        let wait = pause + jitter;
        if tries >= ATTEMPTS || !failure.may_retry(kind) || started.elapsed() + wait > WINDOW {
            return Err(failure);
        }
        tokio::time::sleep(wait).await;
        pause *= 2;
        avoid = Some(i);
    }
}

impl S3Front {
    /// Runs a unary RPC with `request` on the node the router chooses for
    /// it, with [`with_retries`]; a failure comes back as its S3 error.
    pub(super) async fn call<Req, T, F, Fut>(&self, request: Req, f: F) -> S3Result<T>
    where
        Req: Clone + Routed,
        F: Fn(NodeClient, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        with_retries(&self.router, request.bucket(), |_, client| {
            f(client, request.clone())
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(s3_error_of_failure)
    }
}

/// The bucket a request concerns, which decides the node it goes to.
pub(super) trait Routed {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A router of one node that refuses every connection.
    fn router_of_a_closed_port(dir: &std::path::Path) -> NodeRouter {
        let files = crate::tls::gateway_files_for_tests(dir);
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        NodeRouter::new(vec![closed], &files).unwrap()
    }

    /// How many tries a call took that made `rpc` and then failed with
    /// `status` (or with the RPC's own failure when `status` is None).
    async fn tries(router: &NodeRouter, write: bool, status: Option<tonic::Status>) -> u32 {
        let tries = AtomicU32::new(0);
        let request = pb::BucketRequest::default();
        let outcome: Result<(), Failure> = with_retries(router, None, |_, mut client| {
            tries.fetch_add(1, Ordering::Relaxed);
            let (request, status) = (request.clone(), status.clone());
            async move {
                let sent = if write {
                    client.delete_bucket(request).await
                } else {
                    client.head_bucket(request).await
                };
                Err(status.unwrap_or_else(|| sent.unwrap_err()))
            }
        })
        .await;
        assert!(outcome.is_err());
        tries.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn writes_are_tried_again_only_when_they_never_arrived() {
        let tmp = tempfile::tempdir().unwrap();
        let router = router_of_a_closed_port(tmp.path());
        // The connection is refused: nothing ran, so anything is repeated.
        assert_eq!(tries(&router, true, None).await, ATTEMPTS);
        assert_eq!(tries(&router, false, None).await, ATTEMPTS);
        // Lost on the way (as a reset after sending looks): a read is
        // repeated, a write is not.
        let reset = || Some(tonic::Status::internal("h2 protocol error"));
        assert_eq!(tries(&router, false, reset()).await, ATTEMPTS);
        assert_eq!(tries(&router, true, reset()).await, 1);
        // A node's final answer is never repeated.
        let answer = Some(crate::rpc::status_of(
            crate::shard::ShardError::NoSuchBucket,
        ));
        assert_eq!(tries(&router, false, answer).await, 1);
    }
}
