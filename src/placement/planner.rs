//! Rebalancing: which shard replicas to move so every node carries its share,
//! and which leaderships to transfer once they have moved.
//!
//! The planner is a pure function of the current placement: no I/O, no
//! clocks, no hash-map order, so every node that runs it gets the same plan.
//! It works in four phases, each move strictly improving one measure, which
//! is why it always ends:
//!
//! 1. Drain: every replica on a node that no longer accepts replicas moves
//!    to the least loaded accepting node, preferring a zone the shard lacks.
//!    These moves come first, so a plan cut short still restores redundancy.
//! 2. Zones: a shard with two replicas in one zone moves one of them to a
//!    zone it lacks, when such a zone has an accepting node.
//! 3. Replica counts: if a node is more than 10% (or one replica) off its
//!    capacity-weighted target and a move can help, move replicas from the
//!    most over- to the most under-loaded node until no move brings the two
//!    closer. Of the shards that could go, the one whose bytes best close the
//!    byte gap goes.
//! 4. Bytes: while a move brings nodes nearer their byte band (10% of
//!    target), move the shard that best closes the byte gap, or swap a big
//!    shard for a small one when counts have no room. Moves of under 1% of a
//!    target are not worth their copying, so skewed shard sizes end the
//!    phase early rather than in a long tail.
//!
//! No move lowers a shard's number of distinct zones, and no move puts a
//! replica where the shard already has one, so every prefix of a plan is safe
//! to apply. Loads are compared as integers scaled by the total capacity, so
//! the "strictly better" tests are exact.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::types::{NodeId, ShardId};

/// A node as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id.
    pub id: NodeId,
    /// Empty when the admin set no zone.
    pub zone: String,
    /// Relative weight: a node's target share is capacity / sum of capacities of accepting nodes. Always > 0.
    pub capacity: u64,
    /// False for a node being drained or removed (dead): it must end with no replicas, and never receives one.
    pub accepting: bool,
}

/// One shard (Raft group) as it is now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Which Raft group.
    pub shard: ShardId,
    /// Distinct node ids holding a replica.
    pub voters: Vec<NodeId>,
    /// Bytes of data the shard holds (chunk bytes); a move copies this many.
    pub bytes: u64,
}

/// Replace `from` by `to` in `shard`'s voters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The shard whose membership changes.
    pub shard: ShardId,
    /// The voter leaving.
    pub from: NodeId,
    /// The voter joining; never already a voter of the shard.
    pub to: NodeId,
    /// Bytes the new replica must copy.
    pub bytes: u64,
}

/// Why no plan can be made.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Each shard needs its replicas on distinct accepting nodes.
    #[error("draining would leave {available} accepting nodes for {needed} replicas per shard")]
    TooFewNodes { needed: usize, available: usize },
    /// Every node holding a replica must be listed (dead ones as not accepting).
    #[error("shard {shard} has a replica on node {node}, which is not in the node list")]
    UnknownNode { shard: ShardId, node: NodeId },
    /// A node listed twice would make the shard's replica count a lie.
    #[error("shard {shard} lists node {node} twice among its voters")]
    DuplicateVoter { shard: ShardId, node: NodeId },
}

/// Each node's share against its target, for `admin status` and the tests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Share {
    /// The node this row describes.
    pub node: NodeId,
    /// Replicas it holds now.
    pub replicas: usize,
    /// Replicas it should hold by capacity (0 when not accepting).
    pub target_replicas: f64,
    /// Bytes of all the shards it holds a replica of.
    pub bytes: u64,
    /// Bytes it should hold by capacity (0 when not accepting).
    pub target_bytes: f64,
}

/// The moves that rebalance `shards` over `nodes`, drain moves first, no
/// replica moved twice, cut to `max_moves` if given. Shards with fewer voters
/// than `replication` are left short: restoring a lost replica is repair's
/// job.
pub fn plan(
    nodes: &[NodeInfo],
    shards: &[ShardInfo],
    replication: usize,
    max_moves: Option<usize>,
) -> Result<Vec<Move>, PlanError> {
    let mut planner = Planner::new(nodes, shards, replication)?;
    planner.drain();
    planner.spread_zones();
    planner.balance_replicas();
    planner.balance_bytes();
    let mut moves = planner.net_moves();
    moves.truncate(max_moves.unwrap_or(usize::MAX));
    Ok(moves)
}

/// One row per node, in id order.
pub fn shares(nodes: &[NodeInfo], shards: &[ShardInfo]) -> Vec<Share> {
    let capacity: u64 = nodes
        .iter()
        .filter(|n| n.accepting)
        .map(|n| n.capacity)
        .sum();
    let replicas: usize = shards.iter().map(|s| s.voters.len()).sum();
    let bytes: u64 = shards.iter().map(|s| s.bytes * s.voters.len() as u64).sum();
    let mut rows: Vec<Share> = nodes
        .iter()
        .map(|n| {
            let held = shards.iter().filter(|s| s.voters.contains(&n.id));
            let weight = match n.accepting && capacity > 0 {
                true => n.capacity as f64 / capacity as f64,
                false => 0.0,
            };
            Share {
                node: n.id,
                replicas: held.clone().count(),
                target_replicas: replicas as f64 * weight,
                bytes: held.map(|s| s.bytes).sum(),
                target_bytes: bytes as f64 * weight,
            }
        })
        .collect();
    rows.sort_by_key(|r| r.node);
    rows
}

/// What a node carries, in one of the two measures the planner balances.
#[derive(Clone, Copy, PartialEq)]
enum Measure {
    Replicas,
    Bytes,
}

