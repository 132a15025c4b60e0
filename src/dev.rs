//! `lumbung dev`: a whole cluster in one process, for trying Lumbung and for
//! tests. It is the same path as a real deployment: `init-cluster` writes
//! the files once, then every node and the gateway start from them.

use crate::admin::{init_cluster, InitOptions, S3Env};
use crate::config::{self, GatewayConfig, NodeConfig};
use crate::gateway::RunningGateway;
use crate::node::RunningNode;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How a dev cluster is laid out when it is first created.
#[derive(Clone, Debug)]
pub struct DevOptions {
    pub data_dir: PathBuf,
    pub base_port: u16,
    pub nodes: usize,
    pub shards: u32,
    pub replication: usize,
}

impl DevOptions {
    pub fn new(data_dir: PathBuf, base_port: u16) -> DevOptions {
        DevOptions {
            data_dir,
            base_port,
            nodes: 3,
            shards: 64,
            replication: 3,
        }
    }
}

/// A running dev cluster.
pub struct DevCluster {
    pub dir: PathBuf,
    /// `None` for a node stopped by a test.
    pub nodes: Vec<Option<RunningNode>>,
    pub gateway: Option<RunningGateway>,
    pub env: S3Env,
}

/// The config file of node `id` in a cluster folder.
pub fn node_config(dir: &Path, id: usize) -> anyhow::Result<NodeConfig> {
    config::load(&dir.join(format!("node{id}.toml")))
}

/// Creates the cluster on first use, starts it, and waits until the demo
/// bucket answers.
pub async fn start(opts: &DevOptions) -> anyhow::Result<DevCluster> {
    let dir = &opts.data_dir;
    if !dir.join("admin.toml").exists() {
        init_cluster(&InitOptions {
            nodes: opts.nodes,
            dir: dir.clone(),
            base_port: opts.base_port,
            shards: opts.shards,
            replication: opts.replication,
            host: "127.0.0.1".parse()?,
            node_hosts: vec![],
            public_host: None,
            region: "us-east-1".into(),
        })?;
    }
    let dir = dir.canonicalize()?;
    let env = S3Env::parse(&std::fs::read_to_string(dir.join("s3.env"))?)?;
    let mut nodes = Vec::new();
    let mut id = 1;
    while dir.join(format!("node{id}.toml")).exists() {
        let cfg = node_config(&dir, id)?;
        nodes.push(Some(
            crate::node::start(cfg)
                .await
                .with_context(|| format!("starting node {id}"))?,
        ));
        id += 1;
    }
    let gw: GatewayConfig = config::load(&dir.join("gateway.toml"))?;
    let gateway = crate::gateway::start(gw).await?;
    let cluster = DevCluster {
        dir,
        nodes,
        gateway: Some(gateway),
        env,
    };
    cluster.wait_ready(Duration::from_secs(90)).await?;
    Ok(cluster)
}

impl DevCluster {
    /// Waits until the bootstrap bucket exists, which needs the meta shard
    /// and the bucket's index shard to have leaders.
    pub async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        let node = self
            .nodes
            .iter()
            .flatten()
            .next()
            .context("no node is running")?;
        loop {
            let tenant = "demo";
            match node.objects.head_bucket(tenant, &self.env.bucket).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    anyhow::bail!("cluster not ready after {limit:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Stops node `id` (1-based) as a clean shutdown.
    pub async fn stop_node(&mut self, id: usize) {
        if let Some(n) = self.nodes[id - 1].take() {
            n.stop().await;
        }
    }

    /// Starts node `id` again from its config file.
    pub async fn restart_node(&mut self, id: usize) -> anyhow::Result<()> {
        let cfg = node_config(&self.dir, id)?;
        self.nodes[id - 1] = Some(crate::node::start(cfg).await?);
        Ok(())
    }

    pub async fn stop(mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
        for n in self.nodes.iter_mut() {
            if let Some(n) = n.take() {
                n.stop().await;
            }
        }
    }
}
