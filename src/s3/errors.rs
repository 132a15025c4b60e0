//! Every failed internal call becomes an S3 error here, once, at the edge.
//!
//! A node's answer maps to the S3 code that means the same. A transport
//! failure, a shard without a reachable leader and any overload all mean
//! "not now", which S3 spells 503 SlowDown: SDKs and tools retry it with
//! backoff (the gateway adds `Retry-After`, see `gateway::with_retry_after`).
//! So neither a reset connection nor a busy shard ever answers 500; only a
//! node's own `Internal` answer (a bug or a broken disk) does.

use crate::rpc::Failure;
use crate::shard::ShardError;
use s3s::{s3_error, S3Error, S3ErrorCode};

/// Maps the status a call failed with to an S3 error.
pub fn s3_error_of(status: &tonic::Status) -> S3Error {
    s3_error_of_failure(Failure::of(status))
}

/// Maps a classified failure to an S3 error.
pub fn s3_error_of_failure(failure: Failure) -> S3Error {
    match failure {
        Failure::Answered(e) => s3_error_of_answer(e),
        Failure::NotDelivered(m) | Failure::Lost(m) => {
            tracing::debug!("call to a node failed in transport: {m}");
            slow_down()
        }
    }
}

/// 503 SlowDown: try again shortly.
pub fn slow_down() -> S3Error {
    s3_error!(SlowDown, "Please reduce your request rate.")
}

/// Maps a node's answer to the S3 code that means the same.
fn s3_error_of_answer(e: ShardError) -> S3Error {
    match e {
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
            // Not one of AWS's codes: 507, as WebDAV and MinIO answer. Not
            // SlowDown: a full disk does not clear up within a retry.
            let mut e = S3Error::with_message(S3ErrorCode::Custom("InsufficientStorage".into()), m);
            e.set_status_code(http::StatusCode::INSUFFICIENT_STORAGE);
            e
        }
        ShardError::PreconditionFailed => s3_error!(
            PreconditionFailed,
            "At least one of the pre-conditions you specified did not hold"
        ),
        // Stale chunks are touched again inside the node; one reaching
        // here means the upload stalled past the grace: send it again.
        ShardError::NotLeader { .. }
        | ShardError::NotHolder { .. }
        | ShardError::Unavailable(_)
        | ShardError::ChunksStale => slow_down(),
        // Layout changes come from the admin, never from an S3 request; if
        // one does meet one, trying again is still the right advice.
        e @ ShardError::LayoutChanged { .. } => {
            tracing::error!("unexpected: {e}");
            slow_down()
        }
        ShardError::Internal(m) => {
            tracing::error!("internal error: {m}");
            s3_error!(InternalError, "We encountered an internal error. Please try again.")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::status_of;

    fn status_and_code(e: S3Error) -> (u16, String) {
        let status = e.status_code().map_or(0, |s| s.as_u16());
        (status, e.code().as_str().to_string())
    }

    #[test]
    fn no_transport_failure_is_a_500() {
        let slow = (503, "SlowDown".to_string());
        for s in [
            tonic::Status::internal("h2 protocol error: http2 error"),
            tonic::Status::unknown("error reading a body from connection"),
            tonic::Status::unavailable("tcp connect error"),
            tonic::Status::cancelled("operation was canceled"),
            tonic::Status::resource_exhausted("too_many_resets"),
        ] {
            assert_eq!(status_and_code(s3_error_of(&s)), slow, "{s:?}");
        }
        // The node's role check refusing this gateway's certificate is no
        // transport failure and no retry mends it: a misconfiguration.
        let refused = tonic::Status::permission_denied("wrong role");
        assert_eq!(status_and_code(s3_error_of(&refused)).0, 500);
    }

    #[test]
    fn a_busy_shard_is_slow_down_and_a_nodes_answer_keeps_its_meaning() {
        let mapped = |e: ShardError| status_and_code(s3_error_of(&status_of(e)));
        let slow = (503, "SlowDown".to_string());
        assert_eq!(mapped(ShardError::Unavailable("no leader".into())), slow);
        assert_eq!(mapped(ShardError::NotLeader { leader: None }), slow);
        assert_eq!(mapped(ShardError::LayoutChanged { now: 3 }), slow);
        assert_eq!(mapped(ShardError::NoSuchKey), (404, "NoSuchKey".into()));
        assert_eq!(
            mapped(ShardError::BucketExists),
            (409, "BucketAlreadyOwnedByYou".into())
        );
        // A node's own internal error is still one.
        assert_eq!(
            mapped(ShardError::Internal("disk".into())),
            (500, "InternalError".into())
        );
    }
}
