//! Who may call which internal RPC.
//!
//! Mutual TLS proves a peer holds a certificate of the cluster CA; the role
//! in that certificate decides what it may ask. Nodes speak Raft and
//! replicate chunks, gateways use the object API, the admin CLI the admin
//! API, and nothing else. A compromised gateway in the DMZ can therefore
//! neither join a Raft group nor create tenants or rotate keys.

use super::listener::PeerRole;
use crate::tls::Role;
use std::task::{Context, Poll};

/// The one role allowed to call `method` (the last part of the gRPC path),
/// or `None` for a method this table does not know, which nobody may call.
pub fn role_for(method: &str) -> Option<Role> {
    Some(match method {
        "Raft" | "Propose" | "Query" | "ChangeMembership" | "ShardChunks" | "LocalLayout"
        | "PutChunk" | "GetChunk" | "MasterKeyStep" | "ForgetTenantKeys" => Role::Node,
        "LookupAccessKey" | "ListBuckets" | "CreateBucket" | "DeleteBucket" | "HeadBucket"
        | "PutObject" | "GetObject" | "HeadObject" | "DeleteObject" | "CopyObject"
        | "ListObjects" | "CreateUpload" | "CompleteUpload" | "AbortUpload" | "ListParts"
        | "ListUploads" | "Routes" | "ReportView" => Role::Gateway,
        "Status" | "CreateTenant" | "ListTenants" | "ShowTenant" | "SetQuota"
        | "RotateTenantKey" | "DeleteTenant" | "RotateMasterKey" | "CreateAccessKey"
        | "ListAccessKeys" | "RevokeAccessKey" | "AddNode" | "ListNodes" | "DrainNode"
        | "RemoveNode" | "Rebalance" | "RebalanceProgress" | "CollectGarbage" | "Scrub" => {
            Role::Admin
        }
        _ => return None,
    })
}

/// Refuses a request whose peer certificate's role may not call its method.
fn check<B>(req: &http::Request<B>) -> Result<(), tonic::Status> {
    let path = req.uri().path();
    let method = path.rsplit('/').next().unwrap_or_default();
    let needed = role_for(method)
        .ok_or_else(|| tonic::Status::unimplemented(format!("no such method {path}")))?;
    let peer = req.extensions().get::<PeerRole>().and_then(|role| role.0);
    match peer {
        Some(role) if role == needed => Ok(()),
        Some(role) => Err(tonic::Status::permission_denied(format!(
            "a {role} certificate may not call {method}; it needs a {needed} certificate"
        ))),
        None => Err(tonic::Status::permission_denied(format!(
            "the peer certificate carries no Lumbung role; {method} needs a {needed} certificate"
        ))),
    }
}

/// The tower layer that runs [`check`] before every RPC.
#[derive(Clone, Copy, Default)]
pub struct RoleCheckLayer;

impl<S> tower::Layer<S> for RoleCheckLayer {
    type Service = RoleCheck<S>;

    fn layer(&self, inner: S) -> RoleCheck<S> {
        RoleCheck { inner }
    }
}

#[derive(Clone)]
pub struct RoleCheck<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for RoleCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<tonic::body::Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match check(&req) {
            Ok(()) => futures::future::Either::Left(self.inner.call(req)),
            Err(refused) => {
                tracing::warn!(path = %req.uri().path(), "refused: {}", refused.message());
                futures::future::Either::Right(std::future::ready(Ok(refused.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// proto/lumbung.proto groups the RPCs by caller under three headings;
    /// the table above must agree with it, RPC for RPC.
    #[test]
    fn every_rpc_in_the_proto_has_the_role_of_its_section() {
        let proto = include_str!("../../proto/lumbung.proto");
        let mut section = None;
        let mut seen = 0;
        for line in proto.lines().map(str::trim) {
            if line.starts_with("// ---") {
                section = Some(if line.contains("node to node") {
                    Role::Node
                } else if line.contains("gateway to node") {
                    Role::Gateway
                } else if line.contains("admin to node") {
                    Role::Admin
                } else {
                    panic!("unknown section {line}")
                });
            }
            if let Some(rest) = line.strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap().trim();
                assert_eq!(role_for(name), section, "{name}");
                seen += 1;
            }
        }
        assert!(seen > 30, "only {seen} RPCs found in the proto");
        assert_eq!(role_for("Nonsense"), None);
    }
}
