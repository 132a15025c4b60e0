//! The `lumbung` command: run a node, a gateway or a whole dev cluster, and
//! administer a cluster.

use anyhow::Context;
use clap::{Parser, Subcommand};
use lumbung::admin::node_commands::{self, NodeCommand, RebalanceArgs};
use lumbung::admin::tenants::{LimitArg, QuotaSpec};
use lumbung::admin::{self, InitOptions};
use lumbung::config::{self, AdminConfig, GatewayConfig, NodeConfig};
use lumbung::watchdog::Watchdog;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lumbung",
    version,
    about = "Replicated, encrypted, S3-compatible object storage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a 3-node cluster and a gateway on loopback, with a demo tenant.
    Dev {
        /// Where the cluster's files and data live; reused on restart.
        #[arg(long, default_value = "./lumbung-data")]
        data_dir: PathBuf,
        /// Also write the S3 endpoint and credentials to this file.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// The gateway's port; nodes use the next three.
        #[arg(long, default_value_t = 7480)]
        base_port: u16,
    },
    /// Run one storage node.
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run one S3 gateway.
    Gateway {
        #[arg(long)]
        config: PathBuf,
    },
    /// Administer a cluster.
    Admin {
        /// The admin.toml that init-cluster wrote.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Write the CA, certificates and config files of a new cluster.
    InitCluster {
        #[arg(long)]
        nodes: usize,
        #[arg(long)]
        dir: PathBuf,
        /// The gateway's port; node i listens on base-port + i.
        #[arg(long, default_value_t = 7480)]
        base_port: u16,
        /// Number of Raft groups, fixed for the cluster's life.
        #[arg(long, default_value_t = 64)]
        shards: u32,
        /// Replicas per shard (at least 2).
        #[arg(long, default_value_t = 3)]
        replication: usize,
        /// Address all parts bind to, unless given below.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// One address per node, comma-separated, for nodes on their own
        /// machines (each node's certificate names its address).
        #[arg(long, value_delimiter = ',')]
        node_hosts: Vec<std::net::IpAddr>,
        /// The gateway's public address, when it differs from `--host`.
        #[arg(long)]
        public_host: Option<std::net::IpAddr>,
        /// Region name clients sign with.
        #[arg(long, default_value = "us-east-1")]
        region: String,
    },
    /// Write the certificate, keyring copy and config file of one more
    /// node into an existing cluster folder (made by init-cluster).
    InitNode {
        #[arg(long)]
        dir: PathBuf,
        /// An id no node of the cluster has had.
        #[arg(long)]
        id: u64,
        /// Internal address the node listens on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Keyring to copy (a running node's master key file); default:
        /// node 1's, from node1.toml.
        #[arg(long)]
        keyring: Option<PathBuf>,
    },
    /// Nodes, their health, shards with leader and replicas, bytes stored.
    Status,
    /// The cluster's members: add, list, drain, remove.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Move replicas so every node holds its share of replicas and bytes;
    /// prints the plan, then follows it with a progress bar.
    Rebalance(RebalanceArgs),
    /// Run one garbage collection now: chunks no object names, untouched
    /// for the grace period, go from every replica.
    Gc(admin::gc::GcArgs),
    /// Re-read every chunk file now and repair what fails its hash or is
    /// missing from a good replica.
    Scrub(admin::scrub::ScrubArgs),
    /// Tenants: the companies whose data the cluster holds.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Access keys: each signs S3 requests for one tenant.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The cluster's master key.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// A new master key on every node, every tenant key rewrapped under it,
    /// the old ones destroyed. Every node must be up; no downtime.
    RotateMaster,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant (1 to 63 lowercase letters, digits or dashes) with
    /// its own data-encryption key.
    Create {
        name: String,
        /// Most bytes the tenant may store (e.g. 500GiB); unlimited if absent.
        #[arg(long)]
        quota_bytes: Option<LimitArg>,
        /// Most objects the tenant may store; unlimited if absent.
        #[arg(long)]
        quota_objects: Option<LimitArg>,
    },
    /// List every tenant.
    List,
    /// A tenant's usage against its quota, buckets, keys and key generation.
    Show { name: String },
    /// Delete a tenant: its data keys are destroyed at once (its data can
    /// never be read again), its objects collected in the background.
    Delete {
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Seal the tenant's new writes with a new data key; old data stays
    /// readable.
    RotateKey { name: String },
    /// Change a tenant's quota; `none` removes a limit, an omitted one stays.
    SetQuota {
        name: String,
        #[arg(long)]
        bytes: Option<LimitArg>,
        #[arg(long)]
        objects: Option<LimitArg>,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an access key; its secret is printed this once.
    Create {
        #[arg(long)]
        tenant: String,
    },
    /// List a tenant's access key ids.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Revoke an access key; gateways stop accepting it within seconds.
    Revoke { id: String },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,openraft=error,lumbung=info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The signals a node or gateway process obeys, installed before it starts
/// serving so that an early SIGHUP cannot end it.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Runs until SIGTERM or Ctrl-C; on each SIGHUP calls `reload` (which
    /// reads certificates again) and logs how it went.
    async fn serve_until_stopped(mut self, reload: impl Fn() -> anyhow::Result<()>) {
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                _ = self.term.recv() => return,
                _ = self.hup.recv() => match reload() {
                    Ok(()) => tracing::info!("SIGHUP: certificates reloaded"),
                    Err(e) => tracing::error!("SIGHUP: certificates not reloaded, the old ones stay: {e:#}"),
                },
            }
        }
    }
}

