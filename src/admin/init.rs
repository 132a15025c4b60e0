//! `lumbung admin init-cluster`: everything a deployment of N nodes needs,
//! written once into one folder: the CA, each identity, each config file,
//! and the bootstrap tenant's credentials.

use crate::config::{
    AdminConfig, Bootstrap, ClusterSpec, GatewayConfig, NodeConfig, NodeEntry, RaftTuning, TlsFiles,
};
use crate::crypto::master::MasterKeys;
use crate::tls::{write_pem, Authority, Role};
use anyhow::{bail, Context};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// What to create.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub nodes: usize,
    pub dir: PathBuf,
    /// The gateway listens here; node i on `base_port + i`.
    pub base_port: u16,
    pub shards: u32,
    pub replication: usize,
    /// Address every part binds to, unless one below says otherwise.
    pub host: IpAddr,
    /// One address per node, for nodes on their own machines; empty: all
    /// on `host`. Each node's certificate names its own address.
    pub node_hosts: Vec<IpAddr>,
    /// Where the gateway listens for S3 clients, when not on `host` (a DMZ
    /// gateway has one address facing clients and one facing the nodes).
    pub public_host: Option<IpAddr>,
    pub region: String,
}

/// The S3 credentials and endpoint of the bootstrap tenant.
#[derive(Clone, Debug)]
pub struct S3Env {
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    pub ca_cert: PathBuf,
}

impl S3Env {
    /// The `KEY=value` lines that `--env-file` and `s3.env` hold.
    pub fn lines(&self) -> String {
        format!(
            "S3_ENDPOINT={}\nS3_REGION={}\nS3_ACCESS_KEY={}\nS3_SECRET_KEY={}\nS3_BUCKET={}\nS3_CA_CERT={}\n",
            self.endpoint,
            self.region,
            self.access_key,
            self.secret_key,
            self.bucket,
            self.ca_cert.display()
        )
    }

    pub fn parse(text: &str) -> anyhow::Result<S3Env> {
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
                .with_context(|| format!("{k} missing"))
        };
        Ok(S3Env {
            endpoint: get("S3_ENDPOINT")?,
            region: get("S3_REGION")?,
            access_key: get("S3_ACCESS_KEY")?,
            secret_key: get("S3_SECRET_KEY")?,
            bucket: get("S3_BUCKET")?,
            ca_cert: get("S3_CA_CERT")?.into(),
        })
    }
}

fn write_toml<T: serde::Serialize>(path: &Path, header: &str, value: &T) -> anyhow::Result<()> {
    let body = toml::to_string_pretty(value)?;
    std::fs::write(path, format!("{header}\n{body}"))
        .with_context(|| format!("writing {}", path.display()))
}

fn issue(
    ca: &Authority,
    dir: &Path,
    name: &str,
    names: &[String],
    role: Role,
) -> anyhow::Result<TlsFiles> {
    let id = ca.issue(name, names, role)?;
    write_pem(&dir.join(format!("{name}.pem")), &id.cert_pem, false)?;
    write_pem(&dir.join(format!("{name}.key")), &id.key_pem, true)?;
    Ok(TlsFiles {
        ca: "ca.pem".into(),
        cert: format!("{name}.pem").into(),
        key: format!("{name}.key").into(),
    })
}