impl Measure {
    fn of_load(self, load: &Load) -> i128 {
        match self {
            Measure::Replicas => load.replicas,
            Measure::Bytes => load.bytes,
        }
    }

    /// How much of this measure one replica of `shard` carries.
    fn of_shard(self, shard: &ShardInfo) -> i128 {
        match self {
            Measure::Replicas => 1,
            Measure::Bytes => i128::from(shard.bytes),
        }
    }
}

/// What a balancing step aims for.
#[derive(Clone, Copy, PartialEq)]
enum Goal {
    /// Bring loads into their band; nothing moves for a node already in it.
    IntoBand,
    /// Bring loads as close to target as whole replicas allow.
    Even,
}

/// A node's load; i128 so scaled comparisons cannot overflow.
#[derive(Clone, Copy, Default)]
struct Load {
    replicas: i128,
    bytes: i128,
}

/// One or two moves (shard index, from, to) planned together: a swap keeps
/// both replica counts where they are.
type Step = Vec<(usize, NodeId, NodeId)>;

/// The placement being planned, with every node's load kept current.
struct Planner<'a> {
    /// Every node, by id.
    nodes: BTreeMap<NodeId, &'a NodeInfo>,
    /// Accepting node ids in ascending order: the only destinations.
    accepting: Vec<NodeId>,
    /// Sum of accepting capacities; loads are scaled by it to stay integers.
    capacity: i128,
    /// Shards in id order as they are now.
    before: Vec<ShardInfo>,
    /// Shards in id order, voters updated as moves are planned.
    shards: Vec<ShardInfo>,
    /// Each node's load under the placement so far.
    load: BTreeMap<NodeId, Load>,
    /// All replicas and their bytes; unchanged by moves.
    total: Load,
    /// The plan so far, in the order it must be applied.
    moves: Vec<Move>,
}

impl<'a> Planner<'a> {
    fn new(
        nodes: &'a [NodeInfo],
        shards: &[ShardInfo],
        replication: usize,
    ) -> Result<Self, PlanError> {
        let by_id: BTreeMap<NodeId, &NodeInfo> = nodes.iter().map(|n| (n.id, n)).collect();
        let accepting: Vec<NodeId> = by_id
            .values()
            .filter(|n| n.accepting)
            .map(|n| n.id)
            .collect();
        if accepting.len() < replication {
            return Err(PlanError::TooFewNodes {
                needed: replication,
                available: accepting.len(),
            });
        }
        let mut sorted = shards.to_vec();
        sorted.sort_by_key(|s| s.shard);
        let mut load: BTreeMap<NodeId, Load> =
            by_id.keys().map(|&id| (id, Load::default())).collect();
        let mut total = Load::default();
        for s in &sorted {
            check_voters(s, &by_id)?;
            for v in &s.voters {
                let l = load.entry(*v).or_default();
                l.replicas += 1;
                l.bytes += i128::from(s.bytes);
                total.replicas += 1;
                total.bytes += i128::from(s.bytes);
            }
        }
        Ok(Planner {
            capacity: accepting
                .iter()
                .map(|id| i128::from(by_id[id].capacity))
                .sum(),
            nodes: by_id,
            accepting,
            before: sorted.clone(),
            shards: sorted,
            load,
            total,
            moves: Vec::new(),
        })
    }

    /// Phase 1: take every replica off nodes that no longer accept any.
    fn drain(&mut self) {
        for i in 0..self.shards.len() {
            let mut leaving: Vec<NodeId> = self.shards[i]
                .voters
                .iter()
                .copied()
                .filter(|v| !self.nodes[v].accepting)
                .collect();
            leaving.sort();
            for from in leaving {
                if let Some(to) = self.drain_target(&self.shards[i], from) {
                    self.apply(i, from, to);
                }
            }
        }
    }

    /// The least loaded accepting non-voter, in a zone the shard lacks if any.
    fn drain_target(&self, shard: &ShardInfo, from: NodeId) -> Option<NodeId> {
        let kept = self.zones(shard.voters.iter().copied().filter(|&v| v != from));
        self.accepting
            .iter()
            .copied()
            .filter(|n| !shard.voters.contains(n))
            .min_by_key(|&n| {
                let zone_taken = kept.contains(self.zone(n));
                (
                    zone_taken,
                    self.excess(n, Measure::Replicas),
                    self.excess(n, Measure::Bytes),
                    n,
                )
            })
    }

    /// Phase 2: give every shard as many distinct zones as the cluster allows.
    fn spread_zones(&mut self) {
        let available = self.zones(self.accepting.iter().copied()).len();
        for i in 0..self.shards.len() {
            let wanted = available.min(self.shards[i].voters.len());
            while self.zones(self.shards[i].voters.iter().copied()).len() < wanted {
                let Some((from, to)) = self.zone_fix(&self.shards[i]) else {
                    break;
                };
                self.apply(i, from, to);
            }
        }
    }

    /// The busiest voter sharing its zone, and the least loaded node of a zone
    /// the shard lacks.
    fn zone_fix(&self, shard: &ShardInfo) -> Option<(NodeId, NodeId)> {
        let voters = &shard.voters;
        let shares_zone = |v: NodeId| {
            voters
                .iter()
                .any(|&w| w != v && self.zone(w) == self.zone(v))
        };
        let from = voters
            .iter()
            .copied()
            .filter(|&v| shares_zone(v))
            .max_by_key(|&v| (self.excess(v, Measure::Replicas), std::cmp::Reverse(v)))?;
        let present = self.zones(voters.iter().copied());
        let to = self
            .accepting
            .iter()
            .copied()
            .filter(|&n| !present.contains(self.zone(n)))
            .min_by_key(|&n| (self.excess(n, Measure::Replicas), n))?;
        Some((from, to))
    }