async fn dev(data_dir: PathBuf, env_file: Option<PathBuf>, base_port: u16) -> anyhow::Result<()> {
    let opts = lumbung::dev::DevOptions::new(data_dir, base_port);
    eprintln!(
        "starting Lumbung dev cluster in {} ...",
        opts.data_dir.display()
    );
    let cluster = lumbung::dev::start(&opts).await?;
    let env = cluster.env.clone();
    if let Some(f) = env_file {
        std::fs::write(&f, env.lines()).with_context(|| format!("writing {}", f.display()))?;
    }
    println!(
        "Lumbung dev cluster is up: 3 nodes (RF 3) and a TLS gateway; data in {dir}\n\n  \
         endpoint   {e}\n  region     {r}\n  access key {a}\n  secret key {s}\n  bucket     {b}\n  CA         {ca}\n\n\
         Try:\n  AWS_ACCESS_KEY_ID={a} AWS_SECRET_ACCESS_KEY={s} AWS_DEFAULT_REGION={r} \
         aws --endpoint-url {e} --ca-bundle {ca} s3 ls s3://{b}\n\n\
         Status: lumbung admin --config {dir}/admin.toml status\nStop with Ctrl-C.",
        dir = cluster.dir.display(),
        e = env.endpoint,
        r = env.region,
        a = env.access_key,
        s = env.secret_key,
        b = env.bucket,
        ca = env.ca_cert.display(),
    );
    wait_for_signal().await;
    eprintln!("stopping ...");
    cluster.stop().await;
    Ok(())
}

