//! The cluster under test and the faults it suffers: three nodes, each in
//! its own network namespace (its data directory optionally on a tmpfs of
//! its own), and a gateway in the hub.

use crate::common::processes::Processes;
use crate::network::{Network, Tmpfs};
use lumbung::config::AdminConfig;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Nodes in the cluster (RF 3).
pub const NODES: usize = 3;

/// Size of the tmpfs under each node's data directory, in MiB.
pub const DISK_MIB: u64 = 256;

/// The free space a node keeps on its small disk (`[space] reserve_mib`):
/// below it, it refuses new data (507); below half of it, its Raft log
/// appends wait for room.
pub const RESERVE_MIB: u64 = 64;

/// The faults, one kind per cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL, then a restart.
    Kill,
    /// SIGSTOP, then SIGCONT: a process that is alive but does nothing.
    Pause,
    /// The node's cable unplugged, then plugged back in.
    Partition,
    /// The node's disk filled to the brim, then the filler removed.
    DiskFull,
}

impl Fault {
    /// The fault called `name` (its [`name`](Self::name) or `disk`).
    pub fn named(name: &str) -> Option<Fault> {
        [Fault::Kill, Fault::Pause, Fault::Partition, Fault::DiskFull]
            .into_iter()
            .find(|f| f.name() == name || (name == "disk" && *f == Fault::DiskFull))
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Partition => "partition",
            Fault::DiskFull => "disk full",
        }
    }
}

/// One thing that keeps the cluster from being settled.
pub struct Unsettled {
    /// The node it is about, when it is about one node.
    pub node: Option<usize>,
    pub what: String,
}

/// The running cluster. Fields drop in order: processes first (a mount
/// cannot go while a node uses it), then disks, then the network.
pub struct Cluster {
    pub procs: Processes,
    disks: BTreeMap<usize, Tmpfs>,
    pub net: Network,
    pub admin: AdminConfig,
    /// Processes that ended without being asked to, as readable lines.
    pub unexpected_exits: Vec<String>,
    /// How often each slot ended by itself: one that keeps ending is not
    /// started again and again.
    ended_count: BTreeMap<usize, usize>,
}

/// A process that ended by itself this often is left down.
const MAX_RESTARTS: usize = 3;

impl Cluster {
    /// Starts the nodes, each in its namespace, and the gateway in the hub.
    /// With `small_disks`, each node's data directory is a tmpfs of
    /// [`DISK_MIB`], and the node keeps [`RESERVE_MIB`] of it free. Every
    /// process runs `binary`.
    pub fn start(dir: &Path, binary: &Path, net: Network, small_disks: bool) -> Cluster {
        let mut procs = Processes::new(dir);
        procs.use_binary(binary);
        let mut disks = BTreeMap::new();
        for id in 1..=NODES {
            procs.run_in_namespace(id, net.node_ns(id));
            if small_disks {
                let data = dir.join("data").join(format!("node{id}"));
                disks.insert(id, Tmpfs::mount(&data, DISK_MIB));
                set_reserve(&dir.join(format!("node{id}.toml")), RESERVE_MIB);
            }
        }
        procs.run_in_namespace(0, &net.hub);
        for slot in [1, 2, 3, 0] {
            procs.spawn(slot);
        }
        Cluster {
            procs,
            disks,
            net,
            admin: lumbung::config::load(&dir.join("admin.toml")).unwrap(),
            unexpected_exits: Vec::new(),
            ended_count: BTreeMap::new(),
        }
    }

    /// Starts `fault` on `node` (a full disk keeps `disk_left` bytes
    /// free); returns a line saying what was done.
    pub fn inject(&mut self, fault: Fault, node: usize, disk_left: u64) -> String {
        match fault {
            Fault::Kill => {
                self.procs.kill(node);
                format!("SIGKILL node {node}")
            }
            Fault::Pause => {
                self.procs.signal(node, libc::SIGSTOP);
                format!("SIGSTOP node {node}")
            }
            Fault::Partition => {
                self.net.unplug(node);
                format!("unplugged node {node}")
            }
            Fault::DiskFull => {
                let disk = &self.disks[&node];
                let taken = disk.fill(disk_left);
                format!(
                    "filled node {node}'s disk ({} MiB taken, {} MiB left, reserve {RESERVE_MIB} MiB)",
                    taken >> 20,
                    disk.free_bytes() >> 20
                )
            }
        }
    }

    /// Ends `fault` on `node`.
    pub fn heal(&mut self, fault: Fault, node: usize) {
        match fault {
            Fault::Kill => self.procs.spawn(node),
            Fault::Pause => self.procs.signal(node, libc::SIGCONT),
            Fault::Partition => self.net.plug(node),
            Fault::DiskFull => self.disks[&node].unfill(),
        }
    }

    /// Records every process that ended by itself since the last look
    /// (`at`: the test's clock, for the record); returns the slots.
    pub fn reap(&mut self, at: Duration) -> Vec<usize> {
        let ended = self.procs.reap_exited();
        for (slot, status) in &ended {
            let what = if *slot == 0 {
                "the gateway".to_string()
            } else {
                format!("node {slot}")
            };
            let line = format!(
                "{what} ended by itself ({status}) at {:.1} s",
                at.as_secs_f64()
            );
            println!("!! {line}");
            self.unexpected_exits.push(line);
            *self.ended_count.entry(*slot).or_default() += 1;
        }
        ended.into_iter().map(|(slot, _)| slot).collect()
    }

