//! The TOML files that run Lumbung: one per node, one per gateway, one for
//! the admin CLI. `lumbung admin init-cluster` writes a working set; the
//! commented examples live in config/.
//!
//! Relative paths in a file are taken relative to that file's folder, so a
//! cluster directory can be moved as a whole.

use crate::placement::Layout;
use crate::types::NodeId;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Certificate files of one peer of the internal network.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM); peers must chain to it.
    pub ca: PathBuf,
    /// This peer's certificate (PEM).
    pub cert: PathBuf,
    /// This peer's private key (PEM).
    pub key: PathBuf,
}

/// One member of the cluster as every peer knows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: NodeId,
    /// Internal address (host:port) of the node's RPC server.
    pub addr: SocketAddr,
}

/// The cluster's shape, identical in every node file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Number of Raft groups, fixed at creation (shard 0 is the meta shard).
    pub shards: u32,
    /// Replicas per shard; at least 2 so every object exists twice.
    pub replication: usize,
    pub nodes: Vec<NodeEntry>,
}

impl ClusterSpec {
    /// The layout the cluster starts with, before any change.
    pub fn layout(&self) -> Layout {
        Layout::initial(self)
    }

    pub fn addr_of(&self, id: NodeId) -> Option<SocketAddr> {
        self.nodes.iter().find(|n| n.id == id).map(|n| n.addr)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.replication < 2 {
            bail!("replication must be at least 2 (got {})", self.replication);
        }
        if self.nodes.len() < self.replication {
            bail!(
                "replication {} needs at least as many nodes (got {})",
                self.replication,
                self.nodes.len()
            );
        }
        if self.shards < 2 {
            bail!("shards must be at least 2: the meta shard and one data shard");
        }
        let mut ids: Vec<_> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.nodes.len() || ids.contains(&0) {
            bail!("node ids must be unique and non-zero");
        }
        Ok(())
    }
}

/// The tenant, key and bucket a fresh cluster creates on first start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Bootstrap {
    pub tenant: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
}

/// Tunables of the Raft groups; the defaults suit production.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    /// A follower that hears nothing from its leader stands for election
    /// after `election_max_ms` (openraft's leader lease) plus a random
    /// time between these two: 1.5 to 2 s with the defaults, which is what
    /// a lost leader costs its shard's clients.
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot (and purge the log) after this many applied entries.
    pub snapshot_every: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 150,
            election_min_ms: 500,
            election_max_ms: 1000,
            snapshot_every: 20_000,
        }
    }
}

/// `lumbung node --config FILE`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// Internal address to listen on; never a public one.
    pub listen: SocketAddr,
    /// The state store, Raft log, snapshots and chunk files live here.
    pub data_dir: PathBuf,
    /// This node's master keyring (mode 0600; see `crypto::master`). Keep
    /// it off the data disk where you can: a stolen data disk without it
    /// reveals nothing.
    pub master_key_file: PathBuf,
    pub tls: TlsFiles,
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub raft: RaftTuning,
    /// Created once, by whichever node leads the meta shard first.
    pub bootstrap: Option<Bootstrap>,
    /// The state store's page cache, in MiB.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
    #[serde(default)]
    pub watchdog: WatchdogConfig,
    #[serde(default)]
    pub space: SpaceConfig,
    #[serde(default)]
    pub gc: GcConfig,
    #[serde(default)]
    pub scrub: ScrubConfig,
}

/// `[scrub]`: how a node re-reads its chunk files (see `node::scrub`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScrubConfig {
    /// Reading speed of a pass, MB/s (10^6 bytes): low enough that
    /// clients keep the disk.
    pub mb_per_sec: u64,
    /// A full pass starts this long after the last one ended, at most.
    pub interval_days: u64,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            mb_per_sec: 20,
            interval_days: 30,
        }
    }
}

/// `[gc]`: when space that clients freed comes back (see `node::gc`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcConfig {
    /// A chunk no object or part names is deleted once it has gone this
    /// long untouched by any write (a file with no record at all, twice
    /// this). An hour: a write in flight touches its chunks again every
    /// half of it, so only a coordinator stalled for half an hour loses
    /// its upload (it fails, never commits a collected chunk), and clocks
    /// may be that far apart before a write is refused for it.
    pub grace_secs: u64,
    /// How often the node leading the meta shard runs a collection.
    pub interval_secs: u64,
    /// Multipart uploads begun longer ago than this are aborted.
    pub abort_uploads_after_days: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace_secs: 3600,
            interval_secs: 900,
            abort_uploads_after_days: 7,
        }
    }
}

impl GcConfig {
    pub fn grace_ms(&self) -> i64 {
        (self.grace_secs.max(1) * 1000) as i64
    }
}

/// `[space]`: the free space a node keeps on its data disk (see `space`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpaceConfig {
    /// Below this many MiB free the node takes no new data (507
    /// InsufficientStorage); below half of it its Raft log appends wait.
    pub reserve_mib: u64,
}

impl Default for SpaceConfig {
    fn default() -> Self {
        SpaceConfig { reserve_mib: 1024 }
    }
}

