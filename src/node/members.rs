//! Cluster membership as the admin changes it. The layout (members, and
//! the voters of every shard) lives in the meta shard; every node follows
//! it, opening the replicas it is given and wiping the ones taken away.

use super::chunks::Chunks;
use crate::placement::{Layout, Member, MemberState};
use crate::rpc::pb;
use crate::shard::{decode, Command, Query, ShardError, ShardHost, Value};
use crate::types::{NodeId, ShardId};
use std::time::Duration;

type Result<T> = std::result::Result<T, ShardError>;

/// How often a node asks the meta shard for a newer layout.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// How often a layout change is tried again on a newer layout.
const CHANGE_ATTEMPTS: u32 = 5;
/// The least time between two looks, however often peers hint at a change.
const FOLLOW_AT_MOST_EVERY: Duration = Duration::from_millis(100);

/// The cluster's layout as the meta shard holds it now.
pub async fn current(host: &ShardHost) -> Result<Layout> {
    match host.query(ShardId::META, &Query::Layout).await? {
        Value::Layout(Some(layout)) => Ok(layout),
        Value::Layout(None) => Ok((*host.initial).clone()),
        other => Err(ShardError::Internal(format!("unexpected reply {other:?}"))),
    }
}

/// Applies `change` to the current layout and stores the result as the
/// next epoch. When another change was stored meanwhile, applies `change`
/// again to that one (a few times). Fails, changing nothing, if `change`
/// refuses.
pub async fn change(
    host: &ShardHost,
    change: impl Fn(&mut Layout) -> Result<()>,
) -> Result<Layout> {
    let mut attempts = 0;
    loop {
        let mut layout = current(host).await?;
        let expected_epoch = layout.epoch;
        change(&mut layout)?;
        layout.epoch = expected_epoch + 1;
        let cmd = Command::SetLayout {
            expected_epoch,
            layout: layout.clone(),
        };
        match host.propose(ShardId::META, &cmd).await {
            Ok(_) => return Ok(layout),
            Err(ShardError::LayoutChanged { .. }) if attempts < CHANGE_ATTEMPTS => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Makes `id` at `member.addr` a member. It holds nothing until a
/// rebalance gives it replicas.
pub fn add(layout: &mut Layout, id: NodeId, member: Member) -> Result<()> {
    let bad = |m: String| Err(ShardError::InvalidArgument(m));
    if id == 0 {
        return bad("node ids start at 1".into());
    }
    if member.capacity == 0 {
        return bad("a node's capacity must be above zero".into());
    }
    if let Some(m) = layout.members.get(&id) {
        return bad(format!(
            "node {id} is already a member (at {}, {})",
            m.addr,
            m.state.name()
        ));
    }
    if let Some((other, _)) = layout.members.iter().find(|(_, m)| m.addr == member.addr) {
        return bad(format!(
            "{} is already the address of node {other}",
            member.addr
        ));
    }
    layout.members.insert(
        id,
        Member {
            state: MemberState::Active,
            ..member
        },
    );
    Ok(())
}

/// Keeps this node's layout in step with the meta shard's, and deletes
/// the chunks of replicas it no longer holds.
pub async fn follow(chunks: Chunks) {
    loop {
        tokio::time::sleep(FOLLOW_AT_MOST_EVERY).await;
        // A new replica's leader calls on it at once: look then, rather
        // than up to a second later.
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY - FOLLOW_AT_MOST_EVERY) => {}
            _ = chunks.host.layout_maybe_stale() => {}
        }
        let layout = match current(&chunks.host).await {
            Ok(layout) => layout,
            // Every layout a node adopted was once the meta shard's, and
            // epochs only grow: a peer's newer one is safe to take, and
            // leads this node to the meta shard's current replicas.
            Err(_) => match newest_of_peers(&chunks.host).await {
                Some(layout) => layout,
                None => continue,
            },
        };
        // Also when the epoch is not newer: an earlier adoption may have
        // failed to open or close a replica, and this tries again.
        match chunks.host.adopt(layout).await {
            Ok(dropped) => {
                for id in &dropped {
                    if let Err(e) = chunks.store.remove(id) {
                        tracing::warn!(chunk = %id.to_hex(), "could not delete a moved chunk: {e}");
                    }
                }
            }
            Err(e) => tracing::error!("adopting a new layout: {e:#}"),
        }
    }
}

fn member_state(layout: &Layout, id: NodeId) -> Result<MemberState> {
    layout
        .members
        .get(&id)
        .map(|m| m.state)
        .ok_or_else(|| ShardError::InvalidArgument(format!("node {id} is not a member")))
}

/// Refuses to take `id` out of the active members if fewer than the
/// replication factor would remain.
fn keep_enough_active(layout: &Layout, id: NodeId, doing: &str) -> Result<()> {
    let left = layout
        .members
        .iter()
        .filter(|(other, m)| **other != id && m.state == MemberState::Active)
        .count();
    if left < layout.replication {
        return Err(ShardError::InvalidArgument(format!(
            "{doing} node {id} would leave {left} active nodes for {} replicas per shard; add a node first",
            layout.replication
        )));
    }
    Ok(())
}

/// Marks `id` as draining: the next rebalance moves its replicas away.
pub fn drain(layout: &mut Layout, id: NodeId) -> Result<()> {
    match member_state(layout, id)? {
        MemberState::Active => {}
        other => {
            return Err(ShardError::InvalidArgument(format!(
                "node {id} is {}, not active",
                other.name()
            )))
        }
    }
    keep_enough_active(layout, id, "draining")?;
    layout.members.get_mut(&id).expect("checked above").state = MemberState::Draining;
    Ok(())
}

/// Removes `id` for good. A live node must be drained first; a `dead` one
/// may still hold replicas, which the next rebalance re-creates elsewhere.
pub fn remove(layout: &mut Layout, id: NodeId, dead: bool) -> Result<()> {
    let state = member_state(layout, id)?;
    if state == MemberState::Removed {
        return Err(ShardError::InvalidArgument(format!(
            "node {id} is already removed"
        )));
    }
    let held = layout.shards_of(id).len();
    if !dead && held > 0 {
        return Err(ShardError::InvalidArgument(format!(
            "node {id} still holds {held} replicas; drain it first, or pass --dead if it is gone for good"
        )));
    }
    if state == MemberState::Active {
        keep_enough_active(layout, id, "removing")?;
    }
    layout.members.get_mut(&id).expect("checked above").state = MemberState::Removed;
    Ok(())
}

/// The newest layout any other member has adopted.
async fn newest_of_peers(host: &ShardHost) -> Option<Layout> {
    let mine = host.layout();
    let mut newest: Option<Layout> = None;
    for node in mine.live_nodes().into_iter().filter(|n| *n != host.id) {
        let Some(addr) = mine.addr_of(node) else {
            continue;
        };
        let Ok(mut client) = host.pool().client(addr) else {
            continue;
        };
        let asked = tokio::time::timeout(Duration::from_secs(2), client.local_layout(pb::Empty {}));
        let Ok(Ok(reply)) = asked.await else {
            continue;
        };
        if let Ok(layout) = decode::<Layout>(&reply.into_inner().payload) {
            if newest.as_ref().is_none_or(|n| layout.epoch > n.epoch) {
                newest = Some(layout);
            }
        }
    }
    newest
}