    /// Phase 3: if some count can be brought into band, even the counts out
    /// fully, so the next plan does not start right at the band's edge.
    fn balance_replicas(&mut self) {
        if self.best_step(Measure::Replicas, Goal::IntoBand).is_none() {
            return;
        }
        while let Some(step) = self.best_step(Measure::Replicas, Goal::Even) {
            self.apply_step(step);
        }
    }

    /// Phase 4: move shards while that brings byte loads nearer their band.
    /// Each step shrinks the sum of squared byte excesses, so this ends; the
    /// budget only bounds the plan's length.
    fn balance_bytes(&mut self) {
        let mut budget = self.total.replicas;
        while budget > 0 {
            let Some(step) = self.best_step(Measure::Bytes, Goal::IntoBand) else {
                break;
            };
            budget -= step.len() as i128;
            self.apply_step(step);
        }
    }

    /// The step from the most loaded to the least loaded node (by `measure`)
    /// that some shard can make, trying less extreme pairs when none can.
    fn best_step(&self, measure: Measure, goal: Goal) -> Option<Step> {
        let mut ranked = self.accepting.clone();
        ranked.sort_by_key(|&n| (self.excess(n, measure), n));
        for &from in ranked.iter().rev() {
            for &to in &ranked {
                if self.excess(from, measure) <= self.excess(to, measure) {
                    break;
                }
                if let Some(step) = self.step_between(from, to, measure, goal) {
                    return Some(step);
                }
            }
        }
        None
    }

    /// One move from `from` to `to`; for bytes, when no single move helps or
    /// it would push a replica count out of band, a swap with a smaller shard.
    fn step_between(&self, from: NodeId, to: NodeId, measure: Measure, goal: Goal) -> Option<Step> {
        if measure == Measure::Replicas || self.keeps_replica_band(from, to) {
            let shift = |i: usize| measure.of_shard(&self.shards[i]) * self.capacity;
            let single = self
                .movable(from, to)
                .filter(|&i| self.is_progress(from, to, measure, goal, shift(i)))
                .min_by_key(|&i| (self.misfit(from, to, self.bytes(i)), i));
            if let Some(i) = single {
                return Some(vec![(i, from, to)]);
            }
        }
        if measure == Measure::Replicas {
            return None;
        }
        let (i, j) = self.shards_to_swap(from, to)?;
        Some(vec![(i, from, to), (j, to, from)])
    }

    /// Two shards to trade, keeping both replica counts, whose difference in
    /// bytes is progress and best closes the byte gap.
    fn shards_to_swap(&self, from: NodeId, to: NodeId) -> Option<(usize, usize)> {
        let taken_back: Vec<usize> = self.movable(to, from).collect();
        let shift = |(i, j): (usize, usize)| self.bytes(i) - self.bytes(j);
        let bytes = Measure::Bytes;
        self.movable(from, to)
            .flat_map(|i| taken_back.iter().map(move |&j| (i, j)))
            .filter(|&p| {
                self.is_progress(from, to, bytes, Goal::IntoBand, shift(p) * self.capacity)
            })
            .min_by_key(|&p| (self.misfit(from, to, shift(p)), p))
    }

    /// Whether shifting `shift` (scaled) of `measure` from `from` to `to`
    /// strictly improves: the pair ends closer without trading places and,
    /// unless evening out, nearer the band. A byte step must also shift 1% of
    /// the smaller target: a long tail of tiny moves would cost more in
    /// copying and membership changes than it evens out.
    fn is_progress(
        &self,
        from: NodeId,
        to: NodeId,
        measure: Measure,
        goal: Goal,
        shift: i128,
    ) -> bool {
        let (over, under) = (self.excess(from, measure), self.excess(to, measure));
        let outside = |node, excess| self.outside_band(node, measure, excess);
        let nearer_band = || {
            outside(from, over - shift) + outside(to, under + shift)
                < outside(from, over) + outside(to, under)
        };
        let smaller_target = self.target(from, measure).min(self.target(to, measure));
        let big_enough = measure == Measure::Replicas || 100 * shift >= smaller_target;
        0 < shift && shift < over - under && big_enough && (goal == Goal::Even || nearer_band())
    }

    /// How far shifting `bytes` from `from` to `to` lands from leaving the two
    /// equally far from their byte targets.
    fn misfit(&self, from: NodeId, to: NodeId, bytes: i128) -> i128 {
        let gap = self.excess(from, Measure::Bytes) - self.excess(to, Measure::Bytes);
        (2 * bytes * self.capacity - gap).abs()
    }