    /// SIGKILLs every process (and SIGCONTs none: a stopped one dies too).
    pub fn stop_all(&mut self) {
        for slot in [0, 1, 2, 3] {
            self.procs.kill(slot);
        }
    }

    /// Starts again every process that is not running (after a fault is
    /// healed, a process that died of it gets its restart), unless it
    /// already ended by itself [`MAX_RESTARTS`] times.
    pub fn restart_missing(&mut self) {
        for slot in [1, 2, 3, 0] {
            let given_up = self
                .ended_count
                .get(&slot)
                .is_some_and(|n| *n >= MAX_RESTARTS);
            if self.procs.pid(slot).is_none() && !given_up {
                self.procs.spawn(slot);
            }
        }
    }

    /// The leader of `shard`, as the nodes report it.
    pub async fn leader_of(&self, shard: u32) -> Option<usize> {
        let view = lumbung::admin::status::collect(&self.admin).await.ok()?;
        let s = view.shards.iter().find(|s| s.shard == shard)?;
        s.leader.map(|l| l as usize)
    }

    /// Each node's applied index per shard, `None` for a node that did not
    /// answer within a second.
    async fn applied(&self) -> Vec<Option<BTreeMap<u32, u64>>> {
        let pool = lumbung::rpc::Pool::new(&self.admin.tls).unwrap();
        let mut out = Vec::new();
        for addr in &self.admin.nodes {
            let mut client = pool.client(*addr).unwrap();
            let status = tokio::time::timeout(
                Duration::from_secs(1),
                client.status(lumbung::rpc::pb::Empty {}),
            )
            .await;
            out.push(match status {
                Ok(Ok(s)) => Some(
                    s.into_inner()
                        .shards
                        .iter()
                        .map(|s| (s.shard, s.last_applied))
                        .collect(),
                ),
                _ => None,
            });
        }
        out
    }

    /// What keeps the cluster from being settled: nodes that do not
    /// answer, shards without a leader or short of voters, and replicas
    /// that a second later still have not applied what the most advanced
    /// replica had (a replica whose Raft stopped never catches up, even if
    /// its process answers).
    pub async fn unsettled(&self) -> Vec<Unsettled> {
        let mut problems = Vec::new();
        let mut problem = |node, what| problems.push(Unsettled { node, what });
        match lumbung::admin::status::collect(&self.admin).await {
            Ok(view) => {
                for n in view.nodes.iter().filter(|n| !n.up) {
                    problem(None, format!("{} is {}", n.addr, n.health));
                }
                for s in &view.shards {
                    if s.leader.is_none() || s.voters.len() != NODES {
                        let what = format!(
                            "shard {} leader {:?} voters {:?}",
                            s.shard, s.leader, s.voters
                        );
                        problem(None, what);
                    }
                }
            }
            Err(e) => problem(None, format!("no status: {e:#}")),
        }
        if !problems.is_empty() {
            return problems;
        }
        let before = self.applied().await;
        let mut most: BTreeMap<u32, u64> = BTreeMap::new();
        for shards in before.iter().flatten() {
            for (shard, applied) in shards {
                let m = most.entry(*shard).or_default();
                *m = (*m).max(*applied);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (i, shards) in self.applied().await.iter().enumerate() {
            let id = i + 1;
            let Some(shards) = shards else {
                problems.push(Unsettled {
                    node: Some(id),
                    what: format!("node {id} did not answer"),
                });
                continue;
            };
            let behind: Vec<u32> = most
                .iter()
                .filter(|(shard, m)| shards.get(shard).copied().unwrap_or(0) < **m)
                .map(|(shard, _)| *shard)
                .collect();
            if !behind.is_empty() {
                problems.push(Unsettled {
                    node: Some(id),
                    what: format!("node {id} behind on shards {behind:?}"),
                });
            }
        }
        problems
    }

    /// Waits until nothing keeps the cluster from being settled; returns
    /// how long that took, or what was still wrong after `limit`.
    /// Processes found dead meanwhile are recorded and restarted.
    pub async fn settle(
        &mut self,
        limit: Duration,
        clock: impl Fn() -> Duration,
    ) -> Result<Duration, Vec<Unsettled>> {
        let started = Instant::now();
        loop {
            if !self.reap(clock()).is_empty() {
                self.restart_missing();
            }
            let problems = self.unsettled().await;
            if problems.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                return Err(problems);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// How many times node `id`'s log says its watchdog saw the process
    /// paused.
    pub fn pauses_logged(&self, id: usize) -> usize {
        std::fs::read_to_string(self.procs.log_path(id))
            .unwrap_or_default()
            .matches("the process was paused")
            .count()
    }
}

/// Sets `[space] reserve_mib` in the node config at `path`.
fn set_reserve(path: &Path, mib: u64) {
    let text = std::fs::read_to_string(path).unwrap();
    let line = format!("reserve_mib = {mib}");
    let text = match text.lines().position(|l| l.starts_with("reserve_mib =")) {
        Some(i) => {
            let mut lines: Vec<&str> = text.lines().collect();
            lines[i] = &line;
            lines.join("\n") + "\n"
        }
        None => format!("{text}\n[space]\n{line}\n"),
    };
    std::fs::write(path, text).unwrap();
}
