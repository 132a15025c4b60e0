//! Growing a cluster under load: a 4th node joins, a rebalance moves
//! replicas (and their chunks) onto it while a client writes and reads,
//! and afterwards every node holds its share and every acknowledged
//! object reads back byte for byte. Bad admin input changes nothing.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use lumbung::admin::nodes;
use lumbung::config::AdminConfig;
use lumbung::rpc::pb;
use lumbung::shard::command::MembershipOp;
use lumbung::types::ShardId;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Objects a little over one chunk, so every object has chunk files.
const OBJECT: usize = 5 * 1024 * 1024;
const SHARDS: u32 = 24;

type Acked = Arc<Mutex<BTreeMap<String, u64>>>;

/// Writes and reads back objects, `pause` apart, until told to stop;
/// records each acknowledged write and counts failures that a retry did not
/// fix.
async fn load(
    client: aws_sdk_s3::Client,
    acked: Acked,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> u32 {
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
        tokio::time::sleep(pause).await;
    }
    failures
}

/// Writes `n` objects of [`OBJECT`] bytes under `before/`.
async fn write_before(client: &aws_sdk_s3::Client, n: u64) -> BTreeMap<String, u64> {
    let mut acked = BTreeMap::new();
    for i in 0..n {
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
    acked
}

/// Writes node `id`'s files into the cluster folder and starts it (not yet
/// a member); returns its address.
async fn start_new_node(cluster: &mut lumbung::dev::DevCluster, id: usize) -> std::net::SocketAddr {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_ports(1))
        .parse()
        .unwrap();
    let path = lumbung::admin::init::init_node(&cluster.dir, id as u64, addr, None).unwrap();
    let cfg = lumbung::config::load(&path).unwrap();
    cluster.nodes.resize_with(id - 1, || None);
    cluster
        .nodes
        .push(Some(lumbung::node::start(cfg).await.unwrap()));
    addr
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

    let mut acked = write_before(&client, 12).await;

    // A new node: its files, its process, then membership.
    let addr = start_new_node(&mut cluster, 4).await;
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
    let writer = tokio::spawn(load(
        common::s3(&cluster.env),
        live.clone(),
        stop.clone(),
        Duration::from_millis(50),
    ));
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
    common::assert_at_rf(&admin, 3, &[]).await;
    let view = lumbung::admin::status::collect(&admin).await.unwrap();
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
    read_all(&client, &acked).await;
    println!("{} acknowledged objects read back", acked.len());

    // With node 1 stopped, everything still reads: each shard has two
    // other replicas, node 4's among them where it took one over.
    cluster.stop_node(1).await;
    let some: BTreeMap<String, u64> = acked.into_iter().take(20).collect();
    read_all(&client, &some).await;
    cluster.stop().await;
}

/// Waits until `node`'s members row says `state`, and returns the list.
async fn member_state(admin: &AdminConfig, node: u64) -> String {
    let list = nodes::list(admin).await.unwrap();
    list.members
        .iter()
        .find(|m| m.node_id == node)
        .map(|m| m.state.clone())
        .unwrap_or_default()
}