    /// Shards (by index) with a replica on `from` that may move to `to`.
    fn movable(&self, from: NodeId, to: NodeId) -> impl Iterator<Item = usize> + '_ {
        (0..self.shards.len()).filter(move |&i| {
            let shard = &self.shards[i];
            shard.voters.contains(&from) && self.can_move(shard, from, to)
        })
    }

    fn bytes(&self, i: usize) -> i128 {
        i128::from(self.shards[i].bytes)
    }

    /// Whether `to` may replace `from`: no second replica on one node, and no
    /// zone lost unless another one is gained.
    fn can_move(&self, shard: &ShardInfo, from: NodeId, to: NodeId) -> bool {
        let others = shard.voters.iter().filter(|&&v| v != from);
        let zone_kept = others.clone().any(|&v| self.zone(v) == self.zone(from));
        let zone_gained = !others.clone().any(|&v| self.zone(v) == self.zone(to));
        !shard.voters.contains(&to) && (zone_kept || zone_gained)
    }

    /// Whether one replica leaving `from` for `to` keeps both replica counts
    /// acceptable: in band, or at least nearer the target than before.
    fn keeps_replica_band(&self, from: NodeId, to: NodeId) -> bool {
        let ok = |node: NodeId, delta: i128| {
            let before = self.excess(node, Measure::Replicas);
            let after = before + delta * self.capacity;
            self.outside_band(node, Measure::Replicas, after) == 0 || after.abs() < before.abs()
        };
        ok(from, -1) && ok(to, 1)
    }

    /// How far `excess` lies outside the node's band (times 10): the band is
    /// 10% of target, and for replicas at least one, since counts are whole.
    fn outside_band(&self, node: NodeId, measure: Measure, excess: i128) -> i128 {
        let mut band = self.target(node, measure);
        if measure == Measure::Replicas {
            band = band.max(10 * self.capacity);
        }
        (10 * excess.abs() - band).max(0)
    }

    /// Load above target, times `self.capacity` so it is an exact integer.
    fn excess(&self, node: NodeId, measure: Measure) -> i128 {
        measure.of_load(&self.load[&node]) * self.capacity - self.target(node, measure)
    }

    /// The node's target load, times `self.capacity`.
    fn target(&self, node: NodeId, measure: Measure) -> i128 {
        measure.of_load(&self.total) * self.node_capacity(node)
    }

    /// Capacity counting toward targets: none for a node being drained.
    fn node_capacity(&self, node: NodeId) -> i128 {
        let info = self.nodes[&node];
        if info.accepting {
            i128::from(info.capacity)
        } else {
            0
        }
    }

    fn zone(&self, node: NodeId) -> &'a str {
        let info: &'a NodeInfo = self.nodes[&node];
        &info.zone
    }

    fn zones(&self, nodes: impl Iterator<Item = NodeId>) -> BTreeSet<&'a str> {
        nodes.map(|n| self.zone(n)).collect()
    }

    /// The plan cut down to what it changes. A later phase may move a
    /// replica an earlier one placed: moved back (a→b, b→a) that is no move,
    /// moved on (a→b, b→c) it is one (a→c), so nothing is copied only to be
    /// thrown away. Each move keeps the place where its voter first left, so
    /// drain moves stay first.
    fn net_moves(&self) -> Vec<Move> {
        let mut now: Vec<Vec<NodeId>> = self.before.iter().map(|s| s.voters.clone()).collect();
        let mut net = Vec::new();
        for m in &self.moves {
            let i = self
                .shards
                .binary_search_by_key(&m.shard, |s| s.shard)
                .expect("a planned move names a known shard");
            let (voters, end) = (&mut now[i], &self.shards[i].voters);
            if !voters.contains(&m.from) || end.contains(&m.from) {
                continue;
            }
            // Of the voters still to join, the one keeping the most zones.
            let zones_with = |to: NodeId| {
                let replaced = voters.iter().map(|&v| if v == m.from { to } else { v });
                self.zones(replaced).len()
            };
            let to = end
                .iter()
                .copied()
                .filter(|n| !voters.contains(n))
                .min_by_key(|&n| (std::cmp::Reverse(zones_with(n)), n))
                .expect("as many voters join a shard as leave it");
            for v in voters.iter_mut().filter(|v| **v == m.from) {
                *v = to;
            }
            net.push(Move { to, ..m.clone() });
        }
        net
    }

    fn apply_step(&mut self, step: Step) {
        for (i, from, to) in step {
            self.apply(i, from, to);
        }
    }

    fn apply(&mut self, i: usize, from: NodeId, to: NodeId) {
        let shard = &mut self.shards[i];
        let Some(slot) = shard.voters.iter().position(|&v| v == from) else {
            return;
        };
        shard.voters[slot] = to;
        let bytes = i128::from(shard.bytes);
        self.moves.push(Move {
            shard: shard.shard,
            from,
            to,
            bytes: shard.bytes,
        });
        for (node, sign) in [(from, -1), (to, 1)] {
            let load = self.load.entry(node).or_default();
            load.replicas += sign;
            load.bytes += sign * bytes;
        }
    }
}

fn check_voters(shard: &ShardInfo, nodes: &BTreeMap<NodeId, &NodeInfo>) -> Result<(), PlanError> {
    let mut seen = BTreeSet::new();
    for &node in &shard.voters {
        if !nodes.contains_key(&node) {
            return Err(PlanError::UnknownNode {
                shard: shard.shard,
                node,
            });
        }
        if !seen.insert(node) {
            return Err(PlanError::DuplicateVoter {
                shard: shard.shard,
                node,
            });
        }
    }
    Ok(())
}

/// For leadership balance after moves: given each shard's voters and current
/// leader (None = unknown), return (shard, new_leader) transfers so that no
/// node leads more than its share of shards + 1, moving as few leaderships as
/// the greedy search finds. Shards with an unknown leader, or one on a node
/// not accepting, get one. Every new leader is one of that shard's voters.
pub fn plan_leaders(
    nodes: &[NodeInfo],
    shards: &[(ShardId, Vec<NodeId>, Option<NodeId>)],
) -> Vec<(ShardId, NodeId)> {
    let mut leaders = Leaders::new(nodes, shards);
    leaders.assign_missing();
    while let Some((i, to)) = leaders.best_transfer() {
        leaders.lead(i, to);
    }
    leaders
        .shards
        .iter()
        .filter(|s| s.leader != s.was)
        .filter_map(|s| Some((s.shard, s.leader?)))
        .collect()
}

