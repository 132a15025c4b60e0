//! `lumbung admin scrub`: a scrub pass now on every node (or one), and
//! what it found and repaired.

use super::nodes;
use crate::config::AdminConfig;
use crate::rpc::{error_of, pb, Pool};
use clap::Args;
use std::time::Duration;

/// `lumbung admin scrub …`.
#[derive(Args)]
pub struct ScrubArgs {
    /// Only this node.
    #[arg(long)]
    node: Option<u64>,
    /// Wait until every pass is done and print what it found.
    #[arg(long)]
    wait: bool,
}

/// Starts a pass on the chosen nodes; with `wait`, follows them to their
/// ends. Returns each node's pass.
pub async fn scrub(
    cfg: &AdminConfig,
    node: Option<u64>,
    wait: bool,
) -> anyhow::Result<Vec<(u64, pb::ScrubStatus)>> {
    let members = nodes::list(cfg).await?.members;
    let chosen: Vec<&pb::Member> = members
        .iter()
        .filter(|m| m.state == "active" || m.state == "draining")
        .filter(|m| node.is_none_or(|n| n == m.node_id))
        .collect();
    if chosen.is_empty() {
        anyhow::bail!(
            "no active node {}",
            node.map_or("at all".into(), |n| n.to_string())
        );
    }
    let pool = Pool::new(&cfg.tls)?;
    let mut started = Vec::new();
    for m in &chosen {
        let mut c = pool.client(m.addr.parse()?)?;
        let status = c
            .scrub(pb::Empty {})
            .await
            .map_err(|s| anyhow::anyhow!("node {}: {}", m.node_id, error_of(&s)))?;
        started.push((m.node_id, m.addr.clone(), status.into_inner()));
    }
    if !wait {
        return Ok(started.into_iter().map(|(id, _, s)| (id, s)).collect());
    }
    let mut done = Vec::new();
    for (id, addr, asked) in started {
        let mut c = pool.client(addr.parse()?)?;
        loop {
            let s = c
                .status(pb::Empty {})
                .await
                .map_err(|s| anyhow::anyhow!("node {id}: {}", error_of(&s)))?;
            let pass = s.into_inner().scrub.unwrap_or_default();
            // The pass that ran when asked, or the one it started, ended
            // (times are the node's own).
            let ours = pass.started_ms > asked.started_ms
                || (asked.running && pass.started_ms == asked.started_ms);
            if ours && !pass.running {
                done.push((id, pass));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(done)
}

/// Runs `admin scrub` and prints what it did.
pub async fn run(cfg: &AdminConfig, json: bool, args: ScrubArgs) -> anyhow::Result<()> {
    let passes = scrub(cfg, args.node, args.wait).await?;
    if json {
        let list: Vec<_> = passes.iter().map(|(id, p)| json_of(*id, p)).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", render(&passes, args.wait));
    }
    Ok(())
}

fn json_of(node: u64, p: &pb::ScrubStatus) -> serde_json::Value {
    serde_json::json!({
        "node": node,
        "running": p.running,
        "started_ms": p.started_ms,
        "finished_ms": p.finished_ms,
        "files_total": p.files_total,
        "files_checked": p.files_checked,
        "bytes_checked": p.bytes_checked,
        "corrupt": p.corrupt,
        "missing": p.missing,
        "repaired": p.repaired,
    })
}

/// One line per node.
pub fn render(passes: &[(u64, pb::ScrubStatus)], waited: bool) -> String {
    if !waited {
        return "scrub passes started; `admin status` shows their progress, `admin scrub --wait` follows them\n".into();
    }
    let mut out = format!(
        "{:<6} {:>10} {:>12} {:>8} {:>8} {:>9} {:>8}\n",
        "NODE", "FILES", "READ", "CORRUPT", "MISSING", "REPAIRED", "SECONDS"
    );
    for (id, p) in passes {
        out.push_str(&format!(
            "{:<6} {:>10} {:>12} {:>8} {:>8} {:>9} {:>8.1}\n",
            id,
            p.files_checked,
            super::status::mib(p.bytes_checked),
            p.corrupt,
            p.missing,
            p.repaired,
            (p.finished_ms - p.started_ms) as f64 / 1000.0
        ));
    }
    out
}
