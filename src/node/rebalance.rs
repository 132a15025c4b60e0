//! Rebalancing: planning moves of shard replicas between nodes, and
//! carrying them out, a few at a time, from whichever node leads the meta
//! shard.
//!
//! The plan and how far it got live in the meta shard, so when the
//! coordinating node dies the next meta leader resumes it. Each move is
//! a sequence of steps that can all be repeated safely:
//!
//! 1. the layout names the new node as joining the shard: it opens an
//!    empty replica, and new chunks of the shard are written to it too;
//! 2. the shard's leader adds it as a learner and it catches up (by
//!    snapshot when the log was purged);
//! 3. it fetches every chunk the shard records (the repair path);
//! 4. the leader makes it a voter and drops the old replica, in one
//!    joint-consensus change;
//! 5. the layout takes the old node off the shard, which then wipes its
//!    replica and deletes the shard's chunks.

use super::chunks::Chunks;
use super::members;
use crate::placement::planner::{self, Move, NodeInfo, ShardInfo};
use crate::placement::{Layout, MemberState};
use crate::rpc::pb;
use crate::shard::command::{MembershipOp, Rebalance, RebalanceState};
use crate::shard::{Command, Query, ShardError, ShardHost, Value};
use crate::types::{now_ms, NodeId, ShardId};
use std::time::Duration;
use tokio::time::Instant;

type Result<T> = std::result::Result<T, ShardError>;

/// How often the meta leader looks for a rebalance to run.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How long one move may take before the rebalance fails.
const MOVE_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// Moves carried out at once. Most of a move's time is spent waiting on
/// Raft rounds and polls; its chunk copies go through the receiving node's
/// repair queue, which bounds them per node however many moves run.
const MOVES_AT_ONCE: usize = 4;
/// Failed attempts at one move before the rebalance stops as failed.
const MOVE_ATTEMPTS: u32 = 10;
/// Rounds of leadership hand-overs after a rebalance.
const LEADER_ROUNDS: usize = 3;
/// Log entries a learner may trail by and count as caught up: under load
/// the leader's last entry moves on while the learner's answer is in flight.
const CATCH_UP_SLACK: u64 = 16;

/// The latest rebalance, running or not.
pub async fn latest(host: &ShardHost) -> Result<Option<Rebalance>> {
    match host.query(ShardId::META, &Query::Rebalance).await? {
        Value::Rebalance(r) => Ok(r),
        other => Err(ShardError::Internal(format!("unexpected reply {other:?}"))),
    }
}

/// Plans a rebalance of the current layout.
pub async fn plan(chunks: &Chunks, max_moves: Option<usize>, rate: u64) -> Result<Rebalance> {
    let layout = members::current(&chunks.host).await?;
    let shards = shard_sizes(chunks, &layout).await;
    let moves = planner::plan(&node_infos(&layout), &shards, layout.replication, max_moves)
        .map_err(|e| ShardError::InvalidArgument(e.to_string()))?;
    let rebalance = Rebalance {
        id: now_ms(),
        moves,
        done: 0,
        bytes_copied: 0,
        rate,
        cancel: false,
        state: RebalanceState::Running,
        updated_ms: now_ms(),
    };
    Ok(rebalance)
}

/// Stores `rebalance` for the meta leader to carry out; fails while
/// another runs.
pub async fn start(host: &ShardHost, rebalance: &Rebalance) -> Result<()> {
    let cmd = Command::StartRebalance {
        rebalance: rebalance.clone(),
    };
    host.propose(ShardId::META, &cmd).await.map(|_| ())
}

/// The planner's view of the members: only active nodes take replicas.
pub fn node_infos(layout: &Layout) -> Vec<NodeInfo> {
    layout
        .members
        .iter()
        .map(|(&id, m)| NodeInfo {
            id,
            zone: m.zone.clone(),
            capacity: m.capacity,
            accepting: m.state == MemberState::Active,
        })
        .collect()
}

/// Every shard's voters and bytes, the bytes as one live voter counts them.
pub async fn shard_sizes(chunks: &Chunks, layout: &Layout) -> Vec<ShardInfo> {
    let mut out = Vec::new();
    for s in 0..layout.shards {
        let shard = ShardId(s);
        let voters = layout.replicas(shard);
        let mut bytes = 0;
        for &node in &voters {
            if let Ok(count) = chunk_count(chunks, node, shard).await {
                bytes = count.recorded_bytes;
                break;
            }
        }
        out.push(ShardInfo {
            shard,
            voters,
            bytes,
        });
    }
    out
}

