//! A leader whose disk runs low hands its shards to another replica.
//!
//! Below its reserve a node takes no new data (507), and below half of it
//! its Raft log appends wait for room (see `space`). A replica that cannot
//! append is harmless as a follower: it falls behind and catches up later.
//! As a leader it holds its whole shard: deletes wait on its log, and reads
//! wait behind them. So while the disk is low this node asks another
//! replica to lead each shard it leads; the shard goes on there, and reads
//! and writes that reach this node are forwarded to it.

use super::command::MembershipOp;
use super::host::ShardHost;
use crate::types::ShardId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often the disk is looked at (as often as the space guard reads it).
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// A shard is handed on at most this often: when every replica's disk is
/// low, leadership must not go round and round.
const AGAIN_AFTER: Duration = Duration::from_secs(60);

/// Runs for the node's lifetime.
pub async fn run(host: Arc<ShardHost>) {
    let mut handed: HashMap<ShardId, Instant> = HashMap::new();
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        if !host.disk_is_low() {
            continue;
        }
        let now = Instant::now();
        let due: Vec<_> = host
            .local_shards()
            .into_iter()
            .filter(|s| handed.get(s).is_none_or(|t| now - *t >= AGAIN_AFTER))
            .filter_map(|s| Some((s, host.heir(s)?)))
            .collect();
        let hand_overs = due.iter().map(|&(shard, node)| {
            handed.insert(shard, now);
            let host = host.clone();
            async move {
                let op = MembershipOp::TransferLeader { node };
                (shard, node, host.membership(shard, &op).await)
            }
        });
        for (shard, node, result) in futures::future::join_all(hand_overs).await {
            match result {
                Ok(_) => tracing::warn!(%shard, node, "disk low: handed the shard's leadership on"),
                Err(e) => {
                    tracing::warn!(%shard, node, "disk low: could not hand the shard on: {e}")
                }
            }
        }
    }
}
