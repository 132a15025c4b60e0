//! A storage node: shard replicas, chunk files, and the RPC server that
//! nodes, gateways and the admin CLI call. It listens only on its internal
//! address, and only peers with a certificate of the cluster CA get in.

pub mod access;
pub mod chunks;
pub mod gc;
pub mod ingest;
pub mod key_admin;
pub mod keys;
pub mod listener;
pub mod members;
pub mod objects;
pub mod rebalance;
pub mod scrub;
pub mod service;
pub mod tenants;

use crate::chunk::ChunkStore;
use crate::config::{Bootstrap, NodeConfig};
use crate::crypto::master::MasterKeys;
use crate::crypto::tenant_keys::wrap_dek;
use crate::crypto::Key;
use crate::rpc::{pb, Pool, MAX_MESSAGE};
use crate::shard::command::AccessKey;
use crate::shard::host::Disk;
use crate::shard::{Command, ShardError, ShardHost};
use crate::space::SpaceGuard;
use crate::store::{Store, Stores};
use crate::tls::ReloadableIdentity;
use crate::types::{now_ms, ShardId};
use crate::watchdog::Watchdog;
use anyhow::Context;
use chunks::Chunks;
use objects::Objects;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A node that is serving; dropping it does not stop it, `stop` does.
pub struct RunningNode {
    pub host: Arc<ShardHost>,
    pub objects: Objects,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    /// Accepts connections; owns the listening socket.
    accept: tokio::task::JoinHandle<()>,
    /// Background tasks that hold the node's storage; stopped with it so
    /// the database is released.
    background: Vec<tokio::task::JoinHandle<()>>,
    /// The certificate the node serves and the one it presents to peers.
    identity: Arc<ReloadableIdentity>,
    pool: Arc<Pool>,
}

impl RunningNode {
    /// Reads the node's certificate and key again (SIGHUP): new connections,
    /// in and out, use them; open ones carry on.
    pub fn reload_certificates(&self) -> anyhow::Result<()> {
        self.identity.reload()?;
        self.pool.reload()
    }

    /// The certificate the node serves now (DER).
    pub fn certificate(&self) -> Vec<u8> {
        self.identity.certificate()
    }

    /// Puts the node's runtime and storage under `dog`: the state store,
    /// the meta store and the log fsync each take one small write a tick,
    /// and every replica's Raft must still run.
    pub fn watch(&self, dog: &Watchdog) {
        dog.watch_runtime();
        let stores = self.host.stores();
        let state = stores.state.clone();
        dog.watch("the state store (a write did not finish)", move || {
            let state = state.clone();
            async move { Ok(state.blocking(probe_write).await?) }
        });
        let meta = stores.meta;
        dog.watch("the meta store (a write did not finish)", move || {
            let meta = meta.clone();
            async move { Ok(meta.blocking(probe_write).await?) }
        });
        let flusher = self.host.flusher.clone();
        dog.watch("the log fsync (an fsync did not finish)", move || {
            let flusher = flusher.clone();
            async move { Ok(flusher.sync_log().await?) }
        });
        // openraft stops a replica for good on a storage error; the node
        // restarts to recover it from its log and its peers.
        let host = self.host.clone();
        dog.watch("a shard's Raft (it stopped on a fatal error)", move || {
            let stopped = host.stopped_replica();
            async move {
                match stopped {
                    Some((shard, e)) => anyhow::bail!("shard {shard}: {e}"),
                    None => Ok(()),
                }
            }
        });
    }

    /// Stops serving and shuts every Raft down.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        // The port is free once the accept task is gone.
        self.accept.abort();
        let _ = (&mut self.accept).await;
        let _ = (&mut self.server).await;
        for task in &self.background {
            task.abort();
        }
        self.host.shutdown().await;
    }
}