/// One shard as the leadership planner sees it.
struct Led {
    shard: ShardId,
    /// Voters that may lead: accepting nodes, ascending.
    candidates: Vec<NodeId>,
    /// The leader given as input.
    was: Option<NodeId>,
    /// The leader planned so far; None only with no candidate.
    leader: Option<NodeId>,
}

/// Leadership counts against capacity-weighted shares, scaled like [`Planner`].
struct Leaders {
    /// Capacity of each node that may lead some shard.
    capacity_of: BTreeMap<NodeId, i128>,
    capacity: i128,
    /// Shards that have a candidate leader.
    total: i128,
    leads: BTreeMap<NodeId, i128>,
    shards: Vec<Led>,
}

impl Leaders {
    fn new(nodes: &[NodeInfo], shards: &[(ShardId, Vec<NodeId>, Option<NodeId>)]) -> Self {
        let accepting: BTreeMap<NodeId, i128> = nodes
            .iter()
            .filter(|n| n.accepting)
            .map(|n| (n.id, i128::from(n.capacity)))
            .collect();
        let mut led: Vec<Led> = shards
            .iter()
            .map(|(shard, voters, was)| {
                let mut candidates: Vec<NodeId> = voters
                    .iter()
                    .copied()
                    .filter(|v| accepting.contains_key(v))
                    .collect();
                candidates.sort();
                candidates.dedup();
                let leader = was.filter(|l| candidates.contains(l));
                Led {
                    shard: *shard,
                    candidates,
                    was: *was,
                    leader,
                }
            })
            .collect();
        led.sort_by_key(|s| s.shard);
        let capacity_of: BTreeMap<NodeId, i128> = led
            .iter()
            .flat_map(|s| s.candidates.iter())
            .map(|n| (*n, accepting[n]))
            .collect();
        let mut leads: BTreeMap<NodeId, i128> = capacity_of.keys().map(|&n| (n, 0)).collect();
        for leader in led.iter().filter_map(|s| s.leader) {
            *leads.entry(leader).or_default() += 1;
        }
        Leaders {
            capacity: capacity_of.values().sum(),
            capacity_of,
            total: led.iter().filter(|s| !s.candidates.is_empty()).count() as i128,
            leads,
            shards: led,
        }
    }

    /// Gives each leaderless shard its least loaded candidate.
    fn assign_missing(&mut self) {
        for i in 0..self.shards.len() {
            if self.shards[i].leader.is_some() {
                continue;
            }
            let best = self.shards[i]
                .candidates
                .iter()
                .copied()
                .min_by_key(|&n| (self.excess(n), n));
            if let Some(to) = best {
                self.lead(i, to);
            }
        }
    }

    /// A transfer off the most loaded node above its share + 1, to the least
    /// loaded candidate that ends strictly below where that node was.
    fn best_transfer(&self) -> Option<(usize, NodeId)> {
        let mut over: Vec<NodeId> = self
            .leads
            .keys()
            .copied()
            .filter(|&n| self.excess(n) > self.capacity)
            .collect();
        over.sort_by_key(|&n| (std::cmp::Reverse(self.excess(n)), n));
        over.into_iter().find_map(|from| {
            let led_by_from =
                (0..self.shards.len()).filter(|&i| self.shards[i].leader == Some(from));
            led_by_from
                .flat_map(|i| self.shards[i].candidates.iter().map(move |&to| (i, to)))
                .filter(|&(_, to)| self.excess(from) - self.excess(to) > self.capacity)
                .min_by_key(|&(i, to)| (self.excess(to), to, i))
        })
    }

    /// Makes `to` the planned leader of shard `i`, moving the count with it.
    fn lead(&mut self, i: usize, to: NodeId) {
        if let Some(from) = self.shards[i].leader.replace(to) {
            *self.leads.entry(from).or_default() -= 1;
        }
        *self.leads.entry(to).or_default() += 1;
    }

    /// Leaderships above share, times `self.capacity`.
    fn excess(&self, node: NodeId) -> i128 {
        self.leads[&node] * self.capacity - self.total * self.capacity_of[&node]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, zone: &str, capacity: u64) -> NodeInfo {
        NodeInfo {
            id,
            zone: zone.into(),
            capacity,
            accepting: true,
        }
    }

    fn equal_nodes(ids: std::ops::RangeInclusive<NodeId>) -> Vec<NodeInfo> {
        ids.map(|id| node(id, "", 1)).collect()
    }

    /// Shard s on `rf` consecutive nodes from s, as `Layout::replicas` places it.
    fn consecutive(
        on: &[NodeId],
        shards: u32,
        rf: usize,
        bytes: impl Fn(u32) -> u64,
    ) -> Vec<ShardInfo> {
        (0..shards)
            .map(|s| ShardInfo {
                shard: ShardId(s),
                voters: (0..rf).map(|i| on[(s as usize + i) % on.len()]).collect(),
                bytes: bytes(s),
            })
            .collect()
    }

