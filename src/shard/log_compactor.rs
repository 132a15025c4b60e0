//! Keeps the node's shared Raft log within twice its live entries plus
//! two segments on disk, whatever idle shards and wiped replicas left in
//! old segments (see `SegmentLog::compact`).

use super::segment_log::SegmentLog;
use std::sync::Arc;
use std::time::Duration;

/// How often the log is looked at.
const EVERY: Duration = Duration::from_secs(10);

/// Runs for the node's lifetime.
pub async fn run(log: Arc<SegmentLog>) {
    loop {
        tokio::time::sleep(EVERY).await;
        let l = log.clone();
        match tokio::task::spawn_blocking(move || l.compact()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => {
                let now = log.bytes();
                tracing::info!(
                    removed,
                    segments = now.segments,
                    on_disk = now.on_disk,
                    live = now.live,
                    "compacted the Raft log"
                );
            }
            Ok(Err(e)) => tracing::warn!("compacting the Raft log: {e}"),
            Err(_) => return, // the runtime is shutting down
        }
    }
}
