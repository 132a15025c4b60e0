//! `lumbung admin status`: every node's health, shards and bytes.

use crate::config::AdminConfig;
use crate::rpc::{pb, Pool};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// One node as the admin sees it.
#[derive(Default, Serialize)]
pub struct NodeView {
    pub addr: String,
    pub up: bool,
    /// "up"; "stalled" (it takes connections but does not answer: its
    /// watchdog stops it within `stall_secs`); "unreachable" (connecting
    /// timed out: a partition, or a stalled node's backlog is full); or
    /// "down" (connection refused: not running).
    pub health: String,
    pub node_id: u64,
    pub error: Option<String>,
    pub chunk_bytes: u64,
    pub chunk_count: u64,
    /// Chunks its replicas record that it is still fetching.
    pub chunks_missing: u64,
    pub rss_bytes: u64,
    pub replicas: usize,
    pub leads: usize,
    /// Bytes on disk besides the chunks.
    pub raft_log_bytes: u64,
    pub state_bytes: u64,
    pub snapshot_bytes: u64,
    /// The last garbage collection this node ran, and its last sweep of
    /// orphan chunk files.
    pub last_gc: Option<GcView>,
    pub swept_files: u64,
    pub swept_bytes: u64,
    /// Its latest scrub pass, running or done.
    pub scrub: Option<ScrubView>,
}

/// A node's latest scrub pass (see `admin scrub`).
#[derive(Clone, Serialize)]
pub struct ScrubView {
    pub running: bool,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub files_total: u64,
    pub files_checked: u64,
    pub bytes_checked: u64,
    pub corrupt: u64,
    pub missing: u64,
    pub repaired: u64,
}

impl From<&pb::ScrubStatus> for ScrubView {
    fn from(s: &pb::ScrubStatus) -> ScrubView {
        ScrubView {
            running: s.running,
            started_ms: s.started_ms,
            finished_ms: s.finished_ms,
            files_total: s.files_total,
            files_checked: s.files_checked,
            bytes_checked: s.bytes_checked,
            corrupt: s.corrupt,
            missing: s.missing,
            repaired: s.repaired,
        }
    }
}

impl ScrubView {
    /// "running 40/100", "done 2.0 h ago: 1 corrupt, 0 missing, 1
    /// repaired", or "never" (counted from the node's first start).
    fn line(&self) -> String {
        if self.running {
            return format!("running {}/{}", self.files_checked, self.files_total);
        }
        if self.started_ms == 0 {
            return "none since start".into();
        }
        let hours = (crate::types::now_ms() - self.finished_ms) as f64 / 3.6e6;
        format!(
            "{hours:.1} h ago: {} corrupt, {} missing, {} repaired",
            self.corrupt, self.missing, self.repaired
        )
    }
}

/// One garbage collection (see `admin gc`).
#[derive(Clone, Serialize)]
pub struct GcView {
    pub started_ms: i64,
    pub finished_ms: i64,
    pub chunks_freed: u64,
    pub content_bytes_freed: u64,
    pub disk_bytes_freed: u64,
    pub uploads_aborted: u64,
}

impl From<&pb::GcReport> for GcView {
    fn from(r: &pb::GcReport) -> GcView {
        GcView {
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
            chunks_freed: r.chunks,
            content_bytes_freed: r.bytes,
            disk_bytes_freed: r.disk_bytes,
            uploads_aborted: r.uploads_aborted,
        }
    }
}

/// One shard, merged from what its replicas report.
#[derive(Serialize)]
pub struct ShardView {
    pub shard: u32,
    pub leader: Option<u64>,
    pub voters: Vec<u64>,
    pub last_applied: u64,
}

/// What one gateway sees of one node: its routing and steering input.
#[derive(Serialize)]
pub struct GatewayNodeView {
    pub gateway: String,
    pub node: String,
    pub node_id: u64,
    /// "ok", "slow" (work goes elsewhere while others are faster) or
    /// "failing" (passed over for a few seconds).
    pub state: String,
    pub latency_ms: f64,
    pub error_rate: f64,
    pub calls: u64,
    /// Shards this gateway sends to that node as their leader.
    pub leads: u32,
}

