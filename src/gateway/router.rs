//! Which node a gateway sends a request to.
//!
//! Any node can coordinate any request, but the leader of the request's
//! shard does it without an internal hop. So the gateway keeps a routing
//! table (shard → leader, asked of every node each second) and sends a
//! bucket's requests to its index shard's leader.
//!
//! It also measures every node. Latency comes from those once-a-second
//! probes only: they are the same call to every node, whereas real calls
//! differ in weight from node to node (the leader of a busy bucket gets
//! its heavy ones). Failures come from probes and real calls alike. A node
//! whose call failed is passed over for a while; a node much slower than
//! the fastest is used only when no other is left. The probes go on
//! measuring both, so a node that recovers gets its work back in seconds.

use crate::config::TlsFiles;
use crate::placement::bucket_shard;
use crate::rpc::{client_of, pb, NodeChannel, NodeClient, Pool};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a node that failed is passed over.
const PENALTY: Duration = Duration::from_secs(3);
/// How often the routing table is refreshed and every node probed.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How long a probe may take before it counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.5;
/// A node this many times slower than the fastest is avoided...
const SLOW_FACTOR: f64 = 3.0;
/// ...once it is also slower than this, so jitter among fast nodes is no
/// reason to move work.
const SLOW_FLOOR_MS: f64 = 25.0;

/// What the gateway knows of one node.
#[derive(Clone, Debug, Default)]
struct Health {
    id: u64,
    latency_ms: Option<f64>,
    error_rate: f64,
    benched_until: Option<Instant>,
    calls: u64,
}

#[derive(Default)]
struct Table {
    health: Vec<Health>,
    /// Shard count, once a node has told it (0 before).
    shards: u32,
    /// Shard → (index of its leader's node, term of that leadership).
    leaders: HashMap<u32, (usize, u64)>,
}

/// How a node stands, in [`NodeRouter::view`] and `admin status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    Ok,
    Slow,
    Failing,
}

impl Standing {
    fn as_str(self) -> &'static str {
        match self {
            Standing::Ok => "ok",
            Standing::Slow => "slow",
            Standing::Failing => "failing",
        }
    }
}

impl Table {
    fn standings(&self, now: Instant) -> Vec<Standing> {
        let fastest = self
            .health
            .iter()
            .filter(|h| h.benched_until.is_none_or(|t| t <= now))
            .filter_map(|h| h.latency_ms)
            .fold(f64::INFINITY, f64::min);
        self.health
            .iter()
            .map(|h| {
                if h.benched_until.is_some_and(|t| t > now) {
                    Standing::Failing
                } else if h
                    .latency_ms
                    .is_some_and(|l| l > SLOW_FLOOR_MS && l > SLOW_FACTOR * fastest)
                {
                    Standing::Slow
                } else {
                    Standing::Ok
                }
            })
            .collect()
    }

    /// The nodes to spread work over now: the ok ones, else the slow ones,
    /// else all (a request must go somewhere).
    fn candidates(&self, now: Instant) -> Vec<usize> {
        let standings = self.standings(now);
        for wanted in [Standing::Ok, Standing::Slow] {
            let c: Vec<usize> = (0..standings.len())
                .filter(|&i| standings[i] == wanted)
                .collect();
            if !c.is_empty() {
                return c;
            }
        }
        (0..standings.len()).collect()
    }

    /// One call to node `i`: whether it failed in transport, and for a
    /// probe, how long it took.
    fn sample(&mut self, i: usize, ok: bool, probe_latency: Option<Duration>) {
        let h = &mut self.health[i];
        h.calls += 1;
        let failed = if ok { 0.0 } else { 1.0 };
        h.error_rate = (1.0 - ALPHA) * h.error_rate + ALPHA * failed;
        if !ok {
            h.benched_until = Some(Instant::now() + PENALTY);
        }
        if let Some(l) = probe_latency {
            let ms = l.as_secs_f64() * 1000.0;
            h.latency_ms = Some(
                h.latency_ms
                    .map_or(ms, |old| (1.0 - ALPHA) * old + ALPHA * ms),
            );
        }
    }
}

pub struct NodeRouter {
    nodes: Vec<SocketAddr>,
    pool: Pool,
    next: AtomicUsize,
    table: Mutex<Table>,
}

