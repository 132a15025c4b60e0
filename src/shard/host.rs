//! All shard replicas of one node, and the routing of commands and queries
//! to whichever node leads a shard.
//!
//! A caller anywhere in the cluster can `propose` to or `query` any shard:
//! the host runs it locally when this node leads the shard, forwards it to
//! the leader otherwise, and follows "not leader" hints and elections until
//! a deadline passes.

use super::command::{decode, encode, Command, MembershipOp, Query, Reply, ShardError, Value};
use super::flusher::Flusher;
use super::log_store::{AppendHeld, LogStore};
use super::network::Network;
use super::read_gate::ReadGate;
use super::segment_log::SegmentLog;
use super::state::{chunks_with_sizes, State};
use super::state_machine::{self, StateMachine};
use super::Raft;
use crate::config::{ClusterSpec, RaftTuning};
use crate::placement::Layout;
use crate::rpc::{error_of, pb, Failure, Pool};
use crate::space::SpaceGuard;
use crate::store::{Batch, Store, Stores};
use crate::types::{ChunkId, NodeId, ShardId};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// How long a call keeps looking for a shard's leader.
const ROUTE_DEADLINE: Duration = Duration::from_secs(15);
/// How long a leader may take to commit one command.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// How often a call waiting for a shard's new leader looks again.
const LEADER_POLL: Duration = Duration::from_millis(25);

/// One local replica: its Raft handle and where its state lives.
struct Replica {
    raft: Raft,
    /// The replica's state-machine space in the node's store.
    space: String,
    reads: ReadGate,
    /// Shared by each client write and read confirmation while it runs,
    /// taken whole by a leadership hand-over: followers refuse to vote
    /// while they hear from the leader, and every write or confirmation is
    /// such a message, so a busy shard's hand-over must hold them back.
    quiet: tokio::sync::RwLock<()>,
    /// Raised while the replica's log waits for disk space, and its Raft
    /// core with it.
    held: AppendHeld,
}

/// What opening a replica takes, kept for replicas a new layout assigns.
struct Opener {
    config: Arc<Config>,
    /// The shards' state machines.
    state: Store,
    /// Their votes, purge points and committed ids, and the layout.
    meta: Store,
    log: Arc<SegmentLog>,
    snapshots: std::path::PathBuf,
    chunk_refs: super::state_machine::ChunkRefs,
    /// Log entries kept behind a snapshot (see `log_keeper`).
    log_tail: u64,
    /// The data disk's free space: writes that add data are refused, and
    /// log appends wait, when it runs low.
    space: Arc<SpaceGuard>,
}

/// The shards of this node.
pub struct ShardHost {
    pub id: NodeId,
    /// The layout the node files describe: the cluster's until the first
    /// change is stored in the meta shard.
    pub initial: Arc<Layout>,
    layout: RwLock<Arc<Layout>>,
    replicas: RwLock<HashMap<ShardId, Arc<Replica>>>,
    opener: Opener,
    pool: Arc<Pool>,
    /// Last leader seen per shard, to send the next call straight there.
    hints: Mutex<HashMap<ShardId, NodeId>>,
    /// What this node last heard from shards' leaders.
    heard: Mutex<Heard>,
    /// Raised when a peer talks about a shard this node has no replica of:
    /// the layout probably gave it one, so it should look now.
    layout_stale: tokio::sync::Notify,
    pub flusher: Flusher,
    /// Where every replica's Raft runs: its own threads, so heartbeats,
    /// votes and replication never queue behind request work (TLS, hashing,
    /// sealing) on the node's main runtime.
    raft_runtime: RaftRuntime,
}

/// When each local replica last had an AppendEntries (heartbeats
/// included) from its leader, and which node that was; and when any did.
#[derive(Default)]
struct Heard {
    by_shard: HashMap<ShardId, (NodeId, Instant)>,
    last: Option<Instant>,
}

impl Heard {
    fn note(&mut self, shard: ShardId, leader: NodeId) {
        let now = Instant::now();
        self.by_shard.insert(shard, (leader, now));
        self.last = Some(now);
    }