/// Opens the node's storage, starts its shards and serves its RPC.
pub async fn start(cfg: NodeConfig) -> anyhow::Result<RunningNode> {
    cfg.cluster.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    if cfg.data_dir.join("db").exists() && !cfg.data_dir.join("state").exists() {
        anyhow::bail!(
            "{} holds a sled database from an older Lumbung; this version keeps its state in redb and cannot read it. Replace the node: `admin node remove ID --dead`, then add a new one (`admin init-node`, `node add`)",
            cfg.data_dir.display()
        );
    }
    let stores = Stores::open(&cfg.data_dir.join("state"), (cfg.cache_mib as usize) << 20)
        .with_context(|| format!("opening the state store in {}", cfg.data_dir.display()))?;
    let master = Arc::new(MasterKeys::load(&cfg.master_key_file)?);
    let space = SpaceGuard::start(&cfg.data_dir, cfg.space.reserve_mib << 20)
        .with_context(|| format!("reading the free space of {}", cfg.data_dir.display()))?;
    let store = Arc::new(ChunkStore::open(&cfg.data_dir.join("chunks"))?.with_space(space.clone()));
    let pool = Arc::new(Pool::new(&cfg.tls)?);
    let identity = ReloadableIdentity::load(&cfg.tls.cert, &cfg.tls.key)?;
    let missing = Arc::new(crate::chunk::Missing::new(store.clone()));
    let host = Arc::new(
        ShardHost::start(
            cfg.node_id,
            &cfg.cluster,
            &cfg.raft,
            Disk {
                stores: &stores,
                data_dir: &cfg.data_dir,
                space,
            },
            pool.clone(),
            missing.clone(),
        )
        .await?,
    );
    let chunks = Chunks {
        host: host.clone(),
        store,
        missing,
    };
    let repair = tokio::spawn(chunks.clone().repair());
    let objects = Objects {
        chunks,
        keys: Arc::new(keys::KeyCache::new(master)),
        retouch_ms: cfg.gc.grace_ms() / 2,
        gc: Arc::new(gc::Gc::new(cfg.gc.clone(), &cfg.data_dir)),
        scrub: Arc::new(scrub::Scrub::new(cfg.scrub.clone(), &cfg.data_dir)),
    };

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let service = pb::node_server::NodeServer::new(service::NodeService::new(objects.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (incoming, accept) = listener::tls_incoming(
        listener,
        crate::tls::rpc_server_config(&cfg.tls.ca, identity.clone())?,
    );
    let router = tonic::transport::Server::builder()
        // Pings find a dead peer in seconds; one late ack on a busy
        // machine (10 s) is not yet a dead peer.
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // A 4 MiB chunk per stream, four per connection, in one round trip.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        // Bounds the calls one connection has in the node (past it callers
        // queue at home), with room for a Raft message per shard of a
        // 256-shard cluster or a gateway at full concurrency.
        .max_concurrent_streams(Some(1024))
        // Calls cancelled before this node accepted them (Raft timeouts
        // while it is busy) counted to h2's default of 20, then the whole
        // connection was torn down with GOAWAY. Peers hold cluster
        // certificates, so this guard against rapid-reset floods can be
        // as wide as the stream limit.
        .http2_max_pending_accept_reset_streams(Some(1024))
        .layer(access::RoleCheckLayer)
        .add_service(service);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await
        {
            tracing::error!("rpc server: {e}");
        }
    });
    let collector = tokio::spawn(collect_deleted_tenants(objects.clone()));
    let follower = tokio::spawn(members::follow(objects.chunks.clone()));
    let coordinator = tokio::spawn(rebalance::coordinate(objects.chunks.clone()));
    let low_disk = tokio::spawn(crate::shard::low_disk::run(host.clone()));
    let compactor = tokio::spawn(crate::shard::log_compactor::run(host.log().clone()));
    let gc = tokio::spawn(gc::run(objects.chunks.clone(), objects.gc.clone()));
    let scrub = tokio::spawn(objects.scrub.clone().run(objects.chunks.clone()));
    let mut background = vec![
        repair,
        collector,
        follower,
        coordinator,
        low_disk,
        compactor,
        gc,
        scrub,
    ];
    if let Some(b) = cfg.bootstrap.clone() {
        background.push(tokio::spawn(bootstrap(objects.clone(), b)));
    }
    tracing::info!(node = cfg.node_id, addr = %cfg.listen, "node serving");
    Ok(RunningNode {
        host,
        objects,
        stop: Some(stop_tx),
        server,
        accept,
        background,
        identity,
        pool,
    })
}

/// The watchdog's store probe: one tiny write to a space of its own.
fn probe_write(store: &Store) -> crate::store::Result<()> {
    let mut b = crate::store::Batch::default();
    b.insert(
        b"probe".to_vec(),
        crate::types::now_ms().to_be_bytes().to_vec(),
    );
    store.apply("watchdog", b)
}

/// Creates the bootstrap tenant, key and bucket once the meta shard has a
/// leader. Every step is idempotent, so all nodes may try.
async fn bootstrap(objects: Objects, b: Bootstrap) {
    loop {
        match bootstrap_once(&objects, &b).await {
            Ok(()) => {
                tracing::info!(tenant = %b.tenant, bucket = %b.bucket, "bootstrap tenant ready");
                return;
            }
            Err(e) => tracing::debug!("bootstrap not done yet: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn bootstrap_once(objects: &Objects, b: &Bootstrap) -> Result<(), ShardError> {
    let host = &objects.chunks.host;
    if objects.access_key(&b.access_key).await?.is_some()
        && objects.head_bucket(&b.tenant, &b.bucket).await.is_ok()
    {
        return Ok(());
    }
    let tenant = Command::PutTenant {
        tenant: b.tenant.clone(),
        created_ms: now_ms(),
        dek: wrap_dek(&objects.keys.master, &b.tenant, 1, &Key::random()),
    };
    host.propose(ShardId::META, &tenant).await?;
    let key = Command::PutAccessKey {
        access_key: b.access_key.clone(),
        key: AccessKey {
            tenant: b.tenant.clone(),
            secret_key: b.secret_key.clone(),
        },
    };
    host.propose(ShardId::META, &key).await?;
    match objects
        .create_bucket(&b.tenant, &b.bucket, crate::types::WriteId::random())
        .await
    {
        Ok(()) | Err(ShardError::BucketExists) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Finishes collecting deleted tenants whose deleting node stopped before
/// it was done.
async fn collect_deleted_tenants(objects: Objects) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    every.tick().await;
    loop {
        every.tick().await;
        objects.clone().collect_deleted().await;
    }
}
