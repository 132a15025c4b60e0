//! The admin side: creating a cluster's files, reading its status,
//! managing tenants and their access keys, and changing the cluster's
//! members.

pub mod gc;
pub mod init;
pub mod node_commands;
pub mod nodes;
pub mod scrub;
pub mod status;
pub mod tenants;

pub use init::{init_cluster, InitOptions, S3Env};

use crate::config::AdminConfig;
use crate::rpc::{error_of, NodeClient, Pool};
use anyhow::bail;

/// Runs `call` on the first node that answers; domain errors are final.
pub(crate) async fn on_any_node<T, F, Fut>(cfg: &AdminConfig, call: F) -> anyhow::Result<T>
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