impl NodeRouter {
    pub fn new(nodes: Vec<SocketAddr>, tls: &TlsFiles) -> anyhow::Result<NodeRouter> {
        anyhow::ensure!(
            !nodes.is_empty(),
            "the gateway needs at least one node address"
        );
        Ok(NodeRouter {
            table: Mutex::new(Table {
                health: vec![Health::default(); nodes.len()],
                ..Default::default()
            }),
            nodes,
            pool: Pool::new(tls)?,
            next: AtomicUsize::new(0),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn channel(&self, i: usize) -> NodeChannel {
        self.pool
            .channel(self.nodes[i])
            .expect("node addresses were parsed at start-up")
    }

    fn client(&self, i: usize) -> (usize, NodeClient) {
        (i, client_of(self.channel(i)))
    }

    /// The node for a request: the leader of `bucket`'s index shard when it
    /// is usable, else the usable nodes in turn. Never `avoid` while another
    /// node is usable, so a retry goes elsewhere.
    fn choose(&self, bucket: Option<(&str, &str)>, avoid: Option<usize>) -> usize {
        let table = self.table();
        let mut candidates = table.candidates(Instant::now());
        if candidates.len() > 1 {
            candidates.retain(|&i| Some(i) != avoid);
        }
        let leader = bucket
            .filter(|_| table.shards != 0)
            .and_then(|(tenant, bucket)| {
                table
                    .leaders
                    .get(&bucket_shard(table.shards, tenant, bucket).0)
            })
            .map(|&(i, _)| i)
            .filter(|i| candidates.contains(i));
        leader.unwrap_or_else(|| {
            let turn = self.next.fetch_add(1, Ordering::Relaxed);
            candidates[turn % candidates.len()]
        })
    }

    /// A node for a request that concerns no bucket in particular: the
    /// usable nodes in turn.
    pub fn pick(&self) -> (usize, NodeClient) {
        self.client(self.choose(None, None))
    }

    /// The node for a request on `bucket` of `tenant`: the leader of the
    /// bucket's shard when it is usable, else as [`pick`](Self::pick).
    pub fn pick_for_bucket(&self, tenant: &str, bucket: &str) -> (usize, NodeClient) {
        self.client(self.choose(Some((tenant, bucket)), None))
    }

    /// A connection for one attempt of a call, chosen as by
    /// [`pick_for_bucket`](Self::pick_for_bucket) (or [`pick`](Self::pick)
    /// without a bucket) but avoiding node `avoid` when another is usable.
    pub fn channel_for(
        &self,
        bucket: Option<(&str, &str)>,
        avoid: Option<usize>,
    ) -> (usize, NodeChannel) {
        let i = self.choose(bucket, avoid);
        (i, self.channel(i))
    }

    /// Records that a call to node `i` reached it.
    pub fn report_success(&self, i: usize) {
        self.table().sample(i, true, None);
    }

    /// Records that a call to node `i` failed in transport: the node is
    /// passed over for a while.
    pub fn report_failure(&self, i: usize) {
        self.table().sample(i, false, None);
    }

    /// Asks every node for its routes, measuring each as it answers, and
    /// takes the highest-term leader claim for each shard.
    pub async fn refresh(&self) {
        let probes = (0..self.nodes.len()).map(|i| async move {
            let (_, mut client) = self.client(i);
            let started = Instant::now();
            let reply = tokio::time::timeout(PROBE_TIMEOUT, client.routes(pb::Empty {})).await;
            (i, started.elapsed(), reply)
        });
        let results = futures::future::join_all(probes).await;
        let mut table = self.table();
        let mut claims = Vec::new();
        for (i, elapsed, reply) in results {
            let Ok(Ok(routes)) = reply else {
                table.sample(i, false, None);
                continue;
            };
            table.sample(i, true, Some(elapsed));
            let routes = routes.into_inner();
            table.health[i].id = routes.node_id;
            table.shards = routes.shards;
            claims.extend(routes.leaders);
        }
        // Leaders are named by node id: the address a gateway uses for a
        // node (through a NAT or a proxy) may not be the node's own.
        let index_of: HashMap<u64, usize> = table
            .health
            .iter()
            .enumerate()
            .filter(|(_, h)| h.id != 0)
            .map(|(i, h)| (h.id, i))
            .collect();
        let mut leaders: HashMap<u32, (usize, u64)> = HashMap::new();
        for claim in claims {
            let Some(&node) = index_of.get(&claim.leader) else {
                continue;
            };
            let known = leaders.entry(claim.shard).or_insert((node, claim.term));
            if claim.term > known.1 {
                *known = (node, claim.term);
            }
        }
        table.leaders = leaders;
    }

    /// What the gateway sees of each node, for `admin status`.
    pub fn view(&self) -> Vec<pb::NodeHealth> {
        let table = self.table();
        let standings = table.standings(Instant::now());
        table
            .health
            .iter()
            .enumerate()
            .map(|(i, h)| pb::NodeHealth {
                addr: self.nodes[i].to_string(),
                node_id: h.id,
                latency_ms: h.latency_ms.unwrap_or(0.0),
                error_rate: h.error_rate,
                state: standings[i].as_str().into(),
                calls: h.calls,
                leads: table.leaders.values().filter(|(n, _)| *n == i).count() as u32,
            })
            .collect()
    }

    /// Clients of every node, for messages each must get.
    pub fn all(&self) -> Vec<NodeClient> {
        (0..self.nodes.len()).map(|i| self.client(i).1).collect()
    }

    /// Reads the internal certificate again for connections opened from now.
    pub fn reload(&self) -> anyhow::Result<()> {
        self.pool.reload()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(latencies: &[f64]) -> Table {
        Table {
            health: latencies
                .iter()
                .map(|&l| Health {
                    latency_ms: Some(l),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_node_much_slower_than_the_fastest_is_avoided() {
        let now = Instant::now();
        assert_eq!(table(&[2.0, 3.0, 300.0]).candidates(now), vec![0, 1]);
        // Jitter among fast nodes moves nothing.
        assert_eq!(table(&[1.0, 4.0, 20.0]).candidates(now), vec![0, 1, 2]);
    }

    #[test]
    fn failing_nodes_are_passed_over_until_their_penalty_ends() {
        let now = Instant::now();
        let mut t = table(&[2.0, 2.0, 2.0]);
        t.health[1].benched_until = Some(now + PENALTY);
        assert_eq!(t.candidates(now), vec![0, 2]);
        assert_eq!(t.candidates(now + PENALTY), vec![0, 1, 2]);
        // With every node failing, work still goes somewhere.
        for h in &mut t.health {
            h.benched_until = Some(now + PENALTY);
        }
        assert_eq!(t.candidates(now), vec![0, 1, 2]);
    }

    #[test]
    fn a_recovered_node_comes_back_as_samples_arrive() {
        let now = Instant::now();
        let mut t = table(&[2.0, 2.0, 300.0]);
        assert_eq!(t.candidates(now), vec![0, 1]);
        for _ in 0..15 {
            t.sample(2, true, Some(Duration::from_millis(2)));
        }
        assert_eq!(t.candidates(now), vec![0, 1, 2]);
    }
}