#[derive(Serialize)]
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    pub shards: Vec<ShardView>,
    pub gateways: Vec<GatewayNodeView>,
    /// Each member's share of replicas and bytes against its target;
    /// empty when no node could say who the members are.
    pub shares: Vec<ShareView>,
    /// The latest rebalance, running or finished.
    pub rebalance: Option<RebalanceView>,
}

/// What a member holds against what its capacity asks of it.
#[derive(Serialize)]
pub struct ShareView {
    pub node_id: u64,
    pub state: String,
    pub zone: String,
    pub capacity: u64,
    pub replicas: u32,
    pub target_replicas: f64,
    pub chunk_bytes: u64,
    pub target_bytes: f64,
}

#[derive(Serialize)]
pub struct RebalanceView {
    pub state: String,
    pub moves: usize,
    pub done: u32,
    pub bytes_copied: u64,
    pub bytes_total: u64,
}

/// A status's message and the chain of errors under it: "transport error"
/// alone does not tell a refused certificate from a closed port.
fn with_causes(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.ends_with(&c_text) {
            text.push_str(&format!(": {c_text}"));
        }
        cause = c.source();
    }
    text
}

/// The nodes to ask: the members the cluster knows (nodes added since
/// init-cluster included, removed ones left out), or the admin file's list
/// when no node says who the members are.
fn addresses(cfg: &AdminConfig, members: &Option<pb::Members>) -> Vec<std::net::SocketAddr> {
    match members {
        Some(members) => members
            .members
            .iter()
            .filter(|m| m.state != "removed")
            .filter_map(|m| m.addr.parse().ok())
            .collect(),
        None => cfg.nodes.clone(),
    }
}

/// Targets in proportion to capacity, among active members only.
fn shares(members: &pb::Members, nodes: &[NodeView]) -> Vec<ShareView> {
    let active = |m: &pb::Member| m.state == "active";
    let capacity: f64 = members
        .members
        .iter()
        .filter(|m| active(m))
        .map(|m| m.capacity as f64)
        .sum();
    let replicas: f64 = members.members.iter().map(|m| f64::from(m.replicas)).sum();
    let bytes_of = |id: u64| {
        nodes
            .iter()
            .find(|n| n.up && n.node_id == id)
            .map_or(0, |n| n.chunk_bytes)
    };
    let bytes: f64 = members
        .members
        .iter()
        .map(|m| bytes_of(m.node_id) as f64)
        .sum();
    members
        .members
        .iter()
        .filter(|m| m.state != "removed")
        .map(|m| {
            let part = if active(m) && capacity > 0.0 {
                m.capacity as f64 / capacity
            } else {
                0.0
            };
            ShareView {
                node_id: m.node_id,
                state: m.state.clone(),
                zone: m.zone.clone(),
                capacity: m.capacity,
                replicas: m.replicas,
                target_replicas: replicas * part,
                chunk_bytes: bytes_of(m.node_id),
                target_bytes: bytes * part,
            }
        })
        .collect()
}

fn rebalance_view(r: pb::RebalanceStatus) -> Option<RebalanceView> {
    r.exists.then(|| RebalanceView {
        state: r.state,
        moves: r.moves.len(),
        done: r.done,
        bytes_copied: r.bytes_copied,
        bytes_total: r.moves.iter().map(|m| m.bytes).sum(),
    })
}

/// What a node that did not answer its status call is: a new TCP
/// connection tells a stuck process (the kernel still accepts for it) from
/// one that is not running (refused) or cut off (no answer at all).
async fn health_of_silent(addr: std::net::SocketAddr) -> &'static str {
    match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => "stalled",
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => "down",
        _ => "unreachable",
    }
}