async fn admin(config: Option<PathBuf>, json: bool, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::InitCluster {
            nodes,
            dir,
            base_port,
            shards,
            replication,
            host,
            node_hosts,
            public_host,
            region,
        } => {
            let env = admin::init_cluster(&InitOptions {
                nodes,
                dir: dir.clone(),
                base_port,
                shards,
                replication,
                host,
                node_hosts,
                public_host,
                region,
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"dir": dir, "endpoint": env.endpoint, "env_file": dir.join("s3.env")})
                );
            } else {
                println!(
                    "wrote a {nodes}-node cluster to {}: node1.toml..node{nodes}.toml, gateway.toml, admin.toml, s3.env\n\
                     start each with `lumbung node --config {0}/nodeN.toml` and `lumbung gateway --config {0}/gateway.toml`",
                    dir.display()
                );
            }
        }
        AdminCommand::InitNode {
            dir,
            id,
            listen,
            keyring,
        } => {
            let path = admin::init::init_node(&dir, id, listen, keyring.as_deref())?;
            if json {
                println!("{}", serde_json::json!({ "config": path }));
            } else {
                println!(
                    "wrote {}
start it with `lumbung node --config {0}`, then add it with `lumbung admin node add {listen}`",
                    path.display()
                );
            }
        }
        AdminCommand::Node(cmd) => node_commands::node(&admin_config(config)?, json, cmd).await?,
        AdminCommand::Rebalance(args) => {
            node_commands::rebalance(&admin_config(config)?, json, args).await?
        }
        AdminCommand::Gc(args) => admin::gc::run(&admin_config(config)?, json, args).await?,
        AdminCommand::Scrub(args) => admin::scrub::run(&admin_config(config)?, json, args).await?,
        AdminCommand::Status => {
            let cfg = admin_config(config)?;
            let view = admin::status::collect(&cfg).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", admin::status::render(&view));
            }
        }
        AdminCommand::Tenant(cmd) => tenant(&admin_config(config)?, json, cmd).await?,
        AdminCommand::Key(cmd) => key(&admin_config(config)?, json, cmd).await?,
        AdminCommand::Keys(cmd) => keys(&admin_config(config)?, json, cmd).await?,
    }
    Ok(())
}

fn admin_config(path: Option<PathBuf>) -> anyhow::Result<AdminConfig> {
    let path = path.context("--config ADMIN.toml is required")?;
    config::load(&path)
}

async fn tenant(cfg: &AdminConfig, json: bool, cmd: TenantCommand) -> anyhow::Result<()> {
    use admin::tenants;
    match cmd {
        TenantCommand::Create {
            name,
            quota_bytes,
            quota_objects,
        } => {
            let quota = QuotaSpec {
                bytes: quota_bytes.and_then(|l| l.0),
                objects: quota_objects.and_then(|l| l.0),
            };
            tenants::create_tenant(cfg, &name, quota).await?;
            if json {
                println!("{}", serde_json::json!({ "tenant": name }));
            } else {
                println!("created tenant {name}");
            }
        }
        TenantCommand::Show { name } => {
            let t = tenants::show_tenant(cfg, &name).await?;
            if json {
                println!("{}", admin::tenants::json_of(&t));
            } else {
                print!("{}", admin::tenants::render(&t));
            }
        }
        TenantCommand::SetQuota {
            name,
            bytes,
            objects,
        } => {
            if bytes.is_none() && objects.is_none() {
                anyhow::bail!("give --bytes, --objects or both (a limit or `none`)");
            }
            let now = tenants::show_tenant(cfg, &name).await?;
            let quota = QuotaSpec {
                bytes: bytes.map_or(now.quota_bytes, |l| l.0),
                objects: objects.map_or(now.quota_objects, |l| l.0),
            };
            tenants::set_quota(cfg, &name, quota).await?;
            let t = tenants::show_tenant(cfg, &name).await?;
            if json {
                println!("{}", admin::tenants::json_of(&t));
            } else {
                print!("{}", admin::tenants::render(&t));
            }
        }
        TenantCommand::Delete { name, yes } => {
            if !yes {
                if json {
                    anyhow::bail!("--json needs --yes: deleting a tenant cannot be undone");
                }
                confirm_deletion(&name)?;
            }
            let d = tenants::delete_tenant(cfg, &name).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "deleted": name, "buckets": d.buckets, "master_generation": d.master_generation, "shred_error": d.shred_error })
                );
            } else {
                println!(
                    "deleted tenant {name} ({} buckets, collected in the background)",
                    d.buckets
                );
            }
            if !d.shred_error.is_empty() {
                anyhow::bail!(
                    "the tenant's keys are gone from the cluster, but the master key they were wrapped under could not be destroyed: {}. Run `lumbung admin keys rotate-master` once every node is up.",
                    d.shred_error
                );
            }
        }
        TenantCommand::RotateKey { name } => {
            let t = tenants::rotate_tenant_key(cfg, &name).await?;
            if json {
                println!("{}", admin::tenants::json_of(&t));
            } else {
                println!(
                    "tenant {name} now writes with key generation {}",
                    t.key_generation
                );
            }
        }
        TenantCommand::List => {
            let list = tenants::list_tenants(cfg).await?;
            if json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|t| serde_json::json!({ "name": t.name, "created_ms": t.created_ms }))
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                for t in list {
                    println!("{}", t.name);
                }
            }
        }
    }
    Ok(())
}

