//! `lumbung admin tenant …` and `key …`: tenants and access keys through
//! any reachable node.

use crate::config::AdminConfig;
use crate::rpc::{error_of, pb, NodeClient, Pool};
use anyhow::bail;

/// Runs `call` on the first node that answers; domain errors are final.
async fn on_any_node<T, F, Fut>(cfg: &AdminConfig, call: F) -> anyhow::Result<T>
where
    F: Fn(NodeClient) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let pool = Pool::new(&cfg.tls)?;
    let mut last = String::from("no nodes in the admin config");
    for addr in &cfg.nodes {
        match call(pool.client(*addr)?).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && s.metadata().get("x-lumbung-error").is_none() =>
            {
                last = format!("{addr}: {}", s.message());
            }
            Err(s) => bail!("{}", error_of(&s)),
        }
    }
    bail!("no node answered ({last})")
}

pub async fn create_tenant(cfg: &AdminConfig, tenant: &str) -> anyhow::Result<()> {
    let req = pb::TenantRequest {
        tenant: tenant.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.create_tenant(req).await }
    })
    .await
    .map(|_| ())
}

pub async fn list_tenants(cfg: &AdminConfig) -> anyhow::Result<Vec<pb::TenantEntry>> {
    on_any_node(
        cfg,
        |mut c| async move { c.list_tenants(pb::Empty {}).await },
    )
    .await
    .map(|l| l.tenants)
}

pub async fn create_key(cfg: &AdminConfig, tenant: &str) -> anyhow::Result<pb::AccessKeyCreated> {
    let req = pb::TenantRequest {
        tenant: tenant.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.create_access_key(req).await }
    })
    .await
}

pub async fn list_keys(cfg: &AdminConfig, tenant: &str) -> anyhow::Result<Vec<String>> {
    let req = pb::TenantRequest {
        tenant: tenant.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.list_access_keys(req).await }
    })
    .await
    .map(|l| l.access_keys)
}

pub async fn revoke_key(cfg: &AdminConfig, access_key: &str) -> anyhow::Result<()> {
    let req = pb::AccessKeyRequest {
        access_key: access_key.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.revoke_access_key(req).await }
    })
    .await
    .map(|_| ())
}