    /// Applies `moves` in order, checking each one is safe at its point in
    /// the sequence, and returns the placement they reach.
    fn replay(nodes: &[NodeInfo], shards: &[ShardInfo], moves: &[Move]) -> Vec<ShardInfo> {
        let info: BTreeMap<NodeId, &NodeInfo> = nodes.iter().map(|n| (n.id, n)).collect();
        let zones = |voters: &[NodeId]| {
            voters
                .iter()
                .map(|v| info[v].zone.as_str())
                .collect::<BTreeSet<_>>()
                .len()
        };
        let mut now = shards.to_vec();
        for m in moves {
            let s = now
                .iter_mut()
                .find(|s| s.shard == m.shard)
                .expect("move names a known shard");
            assert!(
                s.voters.contains(&m.from),
                "{m:?}: `from` is not a voter of {:?}",
                s.voters
            );
            assert!(
                !s.voters.contains(&m.to),
                "{m:?}: `to` already a voter of {:?}",
                s.voters
            );
            assert!(
                info[&m.to].accepting,
                "{m:?}: `to` does not accept replicas"
            );
            assert_eq!(m.bytes, s.bytes);
            let before = zones(&s.voters);
            s.voters
                .iter_mut()
                .filter(|v| **v == m.from)
                .for_each(|v| *v = m.to);
            assert!(
                zones(&s.voters) >= before || !info[&m.from].accepting,
                "{m:?} loses a zone"
            );
        }
        now
    }

    /// Every accepting node within 10% (or one replica) of its replica target.
    fn assert_replicas_balanced(nodes: &[NodeInfo], shards: &[ShardInfo]) {
        for row in shares(nodes, shards) {
            let slack = (row.target_replicas * 0.1).max(1.0) + 1e-9;
            assert!(
                (row.replicas as f64 - row.target_replicas).abs() <= slack,
                "{row:?}"
            );
        }
    }

    /// Every accepting node within 10% of its byte target.
    fn assert_bytes_balanced(nodes: &[NodeInfo], shards: &[ShardInfo]) {
        for row in shares(nodes, shards) {
            let off = (row.bytes as f64 - row.target_bytes).abs();
            assert!(off <= row.target_bytes * 0.1, "{row:?}");
        }
    }

    /// Plans, replays the plan checking each move, and checks a second plan
    /// finds nothing left to do.
    fn plan_and_replay(
        nodes: &[NodeInfo],
        shards: &[ShardInfo],
        rf: usize,
    ) -> (Vec<Move>, Vec<ShardInfo>) {
        let moves = plan(nodes, shards, rf, None).expect("plan");
        let after = replay(nodes, shards, &moves);
        assert!(
            plan(nodes, &after, rf, None).expect("replan").is_empty(),
            "plan is not stable"
        );
        (moves, after)
    }

    #[test]
    fn a_new_node_receives_a_quarter_and_nothing_else_moves() {
        let shards = consecutive(&[1, 2, 3], 64, 3, |_| 0);
        let nodes = equal_nodes(1..=4);
        let (moves, after) = plan_and_replay(&nodes, &shards, 3);
        assert_eq!(moves.len(), 48);
        assert!(
            moves.iter().all(|m| m.to == 4),
            "a move between old nodes: {moves:?}"
        );
        let row = |id| shares(&nodes, &after)[id as usize - 1].replicas;
        assert_eq!(moves.len(), row(4));
        assert_replicas_balanced(&nodes, &after);
        assert!(after.iter().all(|s| s.voters.len() == 3));
    }

    /// Sizes for which the plan moved shard 17 onto node 4 and then,
    /// evening bytes, straight back (CI met the same with other sizes).
    #[test]
    fn a_new_node_with_uneven_shards_only_receives() {
        let mib = [
            5, 8, 4, 0, 1, 8, 4, 0, 2, 2, 8, 1, 12, 12, 0, 0, 2, 5, 9, 0, 4, 1, 2, 2,
        ];
        let shards = consecutive(&[1, 2, 3], 24, 3, |s| mib[s as usize] << 20);
        let nodes = equal_nodes(1..=4);
        let (moves, after) = plan_and_replay(&nodes, &shards, 3);
        assert!(
            moves.iter().all(|m| m.to == 4),
            "a move between old nodes: {moves:?}"
        );
        assert_replicas_balanced(&nodes, &after);
    }

    #[test]
    fn replicas_follow_unequal_capacities() {
        let nodes = vec![
            node(1, "", 1),
            node(2, "", 1),
            node(3, "", 2),
            node(4, "", 2),
        ];
        let shards = consecutive(&[1, 2, 3, 4], 64, 3, |_| 10);
        let (_, after) = plan_and_replay(&nodes, &shards, 3);
        assert_replicas_balanced(&nodes, &after);
        let rows = shares(&nodes, &after);
        assert!(rows[3].replicas > rows[0].replicas + 20, "{rows:?}");
    }

    #[test]
    fn skewed_bytes_end_within_ten_percent() {
        let bytes = |s: u32| [0, 100, 900, 5_000][s as usize % 4] + 37 * u64::from(s);
        let shards = consecutive(&[1, 2, 3], 64, 3, bytes);
        let nodes = equal_nodes(1..=4);
        let (_, after) = plan_and_replay(&nodes, &shards, 3);
        assert_replicas_balanced(&nodes, &after);
        assert_bytes_balanced(&nodes, &after);
    }

