//! All shard replicas of one node, and the routing of commands and queries
//! to whichever node leads a shard.
//!
//! A caller anywhere in the cluster can `propose` to or `query` any shard:
//! the host runs it locally when this node leads the shard, forwards it to
//! the leader otherwise, and follows "not leader" hints and elections until
//! a deadline passes.

use super::command::{decode, encode, Command, Query, Reply, ShardError};
use super::log_store::{Flusher, LogStore};
use super::network::Network;
use super::read_gate::ReadGate;
use super::segment_log::SegmentLog;
use super::state::State;
use super::state_machine::StateMachine;
use super::Raft;
use crate::config::{ClusterSpec, RaftTuning};
use crate::placement::Layout;
use crate::rpc::{error_of, pb, Pool};
use crate::types::{ChunkId, NodeId, ShardId};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How long a call keeps looking for a shard's leader.
const ROUTE_DEADLINE: Duration = Duration::from_secs(15);
/// How long a leader may take to commit one command.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// One local replica: its Raft handle and a read view of its state.
struct Replica {
    raft: Raft,
    state: State,
    reads: ReadGate,
}

/// The shards of this node.
pub struct ShardHost {
    pub id: NodeId,
    pub layout: Layout,
    spec: ClusterSpec,
    replicas: HashMap<ShardId, Replica>,
    pool: Arc<Pool>,
    /// Last leader seen per shard, to send the next call straight there.
    hints: Mutex<HashMap<ShardId, NodeId>>,
    pub flusher: Flusher,
}