/// Writes a new cluster into `opts.dir`; refuses to overwrite one.
pub fn init_cluster(opts: &InitOptions) -> anyhow::Result<S3Env> {
    if opts.replication < 2 {
        bail!("replication must be at least 2 so every object exists twice");
    }
    if opts.nodes < opts.replication {
        bail!(
            "{} nodes cannot hold {} replicas of each shard",
            opts.nodes,
            opts.replication
        );
    }
    if opts.shards < 2 {
        bail!("shards must be at least 2 (the meta shard and one data shard)");
    }
    if !opts.node_hosts.is_empty() && opts.node_hosts.len() != opts.nodes {
        bail!(
            "{} node addresses given for {} nodes; give one per node or none",
            opts.node_hosts.len(),
            opts.nodes
        );
    }
    if usize::from(opts.base_port) + opts.nodes > usize::from(u16::MAX) {
        bail!(
            "base port {} leaves no room for {} nodes",
            opts.base_port,
            opts.nodes
        );
    }
    let dir = &opts.dir;
    if dir.join("admin.toml").exists() {
        bail!(
            "{} already holds a cluster (admin.toml exists)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;

    let ca = Authority::generate("Lumbung")?;
    write_pem(&dir.join("ca.pem"), &ca.cert_pem(), false)?;
    write_pem(&dir.join("ca.key"), &ca.key_pem(), true)?;

    let names_of = |host: IpAddr| vec![host.to_string(), "localhost".to_string()];
    let local_names = names_of(opts.host);
    let public_host = opts.public_host.unwrap_or(opts.host);
    let nodes: Vec<NodeEntry> = (1..=opts.nodes as u64)
        .map(|id| NodeEntry {
            id,
            addr: SocketAddr::new(
                opts.node_hosts
                    .get(id as usize - 1)
                    .copied()
                    .unwrap_or(opts.host),
                opts.base_port + id as u16,
            ),
        })
        .collect();
    let cluster = ClusterSpec {
        shards: opts.shards,
        replication: opts.replication,
        nodes: nodes.clone(),
    };
    let (access_key, secret_key) = crate::node::tenants::new_access_key();
    let bootstrap = Bootstrap {
        tenant: "demo".into(),
        access_key,
        secret_key,
        bucket: "demo".into(),
    };

    // One master key; each node gets its own copy of the keyring, as each
    // would on its own machine.
    let master = crate::crypto::Key::random();
    for n in &nodes {
        let name = format!("node{}", n.id);
        let tls = issue(&ca, &dir, &name, &names_of(n.addr.ip()), Role::Node)?;
        let master_key_file = PathBuf::from(format!("{name}.master.key"));
        MasterKeys::create(&dir.join(&master_key_file), &master)?;
        let cfg = NodeConfig {
            node_id: n.id,
            listen: n.addr,
            data_dir: format!("data/{name}").into(),
            master_key_file,
            tls,
            cluster: cluster.clone(),
            raft: RaftTuning::default(),
            bootstrap: Some(bootstrap.clone()),
            cache_mib: 32,
            watchdog: Default::default(),
            space: Default::default(),
            gc: Default::default(),
            scrub: Default::default(),
        };
        write_toml(
            &dir.join(format!("{name}.toml")),
            &format!("# Lumbung node {} (written by `lumbung admin init-cluster`).\n# Run: lumbung node --config {name}.toml", n.id),
            &cfg,
        )?;
    }

    let public = ca.issue("gateway-public", &names_of(public_host), Role::Gateway)?;
    write_pem(&dir.join("gateway-public.pem"), &public.cert_pem, false)?;
    write_pem(&dir.join("gateway-public.key"), &public.key_pem, true)?;
    let gateway = GatewayConfig {
        listen: SocketAddr::new(public_host, opts.base_port),
        region: opts.region.clone(),
        public_cert: "gateway-public.pem".into(),
        public_key: "gateway-public.key".into(),
        tls: issue(&ca, &dir, "gateway", &local_names, Role::Gateway)?,
        nodes: nodes.iter().map(|n| n.addr).collect(),
        limits: Default::default(),
        watchdog: Default::default(),
    };
    write_toml(
        &dir.join("gateway.toml"),
        "# Lumbung S3 gateway (written by `lumbung admin init-cluster`).\n# Run: lumbung gateway --config gateway.toml",
        &gateway,
    )?;
    let admin = AdminConfig {
        tls: issue(&ca, &dir, "admin", &local_names, Role::Admin)?,
        nodes: nodes.iter().map(|n| n.addr).collect(),
    };
    write_toml(
        &dir.join("admin.toml"),
        "# Admin CLI identity (written by `lumbung admin init-cluster`).\n# Run: lumbung admin --config admin.toml status",
        &admin,
    )?;

    let env = S3Env {
        endpoint: format!("https://{}", fmt_host_port(public_host, opts.base_port)),
        region: opts.region.clone(),
        access_key: bootstrap.access_key,
        secret_key: bootstrap.secret_key,
        bucket: bootstrap.bucket,
        ca_cert: dir.join("ca.pem"),
    };
    write_pem(&dir.join("s3.env"), &env.lines(), true)?;
    Ok(env)
}

fn fmt_host_port(host: IpAddr, port: u16) -> String {
    match host {
        IpAddr::V6(h) => format!("[{h}]:{port}"),
        IpAddr::V4(h) => format!("{h}:{port}"),
    }
}

/// Writes the files of one more node into the folder of an existing
/// cluster: a node certificate, a copy of the master keyring of an
/// existing node (`keyring`, or node 1's) and `node<id>.toml`. The node
/// joins once started and added with `lumbung admin node add`.
pub fn init_node(
    dir: &Path,
    id: u64,
    listen: SocketAddr,
    keyring: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("opening {}", dir.display()))?;
    let name = format!("node{id}");
    let path = dir.join(format!("{name}.toml"));
    if id == 0 {
        bail!("node ids start at 1");
    }
    if path.exists() {
        bail!("{} already exists", path.display());
    }
    // Any node file of the cluster has the cluster's shape and tuning.
    let peer: NodeConfig = crate::config::load(&dir.join("node1.toml"))
        .context("the cluster folder needs node1.toml to copy the cluster's shape from")?;
    if peer.cluster.nodes.iter().any(|n| n.id == id) {
        bail!("node {id} is one of the cluster's first nodes; pick an unused id");
    }
    let ca = Authority::load(&dir.join("ca.pem"), &dir.join("ca.key"))?;
    let names = vec![listen.ip().to_string(), "localhost".to_string()];
    let tls = issue(&ca, &dir, &name, &names, Role::Node)?;
    let master_key_file = PathBuf::from(format!("{name}.master.key"));
    let source = keyring.map_or(peer.master_key_file.clone(), Path::to_path_buf);
    let ring = std::fs::read(&source)
        .with_context(|| format!("reading the keyring {}", source.display()))?;
    write_pem(
        &dir.join(&master_key_file),
        &String::from_utf8(ring).context("the keyring is not text")?,
        true,
    )?;
    let cfg = NodeConfig {
        node_id: id,
        listen,
        data_dir: format!("data/{name}").into(),
        master_key_file,
        tls,
        cluster: peer.cluster,
        raft: peer.raft,
        bootstrap: None,
        cache_mib: peer.cache_mib,
        watchdog: peer.watchdog,
        space: peer.space,
        gc: peer.gc,
        scrub: peer.scrub,
    };
    write_toml(
        &path,
        &format!("# Lumbung node {id} (written by `lumbung admin init-node`).\n# Run: lumbung node --config {name}.toml, then `lumbung admin node add {listen}`"),
        &cfg,
    )?;
    Ok(path)
}
