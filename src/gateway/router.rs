//! Which node a gateway sends a request to.
//!
//! Any node can coordinate any request (it forwards to shard leaders
//! itself), so the gateway spreads requests round-robin and skips a node
//! whose last call failed at the transport level, for a short while.

use crate::config::TlsFiles;
use crate::rpc::{NodeClient, Pool};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a node that failed is passed over.
const PENALTY: Duration = Duration::from_secs(3);

pub struct NodeRouter {
    nodes: Vec<SocketAddr>,
    pool: Pool,
    next: AtomicUsize,
    /// When each node may be tried again after a transport failure.
    benched: Mutex<Vec<Option<Instant>>>,
}

impl NodeRouter {
    pub fn new(nodes: Vec<SocketAddr>, tls: &TlsFiles) -> anyhow::Result<NodeRouter> {
        anyhow::ensure!(
            !nodes.is_empty(),
            "the gateway needs at least one node address"
        );
        Ok(NodeRouter {
            benched: Mutex::new(vec![None; nodes.len()]),
            nodes,
            pool: Pool::new(tls)?,
            next: AtomicUsize::new(0),
        })
    }

    /// The next healthy node's index and client.
    pub fn pick(&self) -> (usize, NodeClient) {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let benched = self.benched.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.nodes.len();
        let i = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| benched[i].is_none_or(|until| until <= now))
            .unwrap_or(start % n);
        drop(benched);
        let client = self
            .pool
            .client(self.nodes[i])
            .expect("node addresses were parsed at start-up");
        (i, client)
    }

    /// Marks node `i` as failing so the next calls go elsewhere.
    pub fn report_failure(&self, i: usize) {
        let mut benched = self.benched.lock().unwrap_or_else(|e| e.into_inner());
        benched[i] = Some(Instant::now() + PENALTY);
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