    /// Whether `node`, the last leader heard on `shard`, has been silent
    /// longer than `after` while some leader was heard within it.
    fn silent(&self, shard: ShardId, node: NodeId, after: Duration) -> bool {
        let others_heard = self.last.is_some_and(|t| t.elapsed() <= after);
        let this = self.by_shard.get(&shard);
        others_heard && this.is_some_and(|&(from, at)| from == node && at.elapsed() > after)
    }
}

/// A tokio runtime for the Raft cores, shut down without blocking when
/// the host goes (it may be dropped inside another runtime).
struct RaftRuntime(Option<tokio::runtime::Runtime>);

impl RaftRuntime {
    fn start() -> std::io::Result<RaftRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lumbung-raft")
            .enable_all()
            .build()?;
        Ok(RaftRuntime(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the Raft runtime lives as long as the host")
            .handle()
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Where the node keeps the newest layout it has seen: key `layout` of
/// its `node` space.
const NODE_SPACE: &str = "node";
const LAYOUT_KEY: &[u8] = b"layout";

/// A call to run on a shard's leader.
enum Call<'a> {
    Propose(&'a Command),
    Query(&'a Query),
    Membership(&'a MembershipOp),
}

/// Where a node keeps its shards.
pub struct Disk<'a> {
    /// The state and meta stores.
    pub stores: &'a Stores,
    /// Holds the segment log (`raftlog/`) and snapshot files.
    pub data_dir: &'a std::path::Path,
    /// The data disk's free space.
    pub space: Arc<SpaceGuard>,
}

impl ShardHost {
    /// Opens (or creates) every replica this node holds and starts its Raft.
    pub async fn start(
        id: NodeId,
        spec: &ClusterSpec,
        tuning: &RaftTuning,
        disk: Disk<'_>,
        pool: Arc<Pool>,
        chunk_refs: super::state_machine::ChunkRefs,
    ) -> anyhow::Result<ShardHost> {
        let config = Arc::new(
            Config {
                cluster_name: "lumbung".into(),
                heartbeat_interval: tuning.heartbeat_ms,
                election_timeout_min: tuning.election_min_ms,
                election_timeout_max: tuning.election_max_ms,
                snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_every),
                // Never purge on its own: `log_keeper` purges, sparing
                // what a learner catching up still needs.
                max_in_snapshot_log_to_keep: u64::MAX,
                // Each snapshot piece, and the last one's load into the
                // follower's tree, which for a large shard takes a while.
                install_snapshot_timeout: 60_000,
                ..Default::default()
            }
            .validate()?,
        );
        let Disk {
            stores,
            data_dir,
            space,
        } = disk;
        let log = Arc::new(SegmentLog::open(&data_dir.join("raftlog"))?);
        let snapshots = data_dir.join("snapshots");
        std::fs::create_dir_all(&snapshots)?;
        let flusher = Flusher::start(log.clone(), stores.meta.clone(), stores.state.clone());
        let saved = stores
            .meta
            .blocking(|s| s.get(NODE_SPACE, LAYOUT_KEY))
            .await?;
        let layout = match saved {
            Some(saved) => decode::<Layout>(&saved)?,
            None => spec.layout(),
        };
        let host = ShardHost {
            id,
            initial: Arc::new(spec.layout()),
            layout: RwLock::new(Arc::new(layout.clone())),
            replicas: RwLock::new(HashMap::new()),
            opener: Opener {
                config,
                state: stores.state.clone(),
                meta: stores.meta.clone(),
                log,
                snapshots,
                chunk_refs,
                log_tail: tuning.snapshot_every / 10,
                space,
            },
            pool,
            hints: Mutex::new(HashMap::new()),
            heard: Mutex::new(Heard::default()),
            layout_stale: tokio::sync::Notify::new(),
            flusher,
            raft_runtime: RaftRuntime::start()?,
        };
        for shard in layout.shards_of(id) {
            host.open(shard).await?;
        }
        if layout.epoch == 0 {
            host.initialize_groups().await?;
        }
        Ok(host)
    }

    async fn open(&self, shard: ShardId) -> anyhow::Result<()> {
        let o = &self.opener;
        let network = Network {
            shard,
            pool: self.pool.clone(),
        };
        let held = AppendHeld::default();
        let log_store = LogStore::open(
            &o.meta,
            o.log.clone(),
            shard,
            self.flusher.clone(),
            o.space.clone(),
            held.clone(),
        )
        .await?;
        let sm = StateMachine::new(
            shard,
            o.state.clone(),
            self.flusher.clone(),
            o.chunk_refs.clone(),
            o.snapshots.clone(),
        );
        sm.finish_interrupted_install().await?;
        // openraft spawns a replica's tasks on the runtime that creates it.
        let raft = self
            .raft_runtime
            .handle()
            .spawn(Raft::new(self.id, o.config.clone(), network, log_store, sm))
            .await??;
        tokio::spawn(super::log_keeper::run(raft.clone(), o.log_tail));
        let replica = Replica {
            raft,
            space: state_machine::space_of(shard),
            reads: ReadGate::default(),
            quiet: tokio::sync::RwLock::new(()),
            held,
        };
        self.replicas
            .write()
            .unwrap()
            .insert(shard, Arc::new(replica));
        Ok(())
    }

    /// The first replica of each shard creates its group once; the others
    /// learn the membership from it. Only a cluster's first layout does
    /// this: later replicas join groups that exist.
    async fn initialize_groups(&self) -> anyhow::Result<()> {
        let layout = self.layout();
        for shard in self.local_shards() {
            let members = layout.replicas(shard);
            let Some(replica) = self.replica(shard) else {
                continue;
            };
            if members[0] != self.id || replica.raft.is_initialized().await? {
                continue;
            }
            let nodes: BTreeMap<NodeId, BasicNode> = members
                .iter()
                .map(|n| (*n, basic_node(&layout, *n)))
                .collect();
            if let Err(e) = replica.raft.initialize(nodes).await {
                tracing::debug!(%shard, "initialize: {e}");
            }
        }
        Ok(())
    }

    /// The newest layout this node knows.
    pub fn layout(&self) -> Arc<Layout> {
        self.layout.read().unwrap().clone()
    }

    /// Takes `next` as this node's layout if it is newer, then makes the
    /// local replicas match it. Returns the chunk ids of replicas closed.
    pub async fn adopt(&self, next: Layout) -> anyhow::Result<Vec<ChunkId>> {
        if next.epoch > self.layout().epoch {
            let bytes = encode(&next);
            self.opener
                .meta
                .blocking(move |s| {
                    let mut b = Batch::default();
                    b.insert(LAYOUT_KEY, bytes);
                    s.apply(NODE_SPACE, b)
                })
                .await?;
            self.flusher.sync_meta().await?;
            *self.layout.write().unwrap() = Arc::new(next);
            tracing::info!(epoch = self.layout().epoch, "adopted a new layout");
        }
        self.reconcile().await
    }

    /// Opens the replicas the layout assigns here that are not open, and
    /// closes and wipes the ones it no longer assigns. Compares against the
    /// replicas actually open, so a step that failed is tried again on the
    /// next call. Returns the chunk ids of replicas closed.
    async fn reconcile(&self) -> anyhow::Result<Vec<ChunkId>> {
        let (want, have) = (self.layout().shards_of(self.id), self.local_shards());
        for &shard in want.iter().filter(|s| !have.contains(s)) {
            self.wipe(shard).await?;
            self.open(shard).await?;
            tracing::info!(%shard, "opened a replica the layout assigns here");
        }
        let mut dropped = Vec::new();
        for shard in have.into_iter().filter(|s| !want.contains(s)) {
            let replica = self.replicas.write().unwrap().remove(&shard);
            if let Some(r) = replica {
                let _ = r.raft.shutdown().await;
                let store = self.opener.state.clone();
                let recorded =
                    tokio::task::spawn_blocking(move || r.recorded_chunks(&store)).await?;
                dropped.extend(recorded?.into_iter().map(|(id, _)| id));
            }
            self.wipe(shard).await?;
            tracing::info!(%shard, "closed and wiped a replica the layout moved away");
        }
        Ok(dropped)
    }

    /// Forgets everything this node stored of `shard`: its state, vote,
    /// log entries and snapshot files.
    async fn wipe(&self, shard: ShardId) -> anyhow::Result<()> {
        let o = &self.opener;
        let (log, meta) = (o.log.clone(), o.meta.clone());
        o.state
            .blocking(move |state| {
                state.remove_space(&state_machine::space_of(shard))?;
                meta.remove_space(&super::log_store::space_of(shard))?;
                Ok(log.truncate(shard, 0))
            })
            .await??;
        // A replica opened here later must not find any of it after a crash.
        self.flusher.sync_all().await?;
        let prefix = format!("shard-{shard}.");
        for f in std::fs::read_dir(&o.snapshots)? {
            let f = f?;
            if f.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_file(f.path())?;
            }
        }
        Ok(())
    }

    fn replica(&self, shard: ShardId) -> Option<Arc<Replica>> {
        self.replicas.read().unwrap().get(&shard).cloned()
    }

    pub fn raft(&self, shard: ShardId) -> Option<Raft> {
        self.replica(shard).map(|r| r.raft.clone())
    }

    /// The Raft of `shard` to deliver a peer's message to. Without a local
    /// replica, the layout follower is told to look for a newer layout.
    pub fn raft_for_peer(&self, shard: ShardId) -> Option<Raft> {
        let raft = self.raft(shard);
        if raft.is_none() {
            self.layout_stale.notify_one();
        }
        raft
    }

    /// Waits until a peer has talked about a shard this node lacks.
    pub async fn layout_maybe_stale(&self) {
        self.layout_stale.notified().await
    }

    /// True while the data disk is below its reserve.
    pub fn disk_is_low(&self) -> bool {
        self.opener.space.is_low()
    }

    /// If this node leads `shard`: the other voter furthest along its log,
    /// to lead it instead.
    pub fn heir(&self, shard: ShardId) -> Option<NodeId> {
        let metrics = self.replica(shard)?.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(self.id) {
            return None;
        }
        let matched = |n: &NodeId| {
            let replication = metrics.replication.as_ref()?;
            replication.get(n).cloned().flatten().map(|l| l.index)
        };
        let voters = metrics.membership_config.membership().voter_ids();
        voters.filter(|v| *v != self.id).max_by_key(matched)
    }

    /// This node's replicas, in shard order.
    pub fn local_shards(&self) -> Vec<ShardId> {
        let mut v: Vec<_> = self.replicas.read().unwrap().keys().copied().collect();
        v.sort();
        v
    }

    /// Every chunk the local replicas record, shard by shard. Blocks.
    pub fn recorded_chunks(&self) -> Result<Vec<ChunkId>, ShardError> {
        let replicas: Vec<Arc<Replica>> = self.replicas.read().unwrap().values().cloned().collect();
        let mut all = Vec::new();
        for r in replicas {
            all.extend(
                r.recorded_chunks(&self.opener.state)?
                    .into_iter()
                    .map(|(id, _)| id),
            );
        }
        Ok(all)
    }

    /// The chunks and their sizes that the local replica of `shard`
    /// records; `None` if there is none here. Blocks.
    pub fn recorded_chunks_of(
        &self,
        shard: ShardId,
    ) -> Option<Result<Vec<(ChunkId, u64)>, ShardError>> {
        Some(self.replica(shard)?.recorded_chunks(&self.opener.state))
    }

    /// True if a local replica of the chunk's shard records it. Blocks.
    pub fn records_chunk(&self, id: &ChunkId) -> bool {
        let shard = self.layout().shard_for_chunk(id);
        self.replica(shard).is_some_and(|r| {
            self.opener
                .state
                .get(&r.space, &super::state::chunk_key(id))
                .is_ok_and(|v| v.is_some())
        })
    }

    pub fn addr_of(&self, node: NodeId) -> Option<std::net::SocketAddr> {
        self.layout().addr_of(node)
    }

    /// The node's state and meta stores.
    pub fn stores(&self) -> Stores {
        Stores {
            state: self.opener.state.clone(),
            meta: self.opener.meta.clone(),
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The Raft log every local replica shares.
    pub fn log(&self) -> &Arc<SegmentLog> {
        &self.opener.log
    }

    /// Replicates `cmd` through `shard`'s log and returns its result.
    pub async fn propose(&self, shard: ShardId, cmd: &Command) -> Reply {
        self.route(shard, Call::Propose(cmd)).await
    }

    /// Answers `q` from `shard`'s leader after confirming its leadership.
    pub async fn query(&self, shard: ShardId, q: &Query) -> Reply {
        self.route(shard, Call::Query(q)).await
    }

    /// Runs a membership change or progress check on `shard`'s leader.
    pub async fn membership(&self, shard: ShardId, op: &MembershipOp) -> Reply {
        self.route(shard, Call::Membership(op)).await
    }

    /// Sends `call` to `shard`'s leader, following leader hints and trying
    /// other replicas until one answers. A proposal whose outcome is
    /// unknown (not committed in time, the answer lost) is sent again only
    /// if it carries a write id, which the state machine applies once
    /// (`State::apply_once`); any other could apply twice, and a delete
    /// applied again after a later PUT would lose that PUT.
    async fn route(&self, shard: ShardId, call: Call<'_>) -> Reply {
        let members = self.layout().replicas(shard);
        let deadline = Instant::now() + ROUTE_DEADLINE;
        let mut target = self.leader_hint(shard).unwrap_or(members[0]);
        let repeatable = match &call {
            Call::Propose(c) => c.write_id().is_some(),
            Call::Query(_) | Call::Membership(_) => true,
        };
        let mut attempt = 0usize;
        loop {
            if target != self.id && self.leader_silent(shard, target) {
                // Paused, cut off or gone: a call would wait out a
                // connection timeout. Its followers elect another soon.
                if let Some(l) = self.await_other_leader(shard, target, true).await {
                    target = l;
                }
            }
            let (result, delivered) = if target == self.id {
                let result = match &call {
                    Call::Propose(c) => self.propose_here(shard, c).await,
                    Call::Query(q) => self.query_here(shard, q).await,
                    Call::Membership(op) => self.membership_here(shard, op).await,
                };
                (result, true)
            } else {
                self.call_remote(target, shard, &call).await
            };
            let leader = match &result {
                Err(ShardError::NotLeader { leader }) => *leader,
                Err(ShardError::Unavailable(_)) if repeatable || !delivered => None,
                Err(ShardError::Unavailable(_)) => return result,
                _ => {
                    self.hints
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(shard, target);
                    return result;
                }
            };
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(ShardError::Unavailable(format!(
                    "shard {shard} has no reachable leader: {}",
                    result.err().map(|e| e.to_string()).unwrap_or_default()
                )));
            }
            // A hint may name a node this node's layout does not list as a
            // replica yet (it is behind on a move); any member will do.
            let known = |l: &NodeId| members.contains(l) || self.addr_of(*l).is_some();
            target = match leader.filter(|l| known(l) && *l != target) {
                Some(l) => l,
                None => match self.await_other_leader(shard, target, false).await {
                    Some(l) => l,
                    None => {
                        // Nothing local to wait on: back off a little and
                        // try the next replica, not the one that just failed.
                        let pause = Duration::from_millis(20 * attempt.min(25) as u64);
                        tokio::time::sleep(pause).await;
                        let next = members[attempt % members.len()];
                        if next == target && members.len() > 1 {
                            members[(attempt + 1) % members.len()]
                        } else {
                            next
                        }
                    }
                },
            };
        }
    }

    /// The leader this node's own replica of `shard` learns of, other than
    /// `failed`, within about an election: after a call to `failed` found
    /// no leader there (or no answer), or while `failed` is silent (then
    /// the wait ends if it speaks again). Until an election ends the local
    /// hint still names `failed`, and each call to it cost a connection
    /// timeout. None without a local replica, or when no other leader
    /// appears.
    async fn await_other_leader(
        &self,
        shard: ShardId,
        failed: NodeId,
        while_silent: bool,
    ) -> Option<NodeId> {
        let r = self.replica(shard)?;
        if r.held.is_held() {
            // The replica's core waits for disk space: it learns nothing.
            return None;
        }
        let election = Duration::from_millis(self.opener.config.election_timeout_max);
        let until = Instant::now() + election * 2;
        loop {
            let leader = r.raft.metrics().borrow().current_leader;
            if let Some(l) = leader.filter(|&l| l != failed) {
                return Some(l);
            }
            if Instant::now() >= until || (while_silent && !self.leader_silent(shard, failed)) {
                return None;
            }
            tokio::time::sleep(LEADER_POLL).await;
        }
    }

    /// Notes that `leader` sent this node's replica of `shard` an
    /// AppendEntries (a heartbeat at least every `heartbeat_ms`).
    pub fn heard_from_leader(&self, shard: ShardId, leader: NodeId) {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(shard, leader);
    }

    /// Whether `node` led this node's replica of `shard` and has sent it
    /// nothing for several heartbeats, while other leaders reach this node:
    /// then `node` is paused, cut off or gone. False without that evidence
    /// (no replica here, never heard from `node`, or this node hears no one
    /// either, as when it was the one cut off or paused).
    fn leader_silent(&self, shard: ShardId, node: NodeId) -> bool {
        let after = Duration::from_millis(self.opener.config.heartbeat_interval * 4);
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .silent(shard, node, after)
    }

    /// Who leads `shard` once a call reached its leader; None if none did.
    pub async fn find_leader(&self, shard: ShardId) -> Option<NodeId> {
        let progress = MembershipOp::Progress { node: self.id };
        self.membership(shard, &progress).await.ok()?;
        self.leader_hint(shard)
    }

    pub fn leader_hint(&self, shard: ShardId) -> Option<NodeId> {
        if let Some(r) = self.replica(shard) {
            if let Some(l) = r.raft.metrics().borrow().current_leader {
                return Some(l);
            }
        }
        self.hints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .copied()
    }

    /// Runs `call` on node `target`; also tells whether the call may have
    /// reached it (false: it certainly did not run there).
    async fn call_remote(&self, target: NodeId, shard: ShardId, call: &Call<'_>) -> (Reply, bool) {
        let Some(addr) = self.addr_of(target) else {
            let unknown = ShardError::Internal(format!("unknown node {target}"));
            return (Err(unknown), false);
        };
        let mut client = match self.pool.client(addr) {
            Ok(client) => client,
            Err(e) => return (Err(e), false),
        };
        let msg = pb::ShardCall {
            shard: shard.0,
            payload: match call {
                Call::Propose(c) => encode(*c).into(),
                Call::Query(q) => encode(*q).into(),
                Call::Membership(op) => encode(*op).into(),
            },
        };
        let reply = match call {
            Call::Propose(_) => client.propose(msg).await,
            Call::Query(_) => client.query(msg).await,
            Call::Membership(_) => client.change_membership(msg).await,
        };
        match reply {
            Ok(r) => (
                decode::<Reply>(&r.into_inner().payload).and_then(|r| r),
                true,
            ),
            Err(s) => {
                let failure = Failure::of(&s);
                let delivered = !matches!(failure, Failure::NotDelivered(_));
                (Err(failure.into_error()), delivered)
            }
        }
    }

    /// Runs `cmd` if this node leads `shard`; `NotLeader` otherwise.
    pub async fn propose_here(&self, shard: ShardId, cmd: &Command) -> Reply {
        let Some(r) = self.replica(shard) else {
            return Err(ShardError::NotLeader { leader: None });
        };
        if r.held.is_held() {
            return Err(ShardError::NotLeader { leader: None });
        }
        if cmd.adds_data() {
            if let Some(why) = self.opener.space.refusal() {
                return Err(ShardError::InsufficientStorage(why));
            }
        }
        let _speaking = r.quiet.read().await;
        // `NotLeader` must mean "not proposed" (see `route`): refuse here
        // while this node does not lead, as openraft also answers
        // ForwardToLeader for an entry it appended and then dropped, which
        // another node may still hold and commit.
        let leader = r.raft.metrics().borrow().current_leader;
        if leader != Some(self.id) {
            return Err(ShardError::NotLeader { leader });
        }
        let write = tokio::time::timeout(WRITE_DEADLINE, r.raft.client_write(cmd.clone()));
        let outcome = tokio::select! {
            outcome = write => outcome,
            // The entry waits for disk space here, where it may stay for
            // good; the retry goes to the leader the followers elect.
            () = r.held.until_held() => {
                return Err(ShardError::Unavailable(format!(
                    "shard {shard}'s log waits for disk space on its leader; the write may yet commit"
                )));
            }
        };
        match outcome {
            Err(_) => Err(ShardError::Unavailable(format!(
                "shard {shard} did not commit within {WRITE_DEADLINE:?}; it may yet"
            ))),
            Ok(Ok(resp)) => resp.data,
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ShardError::Unavailable(format!(
                    "shard {shard} changed leader (now {:?}) while the write was pending; it may yet commit",
                    f.leader_id
                )))
            }
            Ok(Err(e)) => Err(ShardError::Unavailable(e.to_string())),
        }
    }

    /// Runs `op` if this node leads `shard`; `NotLeader` otherwise.
    pub async fn membership_here(&self, shard: ShardId, op: &MembershipOp) -> Reply {
        let Some(r) = self.replica(shard) else {
            return Err(ShardError::NotLeader { leader: None });
        };
        if let MembershipOp::Elect = op {
            r.raft
                .trigger()
                .elect()
                .await
                .map_err(|e| ShardError::Unavailable(e.to_string()))?;
            return Ok(Value::Done);
        }
        let metrics = r.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(self.id) {
            return Err(ShardError::NotLeader {
                leader: metrics.current_leader,
            });
        }
        let failed = |e: String| ShardError::Unavailable(format!("shard {shard}: {e}"));
        match op {
            MembershipOp::AddLearner { node, addr } => {
                let named = BasicNode { addr: addr.clone() };
                r.raft
                    .add_learner(*node, named, false)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
            }
            MembershipOp::Progress { node } => {
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|m| m.get(node).cloned().flatten())
                    .map_or(0, |l| l.index);
                let last = metrics.last_log_index.unwrap_or(0);
                return Ok(Value::Progress { matched, last });
            }
            MembershipOp::SetVoters { voters } => {
                let voters: std::collections::BTreeSet<NodeId> = voters.iter().copied().collect();
                tokio::time::timeout(WRITE_DEADLINE, r.raft.change_membership(voters, false))
                    .await
                    .map_err(|_| failed(format!("membership change took over {WRITE_DEADLINE:?}")))?
                    .map_err(|e| failed(e.to_string()))?;
            }
            MembershipOp::DropLearner { node } => {
                let membership = metrics.membership_config.membership().clone();
                if membership.voter_ids().any(|v| v == *node) {
                    return Err(ShardError::InvalidArgument(format!(
                        "node {node} is a voter of shard {shard}, not a learner"
                    )));
                }
                if membership.learner_ids().any(|l| l == *node) {
                    let gone = openraft::ChangeMembers::RemoveNodes([*node].into());
                    tokio::time::timeout(WRITE_DEADLINE, r.raft.change_membership(gone, false))
                        .await
                        .map_err(|_| {
                            failed(format!("membership change took over {WRITE_DEADLINE:?}"))
                        })?
                        .map_err(|e| failed(e.to_string()))?;
                }
            }
            MembershipOp::TransferLeader { node } => self.hand_over(shard, &r, *node).await?,
            MembershipOp::Elect => unreachable!("handled above"),
        }
        Ok(Value::Done)
    }