/// Asks for the tenant's name to be typed back.
fn confirm_deletion(name: &str) -> anyhow::Result<()> {
    use std::io::Write;
    print!("Deleting tenant {name} destroys its data for good. Type its name to confirm: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() != name {
        anyhow::bail!("not confirmed; nothing was deleted");
    }
    Ok(())
}

async fn keys(cfg: &AdminConfig, json: bool, cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::RotateMaster => {
            let r = admin::tenants::rotate_master_key(cfg).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "generation": r.generation, "rewrapped": r.rewrapped, "nodes": r.nodes })
                );
            } else {
                println!(
                    "master key generation {} on all {} nodes; {} tenant keys rewrapped; older master keys destroyed",
                    r.generation, r.nodes, r.rewrapped
                );
            }
        }
    }
    Ok(())
}

async fn key(cfg: &AdminConfig, json: bool, cmd: KeyCommand) -> anyhow::Result<()> {
    use admin::tenants;
    match cmd {
        KeyCommand::Create { tenant } => {
            let k = tenants::create_key(cfg, &tenant).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "tenant": k.tenant, "access_key": k.access_key, "secret_key": k.secret_key })
                );
            } else {
                println!(
                    "access key {}\nsecret key {}\n(the secret is shown only now)",
                    k.access_key, k.secret_key
                );
            }
        }
        KeyCommand::List { tenant } => {
            let keys = tenants::list_keys(cfg, &tenant).await?;
            if json {
                println!("{}", serde_json::json!(keys));
            } else {
                for k in keys {
                    println!("{k}");
                }
            }
        }
        KeyCommand::Revoke { id } => {
            tenants::revoke_key(cfg, &id).await?;
            if json {
                println!("{}", serde_json::json!({ "revoked": id }));
            } else {
                println!("revoked {id}");
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dev {
            data_dir,
            env_file,
            base_port,
        } => dev(data_dir, env_file, base_port).await,
        Command::Node { config } => run_node(config).await,
        Command::Gateway { config } => run_gateway(config).await,
        Command::Admin {
            config,
            json,
            command,
        } => admin(config, json, command).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run_node(path: PathBuf) -> anyhow::Result<()> {
    let cfg: NodeConfig = config::load(&path)?;
    let signals = Signals::install()?;
    let dog = Watchdog::start(cfg.watchdog.stall_secs);
    let node = lumbung::node::start(cfg).await?;
    node.watch(&dog);
    signals
        .serve_until_stopped(|| node.reload_certificates())
        .await;
    node.stop().await;
    Ok(())
}

async fn run_gateway(path: PathBuf) -> anyhow::Result<()> {
    let cfg: GatewayConfig = config::load(&path)?;
    let signals = Signals::install()?;
    let dog = Watchdog::start(cfg.watchdog.stall_secs);
    dog.watch_runtime();
    let gw = lumbung::gateway::start(cfg).await?;
    signals
        .serve_until_stopped(|| gw.reload_certificates())
        .await;
    gw.stop().await;
    Ok(())
}