async fn chunk_count(chunks: &Chunks, node: NodeId, shard: ShardId) -> Result<pb::ShardChunkCount> {
    if node == chunks.host.id {
        let local = chunks.clone();
        return tokio::task::spawn_blocking(move || local.count_in(shard))
            .await
            .map_err(|e| ShardError::Internal(e.to_string()))?
            .ok_or_else(|| ShardError::Unavailable(format!("no replica of shard {shard} here")));
    }
    let addr = chunks
        .host
        .addr_of(node)
        .ok_or_else(|| ShardError::Internal(format!("unknown node {node}")))?;
    let mut client = chunks.host.pool().client(addr)?;
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.shard_chunks(pb::ShardRequest { shard: shard.0 }),
    )
    .await
    .map_err(|_| ShardError::Unavailable(format!("node {node} timed out")))?;
    reply
        .map(|r| r.into_inner())
        .map_err(|s| crate::rpc::error_of(&s))
}

/// Runs on every node: while this node leads the meta shard, carries out
/// the running rebalance, if any.
pub async fn coordinate(chunks: Chunks) {
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        if !leads_meta(&chunks.host) {
            continue;
        }
        match latest(&chunks.host).await {
            Ok(Some(r)) if r.running() => {
                tracing::info!(
                    id = r.id,
                    done = r.done,
                    moves = r.moves.len(),
                    "running a rebalance"
                );
                if let Err(e) = run(&chunks, r).await {
                    tracing::warn!("rebalance paused: {e}");
                }
            }
            // A stopped rebalance whose coordinator died before it took
            // back what its last moves had begun.
            Ok(_) if !chunks.host.layout().joining.is_empty() => {
                if let Err(e) = drop_joining(&chunks.host).await {
                    tracing::warn!("replicas left joining not dropped yet: {e}");
                }
            }
            _ => {}
        }
    }
}

pub(super) fn leads_meta(host: &ShardHost) -> bool {
    host.raft(ShardId::META)
        .is_some_and(|r| r.metrics().borrow().current_leader == Some(host.id))
}