    /// Makes `node` the leader of `shard`, which this node leads. openraft
    /// 0.9 has no leader transfer and followers refuse elections while a
    /// leader's lease lasts, so the leader goes quiet (no heartbeats, writes
    /// and reads held back) until the leases end and then asks `node` to
    /// stand; its up-to-date log wins the vote. Held-back calls then go on
    /// and find the new leader.
    async fn hand_over(&self, shard: ShardId, r: &Replica, node: NodeId) -> Result<(), ShardError> {
        if node == self.id {
            // Already there: going quiet would only hand it to someone else.
            return Ok(());
        }
        let addr = self
            .addr_of(node)
            .ok_or_else(|| ShardError::InvalidArgument(format!("unknown node {node}")))?;
        let raft = &r.raft;
        let voter = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == node);
        if !voter {
            return Err(ShardError::InvalidArgument(format!(
                "node {node} is not a voter of shard {shard}"
            )));
        }
        let lease = Duration::from_millis(self.opener.config.election_timeout_max);
        // Calls stuck on a log that cannot append (a full disk) would hold
        // the lock to their deadline: past a lease, hand over without
        // holding new calls back.
        let _quiet = tokio::time::timeout(lease, r.quiet.write()).await.ok();
        raft.runtime_config().heartbeat(false);
        tokio::time::sleep(lease + Duration::from_millis(50)).await;
        let msg = pb::ShardCall {
            shard: shard.0,
            payload: encode(&MembershipOp::Elect).into(),
        };
        let asked = match self.pool.client(addr) {
            Ok(mut c) => c
                .change_membership(msg)
                .await
                .map(|_| ())
                .map_err(|s| error_of(&s)),
            Err(e) => Err(e),
        };
        let mut metrics = raft.metrics();
        let handed = tokio::time::timeout(lease * 2, async {
            while metrics.borrow().current_leader == Some(self.id) {
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        raft.runtime_config().heartbeat(true);
        asked?;
        handed.map_err(|_| {
            ShardError::Unavailable(format!("shard {shard}: node {node} did not take over"))
        })
    }

    /// Answers `q` if this node leads `shard` and a quorum confirms it.
    pub async fn query_here(&self, shard: ShardId, q: &Query) -> Reply {
        let Some(r) = self.replica(shard) else {
            return Err(ShardError::NotLeader { leader: None });
        };
        let not_here = || ShardError::NotLeader { leader: None };
        if r.held.is_held() {
            return Err(not_here());
        }
        {
            let _speaking = r.quiet.read().await;
            tokio::select! {
                confirmed = r.reads.confirm(&r.raft) => confirmed?,
                () = r.held.until_held() => return Err(not_here()),
            }
        }
        let (space, q) = (r.space.clone(), q.clone());
        self.opener
            .state
            .blocking(move |s| Ok(State::new(&*s.read(&space)?).query(&q)))
            .await?
    }

    /// The first local replica whose Raft has stopped on a fatal error
    /// (a storage failure, most likely), with the error.
    pub fn stopped_replica(&self) -> Option<(ShardId, String)> {
        let replicas: Vec<(ShardId, Arc<Replica>)> = self
            .replicas
            .read()
            .unwrap()
            .iter()
            .map(|(s, r)| (*s, r.clone()))
            .collect();
        replicas.into_iter().find_map(|(shard, r)| {
            let m = r.raft.metrics();
            let stopped = m.borrow().running_state.clone().err();
            stopped.map(|e| (shard, e.to_string()))
        })
    }

    /// A snapshot of every local replica's Raft view, for `admin status`.
    pub fn status(&self) -> Vec<pb::ShardStatus> {
        self.local_shards()
            .into_iter()
            .filter_map(|s| {
                let m = self.replica(s)?.raft.metrics().borrow().clone();
                Some(pb::ShardStatus {
                    shard: s.0,
                    leader: m.current_leader.unwrap_or(0),
                    voters: m.membership_config.membership().voter_ids().collect(),
                    last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
                    term: m.current_term,
                })
            })
            .collect()
    }

    /// Stops every Raft of this node.
    pub async fn shutdown(&self) {
        let replicas: Vec<Arc<Replica>> = self.replicas.read().unwrap().values().cloned().collect();
        for r in replicas {
            let _ = r.raft.shutdown().await;
        }
    }
}

impl Replica {
    /// The chunks (and sizes) this replica's state records. Blocks.
    fn recorded_chunks(&self, store: &Store) -> Result<Vec<(ChunkId, u64)>, ShardError> {
        chunks_with_sizes(&*store.read(&self.space)?)
    }
}

/// How openraft names a node in a membership: by its internal address.
pub fn basic_node(layout: &Layout, node: NodeId) -> BasicNode {
    BasicNode {
        addr: layout
            .addr_of(node)
            .map(|a| a.to_string())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_leader_is_silent_only_while_other_leaders_are_heard() {
        let (a, b) = (ShardId(1), ShardId(2));
        let after = Duration::from_millis(600);
        let mut heard = Heard::default();
        // Never heard: no evidence either way.
        assert!(!heard.silent(a, 3, after));
        heard.note(a, 3);
        heard.note(b, 2);
        assert!(!heard.silent(a, 3, after));
        // Node 3 goes quiet while node 2 keeps sending heartbeats.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(150)).await;
            heard.note(b, 2);
        }
        assert!(heard.silent(a, 3, after));
        // Only the leader last heard on the shard can be silent on it.
        assert!(!heard.silent(a, 1, after));
        // A new leader speaks on the shard.
        heard.note(a, 1);
        assert!(!heard.silent(a, 3, after));
        // This node hears no one (it was the one paused or cut off): no
        // leader counts as silent.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!heard.silent(a, 1, after));
        assert!(!heard.silent(b, 2, after));
    }
}
