//! Purging a replica's Raft log behind its snapshots, but never past what
//! a joining learner still needs.
//!
//! openraft purges on its own right after each snapshot, keeping a fixed
//! tail. A learner that catches up by snapshot then needs the log from the
//! snapshot's end on, and a large snapshot of a busy shard can take longer
//! to send than that tail lasts: openraft sends a newer snapshot, and
//! another, forever. (A rebalance bench hit this: a 1 GB index shard under
//! 950 writes a second never finished its move, and the new node's disk
//! filled with snapshots.) So openraft keeps every entry and this task
//! purges, holding back while a learner catches up.

use super::Raft;
use crate::types::NodeId;
use openraft::{BasicNode, RaftMetrics};
use std::time::Duration;

/// How often a replica looks at what it may purge.
const EVERY: Duration = Duration::from_secs(1);

/// Runs until the replica's Raft stops: purges the log up to `keep`
/// entries behind the latest snapshot, or up to the entry the slowest
/// learner has, whichever is older.
pub async fn run(raft: Raft, keep: u64) {
    let metrics = raft.metrics();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        if metrics.has_changed().is_err() {
            return; // the Raft was shut down
        }
        let (upto, purged) = {
            let m = metrics.borrow();
            (purge_upto(&m, keep), m.purged)
        };
        let Some(upto) = upto else {
            continue;
        };
        if purged.is_some_and(|p| p.index >= upto) {
            continue;
        }
        if raft.trigger().purge_log(upto).await.is_err() {
            return;
        }
    }
}

/// The last entry that may go, if any may. A learner the leader has not
/// matched yet holds back everything: its snapshot's end is not known.
fn purge_upto(m: &RaftMetrics<NodeId, BasicNode>, keep: u64) -> Option<u64> {
    let mut upto = m.snapshot?.index.checked_sub(keep)?;
    let membership = m.membership_config.membership();
    let learners = membership.learner_ids();
    if let Some(progress) = &m.replication {
        for learner in learners {
            let matched = progress.get(&learner).copied().flatten()?;
            upto = upto.min(matched.index);
        }
    }
    Some(upto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership};
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    fn log(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// Node 1 leads voters 1–3; node 4 is a learner when given.
    fn leader(snapshot: u64, learner: Option<Option<u64>>) -> RaftMetrics<NodeId, BasicNode> {
        let mut m = RaftMetrics::new_initial(1);
        m.snapshot = Some(log(snapshot));
        let voters = vec![BTreeSet::from([1, 2, 3])];
        let mut progress: BTreeMap<NodeId, Option<LogId<NodeId>>> =
            BTreeMap::from([(2, Some(log(snapshot))), (3, Some(log(snapshot)))]);
        let membership = match learner {
            None => Membership::new(voters, ()),
            Some(matched) => {
                progress.insert(4, matched.map(log));
                Membership::new(voters, BTreeSet::from([4]))
            }
        };
        m.membership_config = Arc::new(StoredMembership::new(Some(log(1)), membership));
        m.replication = Some(progress);
        m
    }

    #[test]
    fn keeps_a_tail_behind_the_snapshot() {
        assert_eq!(purge_upto(&leader(5000, None), 500), Some(4500));
        assert_eq!(purge_upto(&leader(400, None), 500), None);
    }

    #[test]
    fn a_learner_holds_the_log_it_still_needs() {
        assert_eq!(purge_upto(&leader(5000, Some(None)), 500), None);
        assert_eq!(purge_upto(&leader(5000, Some(Some(100))), 500), Some(100));
        assert_eq!(purge_upto(&leader(5000, Some(Some(4900))), 500), Some(4500));
    }

    #[test]
    fn a_follower_purges_behind_its_snapshot() {
        let mut m = leader(5000, Some(None));
        m.replication = None;
        assert_eq!(purge_upto(&m, 500), Some(4500));
    }
}