async fn read_all(client: &aws_sdk_s3::Client, acked: &BTreeMap<String, u64>) {
    for (key, seed) in acked {
        let len = if key.starts_with("before/") {
            OBJECT
        } else {
            200_000
        };
        common::assert_reads_back(client, "demo", key, *seed, len).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_and_a_dead_node_leave_every_shard_at_rf() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = lumbung::dev::DevOptions::new(tmp.path().join("cluster"), common::free_ports(5));
    opts.nodes = 4;
    opts.shards = 12;
    let mut cluster = lumbung::dev::start(&opts).await.unwrap();
    let dir = cluster.dir.clone();
    let admin: AdminConfig = lumbung::config::load(&dir.join("admin.toml")).unwrap();
    let client = common::s3(&cluster.env);
    let mut acked = write_before(&client, 6).await;
    let live: Acked = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(load(
        common::s3(&cluster.env),
        live.clone(),
        stop.clone(),
        Duration::from_millis(50),
    ));

    // Drain node 4 under load, then remove it.
    let drain = nodes::drain(&admin, 4).await.unwrap();
    let end = wait_done(&admin, drain.id, Duration::from_secs(240)).await;
    assert_eq!(end.state, "done");
    assert_eq!(member_state(&admin, 4).await, "drained");
    common::assert_at_rf(&admin, 3, &[4]).await;
    nodes::remove(&admin, 4, false).await.unwrap();
    assert_eq!(member_state(&admin, 4).await, "removed");
    cluster.stop_node(4).await;

    // Three nodes left for three replicas: no more draining.
    let epoch = nodes::list(&admin).await.unwrap().epoch;
    let below = nodes::drain(&admin, 1).await.unwrap_err();
    assert!(
        format!("{below:#}").contains("would leave 2 active nodes"),
        "{below:#}"
    );
    assert_eq!(nodes::list(&admin).await.unwrap().epoch, epoch);

    // A spare joins; node 3 dies for good and is removed as dead.
    let addr = start_new_node(&mut cluster, 5).await;
    nodes::add(&admin, addr, "", None).await.unwrap();

    // A rebalance onto it, cancelled at once, stops after a whole move.
    let run = nodes::rebalance(&admin, pb::RebalanceRequest::default())
        .await
        .unwrap();
    let cancel = pb::RebalanceRequest {
        cancel: true,
        ..Default::default()
    };
    nodes::rebalance(&admin, cancel).await.unwrap();
    let end = wait_done(&admin, run.id, Duration::from_secs(120)).await;
    assert_eq!(end.state, "cancelled");
    assert!(
        (end.done as usize) < run.moves.len(),
        "cancelled too late to show"
    );
    common::assert_at_rf(&admin, 3, &[4]).await;
    let again = nodes::rebalance(&admin, cancel).await.unwrap_err();
    assert!(
        format!("{again:#}").contains("no rebalance is running"),
        "{again:#}"
    );

    cluster.stop_node(3).await;
    let lost = Instant::now();
    let dead = nodes::remove(&admin, 3, true).await.unwrap();
    let end = wait_done(&admin, dead.id, Duration::from_secs(240)).await;
    assert_eq!(end.state, "done");
    println!(
        "node 3 dead: {} replicas re-created in {:?}",
        end.done,
        lost.elapsed()
    );
    common::assert_at_rf(&admin, 3, &[3, 4]).await;

    stop.store(true, Ordering::Relaxed);
    let failures = writer.await.unwrap();
    println!("failures during drain and loss: {failures}");
    acked.extend(live.lock().unwrap().clone());
    read_all(&client, &acked).await;
    println!("{} acknowledged objects read back", acked.len());
    cluster.stop().await;
}

/// The most voters any shard has, as its replicas report.
async fn most_voters(admin: &AdminConfig) -> usize {
    let view = lumbung::admin::status::collect(admin).await.unwrap();
    view.shards
        .iter()
        .map(|s| s.voters.len())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_survives_the_death_of_its_coordinator() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = common::cluster(tmp.path(), 16).await;
    let dir = cluster.dir.clone();
    let admin: AdminConfig = lumbung::config::load(&dir.join("admin.toml")).unwrap();
    let client = common::s3(&cluster.env);
    let acked = write_before(&client, 8).await;
    let addr = start_new_node(&mut cluster, 4).await;
    nodes::add(&admin, addr, "", None).await.unwrap();

    let run = nodes::rebalance(&admin, pb::RebalanceRequest::default())
        .await
        .unwrap();
    // Wait for a move in the middle of the plan, then stop the node that
    // coordinates it: the one leading the meta shard (never the new node,
    // which every move needs).
    let waiting = Instant::now();
    let coordinator = loop {
        assert!(
            waiting.elapsed() < Duration::from_secs(120),
            "no move in progress to interrupt"
        );
        let progress = nodes::progress(&admin).await.unwrap();
        assert_eq!(progress.state, "running", "finished before the kill");
        let view = lumbung::admin::status::collect(&admin).await.unwrap();
        let meta = view
            .shards
            .iter()
            .find(|s| s.shard == 0)
            .and_then(|s| s.leader);
        if progress.done >= 2 {
            if let Some(leader) = meta.filter(|l| *l != 4) {
                break leader as usize;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let killed_at = nodes::progress(&admin).await.unwrap().done;
    within(
        60,
        "stopping the coordinator",
        cluster.stop_node(coordinator),
    )
    .await;
    println!("stopped coordinator node {coordinator} after {killed_at} moves");

    let mut most = 0;
    let started = Instant::now();
    let end = loop {
        most = most.max(most_voters(&admin).await);
        let s = nodes::progress(&admin).await.unwrap();
        if s.id == run.id && s.state != "running" {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "stuck at {} moves",
            s.done
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(end.state, "done");
    assert_eq!(end.done as usize, run.moves.len());
    assert!(most <= 4, "a shard had {most} voters (RF + 1 at most)");
    println!(
        "resumed and finished {} moves in {:?}",
        end.done,
        started.elapsed()
    );

    // The coordinator comes back and drops what the rebalance moved off it.
    within(
        60,
        "restarting the coordinator",
        cluster.restart_node(coordinator),
    )
    .await
    .unwrap();
    let layout = nodes::list(&admin).await.unwrap();
    let want = layout
        .members
        .iter()
        .find(|m| m.node_id == coordinator as u64)
        .unwrap()
        .replicas as usize;
    let back = Instant::now();
    loop {
        let view = lumbung::admin::status::collect(&admin).await.unwrap();
        let node = view.nodes.iter().find(|n| n.node_id == coordinator as u64);
        if node.is_some_and(|n| n.up && n.replicas == want) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "node {coordinator} kept moved replicas"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    common::assert_at_rf(&admin, 3, &[]).await;
    within(120, "reading everything back", read_all(&client, &acked)).await;
    cluster.stop().await;
}

/// openraft 0.9 followers refuse to vote while they hear from their
/// leader, and every write or read confirmation is such a message: a shard
/// kept busy by a client without pause must still hand its leadership over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_off_a_shard_kept_busy() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let cluster = common::cluster(tmp.path(), 2).await;
    let host = cluster.nodes[0].as_ref().unwrap().host.clone();
    let live: Acked = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = common::s3(&cluster.env);
    let writer = tokio::spawn(load(
        client.clone(),
        live.clone(),
        stop.clone(),
        Duration::ZERO,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;

    for shard in [ShardId(0), ShardId(1)] {
        for _ in 0..3 {
            let from = leader_of(&host, shard).await;
            let voters = host.layout().replicas(shard);
            let to = voters[(voters.iter().position(|&v| v == from).unwrap() + 1) % voters.len()];
            let started = Instant::now();
            host.membership(shard, &MembershipOp::TransferLeader { node: to })
                .await
                .unwrap_or_else(|e| panic!("shard {shard}: {from} -> {to}: {e}"));
            // Node 1's own view of the leader may lag the election a moment.
            let landed = Instant::now();
            while leader_of(&host, shard).await != to {
                assert!(
                    landed.elapsed() < Duration::from_secs(5),
                    "shard {shard}: led by {} after handing over to {to}",
                    leader_of(&host, shard).await
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("shard {shard}: {from} -> {to} in {:?}", started.elapsed());
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(writer.await.unwrap(), 0, "client requests failed");
    let acked = live.lock().unwrap().clone();
    assert!(acked.len() > 10, "the client wrote only {}", acked.len());
    read_all(&client, &acked).await;
    cluster.stop().await;
}

/// Who leads `shard`; fails the test if no call reached a leader.
async fn leader_of(host: &lumbung::shard::ShardHost, shard: ShardId) -> u64 {
    host.find_leader(shard).await.expect("a leader answers")
}

/// Runs `f`, failing the test with `what` if it takes over `secs`.
async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what} took over {secs} s"))
}

/// A replica a move left joining (its rebalance stopped before the move
/// finished) is taken back: the learner leaves the shard's group, the
/// layout forgets it, and the node wipes what it received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_left_joining_by_a_stopped_move_is_dropped() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = lumbung::dev::DevOptions::new(tmp.path().join("cluster"), common::free_ports(5));
    opts.nodes = 4;
    opts.shards = 8;
    let cluster = lumbung::dev::start(&opts).await.unwrap();
    let client = common::s3(&cluster.env);
    write_before(&client, 4).await;
    let host = cluster.nodes[0].as_ref().unwrap().host.clone();
    let layout = lumbung::node::members::current(&host).await.unwrap();
    let (shard, node) = (1..layout.shards)
        .map(ShardId)
        .find_map(|s| {
            let voters = layout.replicas(s);
            (1..=4u64).find(|n| !voters.contains(n)).map(|n| (s, n))
        })
        .unwrap();

    // What a move stopped after its second step leaves: a learner, and the
    // layout naming it joining.
    let addr = layout.addr_of(node).unwrap().to_string();
    let add = MembershipOp::AddLearner { node, addr };
    let started = Instant::now();
    while host.membership(shard, &add).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no learner added"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lumbung::node::members::change(&host, |l| {
        l.joining.insert(shard.0, node);
        Ok(())
    })
    .await
    .unwrap();

    let learner_of = |n: &lumbung::node::RunningNode| {
        n.host.raft(shard).is_some_and(|r| {
            let m = r.metrics().borrow().membership_config.membership().clone();
            let learner = m.learner_ids().any(|l| l == node);
            learner
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let layout = lumbung::node::members::current(&host).await.unwrap();
        let learner_anywhere = cluster.nodes.iter().flatten().any(&learner_of);
        let holds = cluster.nodes[node as usize - 1]
            .as_ref()
            .unwrap()
            .host
            .raft(shard)
            .is_some();
        if layout.joining.is_empty() && !learner_anywhere && !holds {
            println!(
                "shard {shard}'s learner on node {node} dropped in {:?}",
                started.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left joining: {:?}, a learner still: {learner_anywhere}, node {node} holds a replica: {holds}",
            layout.joining
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