/// Carries out `r` from its next move on, a few moves at once, recording
/// progress after each batch. Returns when it is finished, cancelled,
/// failed, or this node stops leading the meta shard (the next leader
/// carries on, repeating the moves of an unfinished batch).
async fn run(chunks: &Chunks, mut r: Rebalance) -> Result<()> {
    let started = Instant::now();
    let mut copied_here = 0u64;
    let mut attempts = 0;
    while r.done < r.moves.len() {
        if !leads_meta(&chunks.host) {
            return Ok(());
        }
        // The stored record is the truth: another coordinator may have
        // moved on, and the admin may have cancelled.
        match latest(&chunks.host).await? {
            Some(now) if now.id == r.id && now.running() => r = now,
            _ => return Ok(()),
        }
        if r.cancel {
            r.state = RebalanceState::Cancelled;
            record(&chunks.host, r.done, &mut r).await?;
            return drop_joining(&chunks.host).await;
        }
        let batch = next_batch(&r.moves[r.done..]);
        let results =
            futures::future::join_all(batch.iter().map(|mv| move_replica(chunks, mv))).await;
        // Progress counts only the moves done in order; later ones that
        // finished are repeated next time, which costs a few checks.
        let finished = results.iter().take_while(|r| r.is_ok()).count();
        if finished > 0 {
            attempts = 0;
            let expected_done = r.done;
            let bytes: u64 = batch[..finished].iter().map(|m| m.bytes).sum();
            r.done += finished;
            r.bytes_copied += bytes;
            copied_here += bytes;
            record(&chunks.host, expected_done, &mut r).await?;
            pace(r.rate, copied_here, started).await;
        }
        if let Some(Err(e)) = results.into_iter().nth(finished) {
            let mv = &batch[finished];
            attempts += 1;
            tracing::warn!(shard = %mv.shard, from = mv.from, to = mv.to, attempts, "move failed: {e}");
            if attempts >= MOVE_ATTEMPTS {
                r.state = RebalanceState::Failed(format!(
                    "moving shard {} from node {} to node {}: {e}",
                    mv.shard, mv.from, mv.to
                ));
                record(&chunks.host, r.done, &mut r).await?;
                return drop_joining(&chunks.host).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    balance_leaders(chunks).await;
    finish_drains(&chunks.host).await?;
    r.state = RebalanceState::Done;
    record(&chunks.host, r.done, &mut r).await
}

/// The next moves to run together: up to [`MOVES_AT_ONCE`] in plan order,
/// each of a different shard, so no shard ever has more than one extra
/// replica.
fn next_batch(moves: &[Move]) -> Vec<Move> {
    let mut batch: Vec<Move> = Vec::new();
    for mv in moves.iter().take(MOVES_AT_ONCE) {
        if batch.iter().any(|b| b.shard == mv.shard) {
            break;
        }
        batch.push(mv.clone());
    }
    batch
}

/// Stores `r` as the rebalance's progress, if the stored one is still at
/// `expected_done` moves.
async fn record(host: &ShardHost, expected_done: usize, r: &mut Rebalance) -> Result<()> {
    r.updated_ms = now_ms();
    let cmd = Command::UpdateRebalance {
        rebalance: r.clone(),
        expected_done,
    };
    host.propose(ShardId::META, &cmd).await.map(|_| ())
}

/// Waits so that the average copy rate stays under `rate` bytes/s.
async fn pace(rate: u64, copied: u64, started: Instant) {
    if rate == 0 {
        return;
    }
    let due = started + Duration::from_secs_f64(copied as f64 / rate as f64);
    tokio::time::sleep_until(due).await;
}

/// One move, from wherever an earlier attempt left it.
async fn move_replica(chunks: &Chunks, mv: &Move) -> Result<()> {
    let host = &chunks.host;
    let shard = mv.shard;
    let deadline = Instant::now() + MOVE_DEADLINE;
    let layout = members::current(host).await?;
    let voters = layout.replicas(shard);
    let target: Vec<NodeId> = voters
        .iter()
        .map(|&v| if v == mv.from { mv.to } else { v })
        .collect();
    if !voters.contains(&mv.to) {
        if !voters.contains(&mv.from) {
            return Err(ShardError::InvalidArgument(format!(
                "node {} no longer holds shard {shard}",
                mv.from
            )));
        }
        if layout.joining.get(&shard.0) != Some(&mv.to) {
            members::change(host, |l| {
                let active = l
                    .members
                    .get(&mv.to)
                    .is_some_and(|m| m.state == MemberState::Active);
                if !active {
                    return Err(ShardError::InvalidArgument(format!(
                        "node {} is not an active member",
                        mv.to
                    )));
                }
                l.joining.insert(shard.0, mv.to);
                Ok(())
            })
            .await?;
        }
        let addr = layout
            .addr_of(mv.to)
            .ok_or_else(|| ShardError::InvalidArgument(format!("node {} is not a member", mv.to)))?
            .to_string();
        let add = MembershipOp::AddLearner {
            node: mv.to,
            addr: addr.clone(),
        };
        until(deadline, "the new replica to open", || async {
            host.membership(shard, &add).await.is_ok()
        })
        .await?;
        until(deadline, "the new replica to catch up", || async {
            matches!(
                host.membership(shard, &MembershipOp::Progress { node: mv.to }).await,
                Ok(Value::Progress { matched, last }) if matched + CATCH_UP_SLACK >= last && matched > 0
            )
        })
        .await?;
        until(deadline, "the new replica to fetch its chunks", || async {
            chunk_count(chunks, mv.to, shard)
                .await
                .is_ok_and(|c| c.missing == 0)
        })
        .await?;
        host.membership(
            shard,
            &MembershipOp::SetVoters {
                voters: target.clone(),
            },
        )
        .await?;
    }
    members::change(host, |l| {
        l.voters[shard.0 as usize] = target.clone();
        l.joining.remove(&shard.0);
        Ok(())
    })
    .await?;
    tracing::info!(%shard, from = mv.from, to = mv.to, "moved a replica");
    Ok(())
}

/// Takes back the replicas moves of a stopped rebalance left joining: the
/// shard's leader drops the learner from its group and the layout forgets
/// it, so the node wipes its copy and the log and chunks it pinned. A
/// replica that already became a voter stays, for a rebalance to finish.
async fn drop_joining(host: &ShardHost) -> Result<()> {
    let layout = members::current(host).await?;
    for (&shard, &node) in &layout.joining {
        let shard = ShardId(shard);
        match host
            .membership(shard, &MembershipOp::DropLearner { node })
            .await
        {
            Ok(_) => {}
            Err(ShardError::InvalidArgument(why)) => {
                tracing::warn!(%shard, node, "replica left joining kept: {why}");
                continue;
            }
            Err(e) => return Err(e),
        }
        members::change(host, |l| {
            if l.joining.get(&shard.0) == Some(&node) {
                l.joining.remove(&shard.0);
            }
            Ok(())
        })
        .await?;
        tracing::info!(%shard, node, "dropped the replica a stopped move left joining");
    }
    Ok(())
}

/// Polls `ready` until it holds or `deadline` passes: soon at first (most
/// steps of a small move take tens of milliseconds), then every half second.
async fn until<F, Fut>(deadline: Instant, what: &str, mut ready: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut wait = Duration::from_millis(25);
    loop {
        if ready().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ShardError::Unavailable(format!(
                "gave up waiting for {what}"
            )));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(500));
    }
}

/// Hands leadership of shards around so no node leads more than its share
/// plus one, among the nodes that answer. A hand-over can fail (a busy
/// leader's lease outlives the pause, or another node wins the election),
/// so the leaders are looked at again, a few rounds at most. Best effort:
/// a shard whose hand-over keeps failing keeps its leader.
async fn balance_leaders(chunks: &Chunks) {
    let host = &chunks.host;
    // The stored layout: this node's copy may not show the last moves yet,
    // and a leader planned onto a replica that moved away never takes over.
    let layout = match members::current(host).await {
        Ok(layout) => layout,
        Err(e) => {
            tracing::warn!("leaderships not balanced: {e}");
            return;
        }
    };
    let mut nodes = node_infos(&layout);
    for n in nodes.iter_mut().filter(|n| n.accepting) {
        n.accepting = answers(chunks, n.id).await;
    }
    for _ in 0..LEADER_ROUNDS {
        let mut shards = Vec::new();
        for s in 0..layout.shards {
            let shard = ShardId(s);
            let leader = host.find_leader(shard).await;
            shards.push((shard, layout.replicas(shard), leader));
        }
        let transfers = planner::plan_leaders(&nodes, &shards);
        if transfers.is_empty() {
            return;
        }
        for (shard, to) in transfers {
            if let Err(e) = host
                .membership(shard, &MembershipOp::TransferLeader { node: to })
                .await
            {
                tracing::info!(%shard, to, "leadership stays: {e}");
            }
        }
    }
}

/// True if `node` answers at all (a "no replica here" is an answer).
async fn answers(chunks: &Chunks, node: NodeId) -> bool {
    match chunk_count(chunks, node, ShardId::META).await {
        Ok(_) => true,
        Err(e) => !matches!(e, ShardError::Unavailable(_)),
    }
}

/// Marks draining members that hold nothing any more as drained.
async fn finish_drains(host: &ShardHost) -> Result<()> {
    let layout = members::current(host).await?;
    let emptied: Vec<NodeId> = layout
        .members
        .iter()
        .filter(|(id, m)| m.state == MemberState::Draining && layout.shards_of(**id).is_empty())
        .map(|(id, _)| *id)
        .collect();
    if emptied.is_empty() {
        return Ok(());
    }
    members::change(host, |l| {
        for id in &emptied {
            if let Some(m) = l.members.get_mut(id) {
                m.state = MemberState::Drained;
            }
        }
        Ok(())
    })
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(shard: u32) -> Move {
        Move {
            shard: ShardId(shard),
            from: 1,
            to: 4,
            bytes: 10,
        }
    }

    #[test]
    fn a_batch_holds_a_few_moves_and_never_two_of_one_shard() {
        let moves: Vec<Move> = [1, 2, 3, 4, 5, 6].into_iter().map(mv).collect();
        assert_eq!(next_batch(&moves).len(), MOVES_AT_ONCE);
        let repeated: Vec<Move> = [1, 2, 1, 3].into_iter().map(mv).collect();
        let batch: Vec<u32> = next_batch(&repeated).iter().map(|m| m.shard.0).collect();
        assert_eq!(batch, [1, 2]);
        assert!(next_batch(&[]).is_empty());
    }
}
