//! What a failed internal call says about its request, decided once, here.
//!
//! A node answers about a request with a [`ShardError`], which
//! [`status_of`](super::status_of) carries in the `x-lumbung-error`
//! metadata of the status. A status without it did not come from a
//! handler: the connection failed (refused, TLS, a reset, a GOAWAY, a ping
//! that went unanswered), or HTTP/2 or tonic refused the call. Those are
//! transport failures, and they split in two by what the caller may
//! assume:
//!
//! - **not delivered**: the request provably never reached a handler (no
//!   connection could be made; the node refused the stream unread, or
//!   gRPC's `Unavailable` with no other cause). Any call may be sent
//!   again: nothing was done.
//! - **lost**: the request may have reached the node, which may or may not
//!   have applied it. A read may be sent again; so may a write the gateway
//!   names with a write id, which the node applies once however often it
//!   arrives. Any other write must not be, because a second run of it can
//!   answer wrongly or undo a later write (a repeated delete after
//!   someone's PUT).
//!
//! Whether a call is a read is a property of its RPC method, so it is one
//! table here ([`CallKind::of_method`]); a method missing from it counts
//! as a write, the safe default.

use crate::shard::ShardError;

/// How a call failed, as far as its caller can know.
#[derive(Debug, PartialEq)]
pub enum Failure {
    /// The node answered about the request; this is its answer.
    Answered(ShardError),
    /// The request never reached a handler: nothing was done.
    NotDelivered(String),
    /// The connection failed after the request may have reached the node.
    Lost(String),
}

/// Whether a call only reads, which decides if it may be repeated blindly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CallKind {
    /// Changes nothing: running it twice answers as running it once.
    Read = 1,
    /// A write its request names with a write id (or a creation id), which
    /// the node applies once however often it arrives
    /// (`State::apply_once`): repeated as a read is.
    NamedWrite = 2,
    /// May change state: repeated only when it provably did not run.
    Write = 3,
}

impl CallKind {
    /// The kind of the RPC `method` of the Node service (as in the proto).
    pub fn of_method(method: &str) -> CallKind {
        match method {
            "ListBuckets" | "HeadBucket" | "GetObject" | "HeadObject" | "ListObjects"
            | "ListParts" | "ListUploads" | "LookupAccessKey" | "Routes" | "Query" | "GetChunk"
            | "ShardChunks" | "LocalLayout" | "Status" | "ListTenants" | "ShowTenant"
            | "ListAccessKeys" | "ListNodes" | "RebalanceProgress" => CallKind::Read,
            "CreateBucket" | "DeleteObject" | "CopyObject" | "CompleteUpload" => {
                CallKind::NamedWrite
            }
            _ => CallKind::Write,
        }
    }

    /// The kind of a call by its HTTP/2 path, `/lumbung.Node/<method>`.
    pub fn of_path(path: &str) -> CallKind {
        path.rsplit('/')
            .next()
            .map_or(CallKind::Write, CallKind::of_method)
    }
}

impl Failure {
    /// Classifies the status a call failed with.
    pub fn of(status: &tonic::Status) -> Failure {
        if let Some(v) = status.metadata().get(super::ERROR_DETAIL) {
            let decoded = v
                .to_str()
                .ok()
                .and_then(|s| hex::decode(s).ok())
                .and_then(|b| crate::shard::decode::<ShardError>(&b).ok());
            // A node answered, in words this build cannot read: still its
            // answer about the request, not a transport failure.
            return Failure::Answered(decoded.unwrap_or_else(|| {
                ShardError::Internal(format!("undecodable answer: {}", status.message()))
            }));
        }
        let what = format!("{:?}: {}", status.code(), status.message());
        if !from_transport(status.code()) {
            // A handler's own refusal (`Status::not_found` and the like)
            // or the role check: the node answered, though not in words.
            return Failure::Answered(ShardError::Internal(what));
        }
        if never_delivered(status) {
            Failure::NotDelivered(what)
        } else {
            Failure::Lost(what)
        }
    }

    /// Whether the connection failed rather than the node answering: the
    /// node is then passed over for a while.
    pub fn in_transport(&self) -> bool {
        !matches!(self, Failure::Answered(_))
    }

    /// Whether a call of `kind` that failed so may be sent again, on any
    /// node: always when it never arrived; a read whenever the failure is
    /// transient, and so a named write; any write also when the node said
    /// it is not the shard's leader (it refused before proposing). Another
    /// write the node answered `Unavailable` is not repeated: that answer
    /// also comes after a proposal that did not commit in time, and may
    /// commit yet.
    pub fn may_retry(&self, kind: CallKind) -> bool {
        match self {
            Failure::NotDelivered(_) => true,
            Failure::Lost(_) => kind != CallKind::Write,
            Failure::Answered(ShardError::NotLeader { .. }) => true,
            Failure::Answered(ShardError::Unavailable(_)) => kind != CallKind::Write,
            Failure::Answered(_) => false,
        }
    }

    /// The failure as a domain error: transport failures are
    /// `Unavailable`, which callers treat as transient.
    pub fn into_error(self) -> ShardError {
        match self {
            Failure::Answered(e) => e,
            Failure::NotDelivered(m) => ShardError::Unavailable(format!("not delivered ({m})")),
            Failure::Lost(m) => ShardError::Unavailable(format!("no answer ({m})")),
        }
    }
}

