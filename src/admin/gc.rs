//! `lumbung admin gc`: one garbage collection now, and what it freed.

use super::on_any_node;
use crate::config::AdminConfig;
use crate::rpc::pb;
use clap::Args;

/// `lumbung admin gc …`.
#[derive(Args)]
pub struct GcArgs {
    /// Wait until it is done and print what it freed.
    #[arg(long)]
    wait: bool,
}

/// Runs one collection (the grace still applies: chunks freed less than a
/// grace ago stay) and prints what it did.
pub async fn run(cfg: &AdminConfig, json: bool, args: GcArgs) -> anyhow::Result<()> {
    let report = collect(cfg, args.wait).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&json_of(&report))?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// Asks a node to run one collection; with `wait`, answers what it freed.
pub async fn collect(cfg: &AdminConfig, wait: bool) -> anyhow::Result<pb::GcReport> {
    on_any_node(cfg, |mut c| async move {
        c.collect_garbage(pb::GcRequest { wait }).await
    })
    .await
}

fn json_of(r: &pb::GcReport) -> serde_json::Value {
    if r.started_only {
        return serde_json::json!({ "started_ms": r.started_ms, "done": false });
    }
    serde_json::json!({
        "done": true,
        "started_ms": r.started_ms,
        "finished_ms": r.finished_ms,
        "chunks_freed": r.chunks,
        "content_bytes_freed": r.bytes,
        "disk_bytes_freed": r.disk_bytes,
        "chunks_referenced": r.referenced,
        "uploads_aborted": r.uploads_aborted,
    })
}

pub fn render(r: &pb::GcReport) -> String {
    if r.started_only {
        return "garbage collection started; `lumbung admin gc --wait` runs one and shows what it frees\n".into();
    }
    let secs = (r.finished_ms - r.started_ms) as f64 / 1000.0;
    format!(
        "freed {} chunks: {} of content, {} on disk over all replicas\n\
         {} chunks still referenced; {} abandoned uploads aborted; took {secs:.1} s\n",
        r.chunks,
        super::status::mib(r.bytes),
        super::status::mib(r.disk_bytes),
        r.referenced,
        r.uploads_aborted,
    )
}