/// `[watchdog]`: when a stuck process stops itself (see `watchdog`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchdogConfig {
    /// A part (runtime, store, log fsync) that makes no progress this long
    /// stops the process with exit code 75, for its supervisor to restart.
    /// 0 only logs the stall.
    pub stall_secs: u64,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig { stall_secs: 10 }
    }
}

fn default_cache_mib() -> u64 {
    32
}

/// `lumbung gateway --config FILE`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GatewayConfig {
    /// Public S3 listener (TLS only).
    pub listen: SocketAddr,
    /// Region name clients sign with.
    pub region: String,
    /// Public certificate and key served to S3 clients.
    pub public_cert: PathBuf,
    pub public_key: PathBuf,
    /// Identity on the internal network.
    pub tls: TlsFiles,
    /// Internal addresses of the nodes to route to.
    pub nodes: Vec<SocketAddr>,
    /// What one client may ask of the gateway.
    #[serde(default)]
    pub limits: GatewayLimits,
    #[serde(default)]
    pub watchdog: WatchdogConfig,
}

/// The gateway's defences against clients that ask too much, too fast or
/// too slowly. Every limit answers with the S3 error a client expects.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayLimits {
    /// Requests per second one tenant may make (bursts of one second's
    /// worth); above it: 503 SlowDown. 0 turns the limit off.
    pub tenant_requests_per_sec: u32,
    /// Requests per second from one client address, signed or not.
    pub address_requests_per_sec: u32,
    /// New connections per second from one client address; more are
    /// closed before their TLS handshake, the costly part of a flood.
    pub address_connections_per_sec: u32,
    /// Open connections in all; more are closed as they arrive.
    pub max_connections: usize,
    /// Open connections from one client address.
    pub max_connections_per_address: usize,
    /// Request line plus headers, in bytes (at least 8192); above it: 431.
    pub max_header_bytes: usize,
    /// The request target (path and query), in bytes; above it: 414.
    pub max_uri_bytes: usize,
    /// Largest body of one request; above it: 400 EntityTooLarge. S3's own
    /// limit for one PUT (and one part) is 5 GiB.
    pub max_body_bytes: u64,
    /// How far a signed request's date may be from the gateway's clock;
    /// beyond it: 403 RequestTimeTooSkewed.
    pub max_clock_skew_secs: u32,
    /// Longest a client may take for its TLS handshake, and to send a
    /// request's headers (also the idle time of a kept-alive connection).
    pub header_timeout_secs: u64,
    /// A request body must bring at least this many bytes in every
    /// `body_window_secs`; a client trickling slower is cut off with 400
    /// RequestTimeout, so it cannot hold a worker.
    pub min_body_bytes_per_window: u64,
    pub body_window_secs: u64,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits {
            tenant_requests_per_sec: 5_000,
            address_requests_per_sec: 5_000,
            address_connections_per_sec: 100,
            max_connections: 10_000,
            max_connections_per_address: 1_000,
            max_header_bytes: 64 * 1024,
            max_uri_bytes: 16 * 1024,
            max_body_bytes: 5 << 30,
            max_clock_skew_secs: 15 * 60,
            header_timeout_secs: 30,
            min_body_bytes_per_window: 16 * 1024,
            body_window_secs: 10,
        }
    }
}

/// `lumbung admin --config FILE ...`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdminConfig {
    pub tls: TlsFiles,
    pub nodes: Vec<SocketAddr>,
}

/// Reads a TOML file and resolves relative paths against its folder.
pub fn load<T: serde::de::DeserializeOwned + Relocate>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cfg: T =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    cfg.relocate(&base);
    Ok(cfg)
}

/// Joins relative paths in a config onto the folder of its file.
pub trait Relocate {
    fn relocate(&mut self, base: &Path);
}

fn rebase(p: &mut PathBuf, base: &Path) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

impl Relocate for TlsFiles {
    fn relocate(&mut self, base: &Path) {
        rebase(&mut self.ca, base);
        rebase(&mut self.cert, base);
        rebase(&mut self.key, base);
    }
}

impl Relocate for NodeConfig {
    fn relocate(&mut self, base: &Path) {
        rebase(&mut self.data_dir, base);
        rebase(&mut self.master_key_file, base);
        self.tls.relocate(base);
    }
}

impl Relocate for GatewayConfig {
    fn relocate(&mut self, base: &Path) {
        rebase(&mut self.public_cert, base);
        rebase(&mut self.public_key, base);
        self.tls.relocate(base);
    }
}

impl Relocate for AdminConfig {
    fn relocate(&mut self, base: &Path) {
        self.tls.relocate(base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name)
    }

    #[test]
    fn the_commented_examples_parse() {
        let node: NodeConfig = load(&example("node.toml")).unwrap();
        node.cluster.validate().unwrap();
        assert!(node.data_dir.is_absolute(), "relative paths are resolved");
        let gw: GatewayConfig = load(&example("gateway.toml")).unwrap();
        assert_eq!(gw.nodes.len(), 3);
        let admin: AdminConfig = load(&example("admin.toml")).unwrap();
        assert_eq!(admin.nodes, gw.nodes);
    }

    #[test]
    fn replication_below_two_is_refused() {
        let mut node: NodeConfig = load(&example("node.toml")).unwrap();
        node.cluster.replication = 1;
        assert!(node.cluster.validate().is_err());
    }
}
