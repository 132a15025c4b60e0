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

pub async fn drain(cfg: &AdminConfig, node_id: u64) -> anyhow::Result<pb::RebalanceStatus> {
    on_any_node(cfg, |mut c| async move {
        c.drain_node(pb::NodeRequest { node_id }).await
    })
    .await
}

pub async fn remove(
    cfg: &AdminConfig,
    node_id: u64,
    dead: bool,
) -> anyhow::Result<pb::RebalanceStatus> {
    on_any_node(cfg, |mut c| async move {
        c.remove_node(pb::RemoveNodeRequest { node_id, dead }).await
    })
    .await
}

/// Plans (and unless `dry_run`, starts) a rebalance, or cancels one.
pub async fn rebalance(
    cfg: &AdminConfig,
    request: pb::RebalanceRequest,
) -> anyhow::Result<pb::RebalanceStatus> {
    on_any_node(cfg, |mut c| {
        let r = request;
        async move { c.rebalance(r).await }
    })
    .await
}

pub async fn progress(cfg: &AdminConfig) -> anyhow::Result<pb::RebalanceStatus> {
    on_any_node(cfg, |mut c| async move {
        c.rebalance_progress(pb::Empty {}).await
    })
    .await
}

/// The plan as a table: shard, from, to, bytes.
pub fn render_plan(status: &pb::RebalanceStatus) -> String {
    if status.moves.is_empty() {
        return "nothing to move: every node holds its share\n".into();
    }
    let mut out = format!("{:>6} {:>6} {:>6} {:>14}\n", "SHARD", "FROM", "TO", "BYTES");
    for m in &status.moves {
        out.push_str(&format!(
            "{:>6} {:>6} {:>6} {:>14}\n",
            m.shard, m.from, m.to, m.bytes
        ));
    }
    let bytes: u64 = status.moves.iter().map(|m| m.bytes).sum();
    out.push_str(&format!(
        "{} moves, {bytes} bytes to copy\n",
        status.moves.len()
    ));
    out
}

/// How long `watch` waits for any node to answer before giving up.
const SILENCE: Duration = Duration::from_secs(60);

/// Follows the running rebalance with a progress bar (moves done, bytes
/// copied, rate, time left) until it ends; returns how it ended.
pub async fn watch(cfg: &AdminConfig, id: i64) -> anyhow::Result<pb::RebalanceStatus> {
    let mut status = progress(cfg).await?;
    let total: u64 = status.moves.iter().map(|m| m.bytes).sum();
    let bar = indicatif::ProgressBar::new(total.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    let mut last_answer = std::time::Instant::now();
    loop {
        if status.id != id {
            bar.abandon_with_message("another rebalance replaced this one");
            return Ok(status);
        }
        bar.set_position(status.bytes_copied.min(total.max(1)));
        bar.set_message(format!("moves {}/{}", status.done, status.moves.len()));
        if status.state != "running" {
            bar.finish_with_message(format!(
                "moves {}/{}: {}",
                status.done,
                status.moves.len(),
                status.state
            ));
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A node dying mid-rebalance is expected; keep asking the others,
        // and give up only when none has answered for a while.
        match progress(cfg).await {
            Ok(next) => {
                status = next;
                last_answer = std::time::Instant::now();
            }
            Err(e) if last_answer.elapsed() > SILENCE => {
                bar.abandon();
                anyhow::bail!(
                    "no node answered for {SILENCE:?} ({e:#}); the rebalance goes on in the cluster, follow it again with `rebalance --resume`"
                );
            }
            Err(_) => {}
        }
    }
}