    #[test]
    fn even_counts_with_uneven_bytes_are_fixed_by_swaps() {
        // Every big shard sits on nodes 1-3, so node 4 holds only small ones.
        let shards = consecutive(&[1, 2, 3, 4], 64, 3, |s| if s % 4 == 0 { 1000 } else { 10 });
        let nodes = equal_nodes(1..=4);
        let (moves, after) = plan_and_replay(&nodes, &shards, 3);
        assert!(moves.len() <= 2 * 16, "{} moves", moves.len());
        assert_replicas_balanced(&nodes, &after);
        assert_bytes_balanced(&nodes, &after);
    }

    #[test]
    fn one_huge_shard_does_not_make_the_planner_chase_bytes() {
        let shards = consecutive(&[1, 2, 3], 16, 3, |s| if s == 5 { 1 << 40 } else { 0 });
        let nodes = equal_nodes(1..=4);
        let (moves, after) = plan_and_replay(&nodes, &shards, 3);
        assert_eq!(
            moves.len(),
            12,
            "only the new node's share of replicas moves"
        );
        assert_replicas_balanced(&nodes, &after);
    }

    #[test]
    fn a_drained_node_ends_empty() {
        let mut nodes = equal_nodes(1..=4);
        nodes[3].accepting = false;
        let shards = consecutive(&[1, 2, 3, 4], 64, 3, |s| u64::from(s) * 1000);
        let (moves, after) = plan_and_replay(&nodes, &shards, 3);
        assert_eq!(moves.len(), 48, "only node 4's replicas move");
        assert!(after
            .iter()
            .all(|s| s.voters.len() == 3 && !s.voters.contains(&4)));
        assert_replicas_balanced(&nodes, &after);
    }

    #[test]
    fn draining_below_the_replication_factor_is_refused() {
        let mut nodes = equal_nodes(1..=3);
        nodes[2].accepting = false;
        let err = plan(&nodes, &consecutive(&[1, 2, 3], 8, 3, |_| 0), 3, None).unwrap_err();
        assert_eq!(
            err,
            PlanError::TooFewNodes {
                needed: 3,
                available: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "draining would leave 2 accepting nodes for 3 replicas per shard"
        );
    }

    #[test]
    fn a_dead_nodes_replicas_move_before_any_rebalancing() {
        let mut nodes = equal_nodes(1..=6);
        nodes[1].accepting = false;
        let shards = consecutive(&[1, 2, 3, 4], 64, 3, |_| 0);
        let (moves, after) = plan_and_replay(&nodes, &shards, 3);
        assert!(moves.len() > 48, "the new nodes also get rebalanced");
        assert!(moves[..48].iter().all(|m| m.from == 2) && moves[48..].iter().all(|m| m.from != 2));
        assert!(after
            .iter()
            .all(|s| s.voters.len() == 3 && !s.voters.contains(&2)));
        assert_replicas_balanced(&nodes, &after);
        let first = plan(&nodes, &shards, 3, Some(10)).expect("plan");
        assert_eq!(first, moves[..10]);
    }

    #[test]
    fn shards_end_on_three_zones() {
        let zones = ["a", "a", "b", "b", "c", "c"];
        let nodes: Vec<NodeInfo> = (1..=6)
            .map(|id| node(id, zones[id as usize - 1], 1))
            .collect();
        let shards = consecutive(&[1, 2, 3, 4, 5, 6], 64, 3, |s| u64::from(s % 7) * 100);
        let (_, after) = plan_and_replay(&nodes, &shards, 3);
        for s in &after {
            let distinct: BTreeSet<&str> =
                s.voters.iter().map(|&v| zones[v as usize - 1]).collect();
            assert_eq!(distinct.len(), 3, "{s:?}");
        }
        assert_replicas_balanced(&nodes, &after);
    }

    #[test]
    fn a_balanced_cluster_needs_no_moves() {
        let shards = consecutive(&[1, 2, 3, 4], 64, 3, |_| 4096);
        assert!(plan(&equal_nodes(1..=4), &shards, 3, None)
            .expect("plan")
            .is_empty());
    }

    #[test]
    fn the_same_cluster_always_gets_the_same_plan() {
        let zones = ["a", "b", "c", "a", "b"];
        let nodes: Vec<NodeInfo> = (1..=5)
            .map(|id| node(id, zones[id as usize - 1], id))
            .collect();
        let shards = consecutive(&[1, 2, 3], 64, 3, |s| u64::from(s) * 7919 % 1000);
        let once = plan(&nodes, &shards, 3, None).expect("plan");
        assert!(!once.is_empty());
        assert_eq!(once, plan(&nodes, &shards, 3, None).expect("plan"));
        let (mut nodes_rev, mut shards_rev) = (nodes.clone(), shards.clone());
        nodes_rev.reverse();
        shards_rev.reverse();
        assert_eq!(once, plan(&nodes_rev, &shards_rev, 3, None).expect("plan"));
    }

    #[test]
    fn voters_must_be_known_and_distinct() {
        let nodes = equal_nodes(1..=3);
        let unknown = consecutive(&[1, 2, 9], 3, 3, |_| 0);
        assert!(matches!(
            plan(&nodes, &unknown, 3, None),
            Err(PlanError::UnknownNode { node: 9, .. })
        ));
        let twice = consecutive(&[1, 1, 2], 1, 3, |_| 0);
        assert!(matches!(
            plan(&nodes, &twice, 3, None),
            Err(PlanError::DuplicateVoter { node: 1, .. })
        ));
    }

    /// A tiny deterministic generator, so the random clusters are the same
    /// on every run.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn random_clusters_get_safe_plans_that_settle() {
        let mut rnd = Lcg(7);
        for case in 0..150 {
            let zones = rnd.below(4);
            let nodes: Vec<NodeInfo> = (1..=3 + rnd.below(8))
                .map(|id| NodeInfo {
                    id,
                    zone: format!("z{}", rnd.below(zones.max(1))),
                    capacity: 1 + rnd.below(3),
                    accepting: rnd.below(6) != 0,
                })
                .collect();
            let rf = 2 + rnd.below(2) as usize;
            let shards: Vec<ShardInfo> = (0..1 + rnd.below(100) as u32)
                .map(|s| {
                    let mut voters = Vec::new();
                    while voters.len() < rf {
                        let n = 1 + rnd.below(nodes.len() as u64);
                        if !voters.contains(&n) {
                            voters.push(n);
                        }
                    }
                    let magnitude = rnd.below(30);
                    ShardInfo {
                        shard: ShardId(s),
                        voters,
                        bytes: rnd.below(1 << magnitude),
                    }
                })
                .collect();
            let accepting = |id: NodeId| nodes[id as usize - 1].accepting;
            let Ok(moves) = plan(&nodes, &shards, rf, None) else {
                assert!(
                    nodes.iter().filter(|n| n.accepting).count() < rf,
                    "case {case}"
                );
                continue;
            };
            let drains = moves.iter().take_while(|m| !accepting(m.from)).count();
            assert!(
                moves[drains..].iter().all(|m| accepting(m.from)),
                "case {case}: drains first"
            );
            let mut after = replay(&nodes, &shards, &moves);
            // Each move takes a voter of now to a voter of the end: none is
            // moved twice.
            let voters = |all: &[ShardInfo], shard: ShardId| {
                let s = all.iter().find(|s| s.shard == shard).expect("known shard");
                s.voters.clone()
            };
            for m in &moves {
                let (now, end) = (voters(&shards, m.shard), voters(&after, m.shard));
                assert!(
                    now.contains(&m.from) && !end.contains(&m.from) && end.contains(&m.to),
                    "case {case}: {m:?} moves a replica the plan moves again"
                );
            }
            assert!(
                after.iter().all(|s| s.voters.iter().all(|&v| accepting(v))),
                "case {case}"
            );
            let zones_left: BTreeSet<&str> = nodes
                .iter()
                .filter(|n| n.accepting)
                .map(|n| n.zone.as_str())
                .collect();
            for s in after.iter().filter(|_| zones_left.len() >= rf) {
                let distinct: BTreeSet<&str> = s
                    .voters
                    .iter()
                    .map(|&v| nodes[v as usize - 1].zone.as_str())
                    .collect();
                assert_eq!(distinct.len(), rf, "case {case}: {s:?}");
            }
            // Where some node can never reach its band, a replan may find a last move or two.
            for _ in 0..3 {
                let again = plan(&nodes, &after, rf, None).expect("replan");
                assert!(
                    again.len() <= 5,
                    "case {case}: replan moves {}",
                    again.len()
                );
                after = replay(&nodes, &after, &again);
            }
            assert!(
                plan(&nodes, &after, rf, None).expect("replan").is_empty(),
                "case {case}"
            );
        }
    }

