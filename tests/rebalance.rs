//! Growing a cluster under load: a 4th node joins, a rebalance moves
//! replicas (and their chunks) onto it while a client writes and reads,
//! and afterwards every node holds its share and every acknowledged
//! object reads back byte for byte. Bad admin input changes nothing.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use lumbung::admin::nodes;
use lumbung::config::AdminConfig;
use lumbung::rpc::pb;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Objects a little over one chunk, so every object has chunk files.
const OBJECT: usize = 5 * 1024 * 1024;
const SHARDS: u32 = 24;

type Acked = Arc<Mutex<BTreeMap<String, u64>>>;

/// Writes and reads back objects until told to stop; records each
/// acknowledged write and counts failures that a retry did not fix.
async fn load(client: aws_sdk_s3::Client, acked: Acked, stop: Arc<AtomicBool>) -> u32 {
    let mut failures = 0;
    let mut i = 1000u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("during/{i}");
        let put = client
            .put_object()
            .bucket("demo")
            .key(&key)
            .body(ByteStream::from(common::bytes(i, 200_000)))
            .send()
            .await;
        match put {
            Ok(_) => {
                acked.lock().unwrap().insert(key.clone(), i);
                let got = client.get_object().bucket("demo").key(&key).send().await;
                if got.is_err() {
                    failures += 1;
                }
            }
            Err(e) => {
                eprintln!("put {key}: {}", common::code(&e));
                failures += 1;
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    failures
}

async fn wait_done(admin: &AdminConfig, id: i64, limit: Duration) -> pb::RebalanceStatus {
    let started = Instant::now();
    loop {
        let s = nodes::progress(admin).await.unwrap();
        if s.id == id && s.state != "running" {
            return s;
        }
        assert!(
            started.elapsed() < limit,
            "rebalance not done after {limit:?}: {} of {} moves",
            s.done,
            s.moves.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_takes_its_share_under_load() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = common::cluster(tmp.path(), SHARDS).await;
    let dir = cluster.dir.clone();
    let admin: AdminConfig = lumbung::config::load(&dir.join("admin.toml")).unwrap();
    let client = common::s3(&cluster.env);

    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..12u64 {
        let key = format!("before/{i}");
        client
            .put_object()
            .bucket("demo")
            .key(&key)
            .body(ByteStream::from(common::bytes(i, OBJECT)))
            .send()
            .await
            .unwrap();
        acked.insert(key, i);
    }

    // A new node: its files, its process, then membership.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_ports(1))
        .parse()
        .unwrap();
    let path = lumbung::admin::init::init_node(&dir, 4, addr, None).unwrap();
    let cfg = lumbung::config::load(&path).unwrap();
    cluster
        .nodes
        .push(Some(lumbung::node::start(cfg).await.unwrap()));
    let members = nodes::add(&admin, addr, "", None).await.unwrap();
    assert_eq!(members.members.len(), 4);
    let again = nodes::add(&admin, addr, "", None).await.unwrap_err();
    assert!(
        format!("{again:#}").contains("already a member"),
        "adding twice: {again:#}"
    );
    let unknown = nodes::remove(&admin, 99, false).await.unwrap_err();
    assert!(
        format!("{unknown:#}").contains("not a member"),
        "{unknown:#}"
    );
    let held = nodes::remove(&admin, 1, false).await.unwrap_err();
    assert!(format!("{held:#}").contains("drain it first"), "{held:#}");
    let after = nodes::list(&admin).await.unwrap();
    assert_eq!(
        after.epoch, members.epoch,
        "refused changes changed the layout"
    );

    let dry = nodes::rebalance(
        &admin,
        pb::RebalanceRequest {
            dry_run: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(!dry.moves.is_empty());
    assert!(dry.moves.iter().all(|m| m.to == 4), "{:?}", dry.moves);
    assert!(
        !nodes::progress(&admin).await.unwrap().exists,
        "a dry run started a rebalance"
    );

    let live: Acked = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(load(common::s3(&cluster.env), live.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let run = nodes::rebalance(&admin, pb::RebalanceRequest::default())
        .await
        .unwrap();
    let twice = nodes::rebalance(&admin, pb::RebalanceRequest::default())
        .await
        .unwrap_err();
    assert!(
        format!("{twice:#}").contains("already running"),
        "{twice:#}"
    );
    let drain_now = nodes::drain(&admin, 2).await.unwrap_err();
    assert!(
        format!("{drain_now:#}").contains("already running"),
        "{drain_now:#}"
    );

    let end = wait_done(&admin, run.id, Duration::from_secs(240)).await;
    println!(
        "rebalance: {} moves, {} bytes in {:?}",
        end.done,
        end.bytes_copied,
        started.elapsed()
    );
    assert_eq!(end.state, "done");
    assert_eq!(end.done as usize, run.moves.len());
    stop.store(true, Ordering::Relaxed);
    let failures = writer.await.unwrap();

    // Shares: 24 shards x 3 replicas over 4 equal nodes is 18 each.
    let target = f64::from(SHARDS) * 3.0 / 4.0;
    let members = nodes::list(&admin).await.unwrap();
    for m in &members.members {
        let off = (f64::from(m.replicas) - target).abs() / target;
        assert!(
            off <= 0.10,
            "node {} holds {} replicas, target {target}",
            m.node_id,
            m.replicas
        );
    }
    // Every shard's group agrees with the layout: 3 voters, one of them 4
    // for the shards that moved.
    let view = lumbung::admin::status::collect(&admin).await.unwrap();
    for s in &view.shards {
        assert_eq!(s.voters.len(), 3, "shard {} voters {:?}", s.shard, s.voters);
        assert!(s.leader.is_some(), "shard {} has no leader", s.shard);
    }
    let leads: Vec<usize> = view.nodes.iter().map(|n| n.leads).collect();
    println!("leaders per node {leads:?}; failures during the move: {failures}");
    assert_eq!(failures, 0, "client requests failed during the rebalance");
    let share = f64::from(SHARDS) / 4.0;
    assert!(
        leads.iter().all(|l| *l as f64 <= share + 1.0),
        "a node leads more than its share ({share}) + 1: {leads:?}"
    );
    let node4 = view.nodes.iter().find(|n| n.node_id == 4).unwrap();
    assert!(node4.chunk_count > 0, "node 4 received no chunks");

    acked.extend(live.lock().unwrap().clone());
    for (key, seed) in &acked {
        let len = if key.starts_with("before/") {
            OBJECT
        } else {
            200_000
        };
        let got = client
            .get_object()
            .bucket("demo")
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{key}: {}", common::code(&e)));
        let body = got.body.collect().await.unwrap().into_bytes();
        assert!(body == common::bytes(*seed, len), "{key} differs");
    }
    println!("{} acknowledged objects read back", acked.len());

    // With node 1 stopped, everything still reads: each shard has two
    // other replicas, node 4's among them where it took one over.
    cluster.stop_node(1).await;
    for (key, seed) in acked.iter().take(20) {
        let len = if key.starts_with("before/") {
            OBJECT
        } else {
            200_000
        };
        let got = client.get_object().bucket("demo").key(key).send().await;
        let body = got.unwrap().body.collect().await.unwrap().into_bytes();
        assert!(body == common::bytes(*seed, len), "{key} differs");
    }
    cluster.stop().await;
}