/// Asks every node for its status; nodes that do not answer are shown as
/// stalled, unreachable or down.
pub async fn collect(cfg: &AdminConfig) -> anyhow::Result<ClusterView> {
    let pool = Pool::new(&cfg.tls)?;
    let mut nodes = Vec::new();
    let mut shards: BTreeMap<u32, ShardView> = BTreeMap::new();
    let mut gateways: BTreeMap<String, Vec<pb::NodeHealth>> = BTreeMap::new();
    let ask = Duration::from_secs(5);
    let members = match tokio::time::timeout(ask, super::nodes::list(cfg)).await {
        Ok(Ok(m)) => Some(m),
        _ => None,
    };
    let rebalance = match tokio::time::timeout(ask, super::nodes::progress(cfg)).await {
        Ok(Ok(r)) => rebalance_view(r),
        _ => None,
    };
    for addr in &addresses(cfg, &members) {
        let mut client = pool.client(*addr)?;
        let reply = tokio::time::timeout(Duration::from_secs(3), client.status(pb::Empty {})).await;
        let status = match reply {
            Ok(Ok(s)) => s.into_inner(),
            other => {
                let error = match other {
                    Ok(Err(s)) => with_causes(&s),
                    _ => "timed out".to_string(),
                };
                nodes.push(NodeView {
                    addr: addr.to_string(),
                    up: false,
                    health: health_of_silent(*addr).await.into(),
                    error: Some(error),
                    ..Default::default()
                });
                continue;
            }
        };
        for g in &status.gateways {
            gateways
                .entry(g.gateway.clone())
                .or_insert_with(|| g.nodes.clone());
        }
        let leads = status
            .shards
            .iter()
            .filter(|s| s.leader == status.node_id)
            .count();
        for s in &status.shards {
            let view = shards.entry(s.shard).or_insert_with(|| ShardView {
                shard: s.shard,
                leader: None,
                voters: s.voters.clone(),
                last_applied: 0,
            });
            // A node's own claim to lead beats another's possibly stale view.
            if s.leader == status.node_id || (s.leader != 0 && view.leader.is_none()) {
                view.leader = Some(s.leader);
            }
            view.last_applied = view.last_applied.max(s.last_applied);
        }
        nodes.push(NodeView {
            addr: addr.to_string(),
            up: true,
            health: "up".into(),
            node_id: status.node_id,
            error: None,
            chunk_bytes: status.chunk_bytes,
            chunk_count: status.chunk_count,
            chunks_missing: status.chunks_missing,
            rss_bytes: status.rss_bytes,
            replicas: status.shards.len(),
            leads,
            raft_log_bytes: status.raft_log_bytes,
            state_bytes: status.state_bytes,
            snapshot_bytes: status.snapshot_bytes,
            last_gc: status.last_gc.as_ref().map(GcView::from),
            swept_files: status.swept_files,
            swept_bytes: status.swept_bytes,
            scrub: status.scrub.as_ref().map(ScrubView::from),
        });
    }
    let gateways = gateways
        .into_iter()
        .flat_map(|(gateway, seen)| {
            seen.into_iter().map(move |n| GatewayNodeView {
                gateway: gateway.clone(),
                node: n.addr,
                node_id: n.node_id,
                state: n.state,
                latency_ms: n.latency_ms,
                error_rate: n.error_rate,
                calls: n.calls,
                leads: n.leads,
            })
        })
        .collect();
    Ok(ClusterView {
        shares: members.map(|m| shares(&m, &nodes)).unwrap_or_default(),
        nodes,
        shards: shards.into_values().collect(),
        gateways,
        rebalance,
    })
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Bytes on disk by kind, and the latest garbage collection.
fn render_disk(view: &ClusterView) -> String {
    let mut out = format!(
        "\ndisk\n{:<6} {:>12} {:>12} {:>12} {:>12} {:>16}  {}\n",
        "NODE", "CHUNKS", "RAFT LOG", "STATE", "SNAPSHOTS", "ORPHANS SWEPT", "LAST SCRUB"
    );
    for n in view.nodes.iter().filter(|n| n.up) {
        out.push_str(&format!(
            "{:<6} {:>12} {:>12} {:>12} {:>12} {:>16}  {}\n",
            n.node_id,
            mib(n.chunk_bytes),
            mib(n.raft_log_bytes),
            mib(n.state_bytes),
            mib(n.snapshot_bytes),
            format!("{} ({})", n.swept_files, mib(n.swept_bytes)),
            n.scrub.as_ref().map_or("-".into(), ScrubView::line),
        ));
    }
    let latest = view
        .nodes
        .iter()
        .filter_map(|n| n.last_gc.as_ref().map(|g| (n.node_id, g)))
        .max_by_key(|(_, g)| g.finished_ms);
    match latest {
        Some((node, g)) => out.push_str(&format!(
            "last garbage collection: by node {node}, {:.0} s ago, took {:.1} s: \
             {} chunks freed ({} of content, {} on disk), {} uploads aborted\n",
            (crate::types::now_ms() - g.finished_ms) as f64 / 1000.0,
            (g.finished_ms - g.started_ms) as f64 / 1000.0,
            g.chunks_freed,
            mib(g.content_bytes_freed),
            mib(g.disk_bytes_freed),
            g.uploads_aborted,
        )),
        None => out.push_str("last garbage collection: none since the nodes started\n"),
    }
    out
}

/// The human table.
pub fn render(view: &ClusterView) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<6} {:<22} {:<11} {:>8} {:>6} {:>12} {:>8} {:>8} {:>10}\n",
        "NODE", "ADDRESS", "HEALTH", "REPLICAS", "LEADS", "CHUNK BYTES", "CHUNKS", "MISSING", "RSS"
    ));
    for n in &view.nodes {
        let id = if n.up {
            n.node_id.to_string()
        } else {
            "?".into()
        };
        out.push_str(&format!(
            "{:<6} {:<22} {:<11} {:>8} {:>6} {:>12} {:>8} {:>8} {:>10}\n",
            id,
            n.addr,
            if n.up {
                n.health.clone()
            } else {
                n.health.to_uppercase()
            },
            n.replicas,
            n.leads,
            mib(n.chunk_bytes),
            n.chunk_count,
            n.chunks_missing,
            mib(n.rss_bytes)
        ));
        if let Some(e) = &n.error {
            out.push_str(&format!("       error: {e}\n"));
        }
    }
    out.push_str(&render_disk(view));
    let leaderless = view.shards.iter().filter(|s| s.leader.is_none()).count();
    out.push_str(&format!(
        "\n{} shards, {} without a leader\n{:<6} {:<8} {:<12} {:>12}\n",
        view.shards.len(),
        leaderless,
        "SHARD",
        "LEADER",
        "VOTERS",
        "APPLIED"
    ));
    for s in &view.shards {
        let voters: Vec<String> = s.voters.iter().map(|v| v.to_string()).collect();
        out.push_str(&format!(
            "{:<6} {:<8} {:<12} {:>12}\n",
            s.shard,
            s.leader
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            voters.join(","),
            s.last_applied
        ));
    }
    if !view.shares.is_empty() {
        out.push_str(&format!(
            "\nshares\n{:<6} {:<9} {:<8} {:>8} {:>8} {:>12} {:>12}\n",
            "NODE", "STATE", "ZONE", "REPLICAS", "TARGET", "CHUNK BYTES", "TARGET"
        ));
        for s in &view.shares {
            out.push_str(&format!(
                "{:<6} {:<9} {:<8} {:>8} {:>8.1} {:>12} {:>12}\n",
                s.node_id,
                s.state,
                if s.zone.is_empty() { "-" } else { &s.zone },
                s.replicas,
                s.target_replicas,
                mib(s.chunk_bytes),
                mib(s.target_bytes as u64)
            ));
        }
    }
    if let Some(r) = &view.rebalance {
        out.push_str(&format!(
            "\nrebalance: {}, {} of {} moves, {} of {} copied\n",
            r.state,
            r.done,
            r.moves,
            mib(r.bytes_copied),
            mib(r.bytes_total)
        ));
    }
    if !view.gateways.is_empty() {
        out.push_str(&format!(
            "\nas the gateways see the nodes\n{:<22} {:<22} {:<8} {:>10} {:>7} {:>6} {:>9}\n",
            "GATEWAY", "NODE", "STATE", "LATENCY", "ERRORS", "LEADS", "CALLS"
        ));
        for g in &view.gateways {
            out.push_str(&format!(
                "{:<22} {:<22} {:<8} {:>8.1}ms {:>6.0}% {:>6} {:>9}\n",
                g.gateway,
                g.node,
                g.state,
                g.latency_ms,
                g.error_rate * 100.0,
                g.leads,
                g.calls
            ));
        }
    }
    out
}