    #[test]
    fn leaderships_spread_off_a_node_that_leads_everything() {
        let nodes = equal_nodes(1..=4);
        let shards: Vec<(ShardId, Vec<NodeId>, Option<NodeId>)> = (0..64)
            .map(|s| {
                (
                    ShardId(s),
                    vec![1, 2 + u64::from(s) % 3, 2 + u64::from(s + 1) % 3],
                    Some(1),
                )
            })
            .collect();
        let transfers = plan_leaders(&nodes, &shards);
        assert_eq!(transfers.len(), 64 - 17, "node 1 keeps its share + 1");
        let mut leads = BTreeMap::from([(1, 64 - transfers.len())]);
        for (shard, to) in &transfers {
            assert!(
                shards[shard.0 as usize].1.contains(to),
                "{to} is no voter of {shard}"
            );
            *leads.entry(*to).or_default() += 1;
        }
        assert!(leads.values().all(|&n| n <= 17), "{leads:?}");
    }

    #[test]
    fn leaders_on_draining_nodes_or_unknown_are_replaced() {
        let mut nodes = equal_nodes(1..=3);
        nodes[2].accepting = false;
        let shards = vec![
            (ShardId(0), vec![1, 2, 3], Some(3)),
            (ShardId(1), vec![1, 2, 3], None),
        ];
        let transfers = plan_leaders(&nodes, &shards);
        assert_eq!(transfers, vec![(ShardId(0), 1), (ShardId(1), 2)]);
    }

    #[test]
    fn shares_add_up() {
        let mut nodes = vec![
            node(1, "", 1),
            node(2, "", 1),
            node(3, "", 2),
            node(4, "", 5),
        ];
        nodes[3].accepting = false;
        let shards = consecutive(&[1, 2, 3, 4], 10, 3, |s| u64::from(s) * 10);
        let rows = shares(&nodes, &shards);
        assert_eq!(
            rows.iter().map(|r| r.node).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(rows.iter().map(|r| r.replicas).sum::<usize>(), 30);
        assert!((rows.iter().map(|r| r.target_replicas).sum::<f64>() - 30.0).abs() < 1e-9);
        assert_eq!(rows.iter().map(|r| r.bytes).sum::<u64>(), 3 * 450);
        assert!((rows.iter().map(|r| r.target_bytes).sum::<f64>() - 1350.0).abs() < 1e-9);
        assert_eq!(
            (rows[2].target_replicas, rows[3].target_replicas),
            (15.0, 0.0)
        );
    }
}