/// A call to run on a shard's leader.
enum Call<'a> {
    Propose(&'a Command),
    Query(&'a Query),
}

impl ShardHost {
    /// Opens (or creates) every replica this node holds and starts its Raft.
    /// `data_dir` holds the segment log (`raftlog/`) and snapshot files.
    pub async fn start(
        id: NodeId,
        spec: &ClusterSpec,
        tuning: &RaftTuning,
        db: &sled::Db,
        data_dir: &std::path::Path,
        pool: Arc<Pool>,
        chunk_refs: super::state_machine::ChunkRefs,
    ) -> anyhow::Result<ShardHost> {
        let layout = spec.layout();
        let config = Arc::new(
            Config {
                cluster_name: "lumbung".into(),
                heartbeat_interval: tuning.heartbeat_ms,
                election_timeout_min: tuning.election_min_ms,
                election_timeout_max: tuning.election_max_ms,
                snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_every),
                max_in_snapshot_log_to_keep: tuning.snapshot_every / 10,
                install_snapshot_timeout: 10_000,
                ..Default::default()
            }
            .validate()?,
        );
        let log = Arc::new(SegmentLog::open(&data_dir.join("raftlog"))?);
        let snapshots = data_dir.join("snapshots");
        std::fs::create_dir_all(&snapshots)?;
        let flusher = Flusher::start(db.clone(), log.clone());
        let mut replicas = HashMap::new();
        for shard in layout.shards_of(id) {
            let log_store = LogStore::open(db, log.clone(), shard, flusher.clone())?;
            let state = State::new(db.open_tree(format!("sm/{shard}"))?);
            let sm = StateMachine::new(
                shard,
                state.clone(),
                flusher.clone(),
                chunk_refs.clone(),
                snapshots.clone(),
            );
            let network = Network {
                shard,
                pool: pool.clone(),
            };
            let raft = Raft::new(id, config.clone(), network, log_store, sm).await?;
            replicas.insert(
                shard,
                Replica {
                    raft,
                    state,
                    reads: ReadGate::default(),
                },
            );
        }
        let host = ShardHost {
            id,
            layout,
            spec: spec.clone(),
            replicas,
            pool,
            hints: Mutex::new(HashMap::new()),
            flusher,
        };
        host.initialize_groups().await?;
        Ok(host)
    }

    /// The first replica of each shard creates its group once; the others
    /// learn the membership from it.
    async fn initialize_groups(&self) -> anyhow::Result<()> {
        for (shard, replica) in &self.replicas {
            let members = self.layout.replicas(*shard);
            if members[0] != self.id || replica.raft.is_initialized().await? {
                continue;
            }
            let nodes: BTreeMap<NodeId, BasicNode> = members
                .iter()
                .map(|n| {
                    let addr = self
                        .spec
                        .addr_of(*n)
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    (*n, BasicNode { addr })
                })
                .collect();
            if let Err(e) = replica.raft.initialize(nodes).await {
                tracing::debug!(%shard, "initialize: {e}");
            }
        }
        Ok(())
    }

    pub fn raft(&self, shard: ShardId) -> Option<&Raft> {
        self.replicas.get(&shard).map(|r| &r.raft)
    }

    /// This node's replicas, in shard order.
    pub fn local_shards(&self) -> Vec<ShardId> {
        let mut v: Vec<_> = self.replicas.keys().copied().collect();
        v.sort();
        v
    }

    /// Every chunk the local replicas record, shard by shard.
    pub fn recorded_chunks(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.replicas.values().flat_map(|r| r.state.chunk_ids())
    }

    pub fn addr_of(&self, node: NodeId) -> Option<std::net::SocketAddr> {
        self.spec.addr_of(node)
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Replicates `cmd` through `shard`'s log and returns its result.
    pub async fn propose(&self, shard: ShardId, cmd: &Command) -> Reply {
        self.route(shard, Call::Propose(cmd)).await
    }

    /// Answers `q` from `shard`'s leader after confirming its leadership.
    pub async fn query(&self, shard: ShardId, q: &Query) -> Reply {
        self.route(shard, Call::Query(q)).await
    }

    async fn route(&self, shard: ShardId, call: Call<'_>) -> Reply {
        let members = self.layout.replicas(shard);
        let deadline = Instant::now() + ROUTE_DEADLINE;
        let mut target = self.leader_hint(shard).unwrap_or(members[0]);
        let mut attempt = 0usize;
        loop {
            let result = if target == self.id {
                match &call {
                    Call::Propose(c) => self.propose_here(shard, c).await,
                    Call::Query(q) => self.query_here(shard, q).await,
                }
            } else {
                self.call_remote(target, shard, &call).await
            };
            let leader = match &result {
                Err(ShardError::NotLeader { leader }) => *leader,
                Err(ShardError::Unavailable(_)) => None,
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
            target = match leader.filter(|l| members.contains(l) && *l != target) {
                Some(l) => l,
                None => {
                    // No usable hint: an election is likely running. Back off
                    // a little and try the next replica.
                    tokio::time::sleep(Duration::from_millis(20 * attempt.min(25) as u64)).await;
                    members[attempt % members.len()]
                }
            };
        }
    }

    fn leader_hint(&self, shard: ShardId) -> Option<NodeId> {
        if let Some(r) = self.replicas.get(&shard) {
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

    async fn call_remote(&self, target: NodeId, shard: ShardId, call: &Call<'_>) -> Reply {
        let addr = self
            .spec
            .addr_of(target)
            .ok_or_else(|| ShardError::Internal(format!("unknown node {target}")))?;
        let mut client = self.pool.client(addr)?;
        let msg = pb::ShardCall {
            shard: shard.0,
            payload: match call {
                Call::Propose(c) => encode(*c).into(),
                Call::Query(q) => encode(*q).into(),
            },
        };
        let reply = match call {
            Call::Propose(_) => client.propose(msg).await,
            Call::Query(_) => client.query(msg).await,
        };
        match reply {
            Ok(r) => decode::<Reply>(&r.into_inner().payload)?,
            Err(s) => Err(error_of(&s)),
        }
    }

    /// Runs `cmd` if this node leads `shard`; `NotLeader` otherwise.
    pub async fn propose_here(&self, shard: ShardId, cmd: &Command) -> Reply {
        let Some(r) = self.replicas.get(&shard) else {
            return Err(ShardError::NotLeader { leader: None });
        };
        match tokio::time::timeout(WRITE_DEADLINE, r.raft.client_write(cmd.clone())).await {
            Err(_) => Err(ShardError::Unavailable(format!(
                "shard {shard} did not commit within {WRITE_DEADLINE:?}"
            ))),
            Ok(Ok(resp)) => resp.data,
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ShardError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Ok(Err(e)) => Err(ShardError::Unavailable(e.to_string())),
        }
    }

    /// Answers `q` if this node leads `shard` and a quorum confirms it.
    pub async fn query_here(&self, shard: ShardId, q: &Query) -> Reply {
        let Some(r) = self.replicas.get(&shard) else {
            return Err(ShardError::NotLeader { leader: None });
        };
        r.reads.confirm(&r.raft).await?;
        r.state.query(q)
    }

    /// A snapshot of every local replica's Raft view, for `admin status`.
    pub fn status(&self) -> Vec<pb::ShardStatus> {
        self.local_shards()
            .into_iter()
            .filter_map(|s| {
                let m = self.replicas.get(&s)?.raft.metrics().borrow().clone();
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
        for r in self.replicas.values() {
            let _ = r.raft.shutdown().await;
        }
    }
}