/// Whether a failed connection, HTTP/2 or tonic itself can produce a
/// status with this code; any other code without a node's answer came
/// from a handler (a replica that is not there, a role refused).
fn from_transport(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable | Unknown | Internal | Cancelled | DeadlineExceeded | ResourceExhausted
    )
}

/// Whether a status without a node's answer proves the request was never
/// handed to a handler.
fn never_delivered(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut ping_timed_out = false;
    while let Some(e) = source {
        // Our connector failed (TCP, TLS, its timeout): no stream existed.
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        // A keep-alive ping that went unanswered closes the connection
        // under every call on it, delivered ones too.
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            ping_timed_out = true;
        }
        source = e.source();
    }
    // Otherwise gRPC's Unavailable without a node's answer: the stream was
    // refused unread (REFUSED_STREAM) or no connection could be used.
    status.code() == tonic::Code::Unavailable && !ping_timed_out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::status_of;

    #[test]
    fn a_nodes_answer_is_its_answer_whatever_the_code() {
        for e in [
            ShardError::NoSuchKey,
            ShardError::Internal("disk".into()),
            ShardError::Unavailable("no leader".into()),
            ShardError::NotLeader { leader: Some(2) },
        ] {
            assert_eq!(Failure::of(&status_of(e.clone())), Failure::Answered(e));
        }
    }

    #[test]
    fn a_status_without_an_answer_is_a_transport_failure() {
        // What h2 resets, GOAWAYs and broken bodies turn into in tonic.
        for s in [
            tonic::Status::internal("h2 protocol error: http2 error"),
            tonic::Status::unknown("error reading a body from connection"),
            tonic::Status::cancelled("operation was canceled"),
            tonic::Status::resource_exhausted("h2 protocol error: too_many_resets"),
            tonic::Status::deadline_exceeded("timeout expired"),
        ] {
            assert!(matches!(Failure::of(&s), Failure::Lost(_)), "{s:?}");
            assert!(matches!(
                Failure::of(&s).into_error(),
                ShardError::Unavailable(_)
            ));
        }
        let refused = tonic::Status::unavailable("h2 protocol error: refused stream");
        assert!(matches!(Failure::of(&refused), Failure::NotDelivered(_)));
        let connect = tonic::Status::from_error(Box::new(tonic::ConnectError(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
        )));
        assert!(matches!(Failure::of(&connect), Failure::NotDelivered(_)));
    }

    #[test]
    fn a_handlers_own_refusal_is_an_answer_not_a_transport_failure() {
        // A node without a replica of the shard, or a role it refused:
        // the caller must not take the node for unreachable.
        for s in [
            tonic::Status::not_found("no replica of shard 0 here"),
            tonic::Status::permission_denied("a gateway certificate may not call Raft"),
            tonic::Status::invalid_argument("chunk id must be 32 bytes"),
        ] {
            assert!(
                matches!(Failure::of(&s), Failure::Answered(ShardError::Internal(_))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn reads_are_retried_after_any_transient_failure_writes_only_when_nothing_ran() {
        use CallKind::{NamedWrite, Read, Write};
        let lost = Failure::Lost("reset".into());
        let refused = Failure::NotDelivered("refused".into());
        let busy = Failure::Answered(ShardError::Unavailable("no commit in time".into()));
        let moved = Failure::Answered(ShardError::NotLeader { leader: None });
        let final_ = Failure::Answered(ShardError::NoSuchBucket);
        assert!(lost.may_retry(Read) && !lost.may_retry(Write));
        assert!(refused.may_retry(Read) && refused.may_retry(Write));
        assert!(busy.may_retry(Read) && !busy.may_retry(Write));
        assert!(moved.may_retry(Read) && moved.may_retry(Write));
        assert!(!final_.may_retry(Read) && !final_.may_retry(Write));
        // A write the node applies once per id is repeated as a read is.
        for f in [&lost, &refused, &busy, &moved, &final_] {
            assert_eq!(f.may_retry(NamedWrite), f.may_retry(Read), "{f:?}");
        }
    }

    #[test]
    fn only_listed_methods_are_reads() {
        assert_eq!(
            CallKind::of_path("/lumbung.Node/HeadBucket"),
            CallKind::Read
        );
        assert_eq!(CallKind::of_path("/lumbung.Node/GetObject"), CallKind::Read);
        assert_eq!(
            CallKind::of_path("/lumbung.Node/CreateBucket"),
            CallKind::NamedWrite
        );
        assert_eq!(
            CallKind::of_path("/lumbung.Node/DeleteObject"),
            CallKind::NamedWrite
        );
        assert_eq!(
            CallKind::of_path("/lumbung.Node/DeleteBucket"),
            CallKind::Write
        );
        assert_eq!(
            CallKind::of_path("/lumbung.Node/SomethingNew"),
            CallKind::Write
        );
        assert_eq!(CallKind::of_path(""), CallKind::Write);
    }

    #[test]
    fn every_read_named_is_a_method_of_the_proto() {
        let proto = include_str!("../../proto/lumbung.proto");
        let methods: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        let reads: Vec<&&str> = methods
            .iter()
            .filter(|m| CallKind::of_method(m) == CallKind::Read)
            .collect();
        // A misspelt name in the table would silently make a read a write.
        assert_eq!(reads.len(), 19, "reads found in the proto: {reads:?}");
        let named = methods
            .iter()
            .filter(|m| CallKind::of_method(m) == CallKind::NamedWrite)
            .count();
        assert_eq!(named, 4, "named writes found in the proto");
    }
}
