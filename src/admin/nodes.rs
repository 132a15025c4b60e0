//! `lumbung admin node …`: the cluster's members.

use super::on_any_node;
use crate::config::AdminConfig;
use crate::rpc::{pb, Pool};
use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;

/// Asks the node at `addr` who it is, then makes it a member. It must be
/// running with a certificate of the cluster CA.
pub async fn add(
    cfg: &AdminConfig,
    addr: SocketAddr,
    zone: &str,
    capacity: Option<u64>,
) -> anyhow::Result<pb::Members> {
    let pool = Pool::new(&cfg.tls)?;
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        pool.client(addr)?.status(pb::Empty {}),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{addr} did not answer within 10 s"))?
    .with_context(|| format!("asking the node at {addr} who it is; is it running?"))?
    .into_inner();
    let request = pb::AddNodeRequest {
        node_id: status.node_id,
        addr: addr.to_string(),
        zone: zone.to_string(),
        capacity: capacity.unwrap_or(0),
    };
    on_any_node(cfg, |mut c| {
        let r = request.clone();
        async move { c.add_node(r).await }
    })
    .await
}

pub async fn list(cfg: &AdminConfig) -> anyhow::Result<pb::Members> {
    on_any_node(cfg, |mut c| async move { c.list_nodes(pb::Empty {}).await }).await
}

/// The human table of members.
pub fn render(members: &pb::Members) -> String {
    let mut out = format!(
        "layout epoch {}\n{:<6} {:<22} {:<10} {:<10} {:>16} {:>8}\n",
        members.epoch, "NODE", "ADDRESS", "STATE", "ZONE", "CAPACITY", "REPLICAS"
    );
    for m in &members.members {
        out.push_str(&format!(
            "{:<6} {:<22} {:<10} {:<10} {:>16} {:>8}\n",
            m.node_id,
            m.addr,
            m.state,
            if m.zone.is_empty() { "-" } else { &m.zone },
            m.capacity,
            m.replicas
        ));
    }
    out
}
