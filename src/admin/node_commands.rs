//! The `lumbung admin node …` and `admin rebalance` commands: what they
//! ask the cluster (through [`nodes`]) and what they print.

use super::nodes;
use crate::config::AdminConfig;
use clap::{Args, Subcommand};

/// `lumbung admin node …`.
#[derive(Subcommand)]
pub enum NodeCommand {
    /// Make a running node (certified by the cluster CA) a member. It
    /// holds no replicas until a rebalance.
    Add {
        /// The node's internal address.
        addr: std::net::SocketAddr,
        /// Failure domain (rack, room): replicas of a shard go to distinct
        /// zones when there are enough.
        #[arg(long, default_value = "")]
        zone: String,
        /// The node's share of data relative to the others (bytes of disk,
        /// say); default: the same as the first nodes.
        #[arg(long)]
        capacity: Option<u64>,
    },
    /// Every member with its state, zone, capacity and replica count.
    List,
    /// Move every replica off a node (a rebalance, followed to its end);
    /// it is then drained and can be stopped and removed.
    Drain { id: u64 },
    /// Remove a drained node for good; with --dead, a node that is gone,
    /// whose replicas are re-created elsewhere until every shard is at RF.
    Remove {
        id: u64,
        #[arg(long)]
        dead: bool,
    },
}

/// `lumbung admin rebalance …`.
#[derive(Args)]
pub struct RebalanceArgs {
    /// Print the plan only.
    #[arg(long)]
    dry_run: bool,
    /// Carry out at most this many moves.
    #[arg(long)]
    max_moves: Option<u32>,
    /// Keep the average copy rate under this many MB/s.
    #[arg(long)]
    rate: Option<f64>,
    /// Follow the running rebalance (the cluster continues one by
    /// itself; this only shows it).
    #[arg(long, conflicts_with_all = ["dry_run", "cancel"])]
    resume: bool,
    /// Stop the running rebalance once its moves under way are done.
    #[arg(long, conflicts_with = "dry_run")]
    cancel: bool,
}

/// Runs one `admin node` command and prints what it did.
pub async fn node(cfg: &AdminConfig, json: bool, cmd: NodeCommand) -> anyhow::Result<()> {
    let members = match cmd {
        NodeCommand::Add {
            addr,
            zone,
            capacity,
        } => nodes::add(cfg, addr, &zone, capacity).await?,
        NodeCommand::List => nodes::list(cfg).await?,
        NodeCommand::Drain { id } => {
            let started = nodes::drain(cfg, id).await?;
            return follow_rebalance(cfg, json, started).await;
        }
        NodeCommand::Remove { id, dead } => {
            let started = nodes::remove(cfg, id, dead).await?;
            return follow_rebalance(cfg, json, started).await;
        }
    };
    if json {
        let list: Vec<_> = members
            .members
            .iter()
            .map(|m| {
                serde_json::json!({
                    "node_id": m.node_id, "addr": m.addr, "state": m.state,
                    "zone": m.zone, "capacity": m.capacity, "replicas": m.replicas,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "epoch": members.epoch, "members": list })
        );
    } else {
        print!("{}", nodes::render(&members));
    }
    Ok(())
}

/// Prints a started rebalance's plan and follows it to its end; fails if
/// it did not finish.
async fn follow_rebalance(
    cfg: &AdminConfig,
    json: bool,
    started: crate::rpc::pb::RebalanceStatus,
) -> anyhow::Result<()> {
    if !started.exists {
        println!("nothing to move");
        return Ok(());
    }
    if !json {
        print!("{}", nodes::render_plan(&started));
    }
    let end = nodes::watch(cfg, started.id).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "id": end.id, "state": end.state, "moves": end.moves.len(), "done": end.done, "bytes_copied": end.bytes_copied })
        );
    }
    if end.state != "done" {
        anyhow::bail!("the rebalance ended {}", end.state);
    }
    Ok(())
}

/// Runs `admin rebalance`: starts, plans, cancels or follows one.
pub async fn rebalance(cfg: &AdminConfig, json: bool, args: RebalanceArgs) -> anyhow::Result<()> {
    let RebalanceArgs {
        dry_run,
        max_moves,
        rate,
        resume,
        cancel,
    } = args;
    use crate::rpc::pb;
    if resume {
        let running = nodes::progress(cfg).await?;
        if !running.exists || running.state != "running" {
            anyhow::bail!("no rebalance is running");
        }
        return follow_rebalance(cfg, json, running).await;
    }
    if let Some(r) = rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
        anyhow::bail!("--rate must be a positive number of MB/s (got {r})");
    }
    let request = pb::RebalanceRequest {
        dry_run,
        max_moves: max_moves.unwrap_or(0),
        rate: rate.map_or(0, |r| (r * 1e6) as u64),
        cancel,
    };
    let status = nodes::rebalance(cfg, request).await?;
    if cancel {
        println!(
            "the rebalance stops once its moves under way are done ({} of {} done)",
            status.done,
            status.moves.len()
        );
        return Ok(());
    }
    if dry_run {
        if json {
            let moves: Vec<_> = status
                .moves
                .iter()
                .map(|m| serde_json::json!({"shard": m.shard, "from": m.from, "to": m.to, "bytes": m.bytes}))
                .collect();
            println!("{}", serde_json::json!({ "moves": moves }));
        } else {
            print!("{}", nodes::render_plan(&status));
        }
        return Ok(());
    }
    if status.moves.is_empty() {
        println!("nothing to move: every node holds its share");
        return Ok(());
    }
    follow_rebalance(cfg, json, status).await
}
