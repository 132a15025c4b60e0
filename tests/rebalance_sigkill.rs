//! Cluster operations survive processes dying the hard way. Real
//! `lumbung` processes, a client writing throughout:
//!   1. a 4th node joins and a rebalance starts (its new replicas catch
//!      up by snapshot, the logs being purged); mid-plan the node
//!      coordinating it (the meta shard's leader) is SIGKILLed. The next
//!      leader resumes the plan and finishes it, and no shard ever has
//!      fewer than RF or more than RF + 1 voters;
//!   2. a node is SIGKILLed for good and removed with `--dead`; every
//!      shard is back at RF within a time the test prints.
//!
//! Garbage collection runs every 2 s with a 5 s grace throughout. Every
//! acknowledged object then reads back byte for byte.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use common::processes::Processes;
use lumbung::admin::{init_cluster, nodes, S3Env};
use lumbung::config::AdminConfig;
use lumbung::rpc::pb;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RF: usize = 3;
const SHARDS: u32 = 12;

type Acked = Arc<Mutex<BTreeMap<String, (u64, usize)>>>;

/// Every 4th object spans two chunks; the rest are one chunk or inline.
fn size_of(i: u64) -> usize {
    match i % 4 {
        0 => 4 * 1024 * 1024 + 1000,
        1 => 200_000,
        _ => 3000,
    }
}

/// Writes objects until told to stop; returns the failed attempts.
async fn writer(client: aws_sdk_s3::Client, acked: Acked, stop: Arc<AtomicBool>) -> u32 {
    let mut failures = 0;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("obj-{i:06}");
        let len = size_of(i);
        let put = client
            .put_object()
            .bucket("demo")
            .key(&key)
            .body(ByteStream::from(common::bytes(i, len)))
            .send()
            .await;
        match put {
            Ok(_) => {
                acked.lock().unwrap().insert(key, (i, len));
            }
            Err(_) => failures += 1,
        }
        i += 1;
    }
    failures
}

/// The fewest and the most voters any shard reports, if every shard
/// reported.
async fn voter_range(admin: &AdminConfig) -> Option<(usize, usize)> {
    let view = lumbung::admin::status::collect(admin).await.ok()?;
    let counts = view.shards.iter().map(|s| s.voters.len());
    Some((counts.clone().min()?, counts.max()?))
}

/// The node leading the meta shard (which coordinates rebalances).
async fn meta_leader(admin: &AdminConfig) -> Option<usize> {
    let view = lumbung::admin::status::collect(admin).await.ok()?;
    let meta = view.shards.iter().find(|s| s.shard == 0)?;
    meta.leader.map(|l| l as usize)
}

/// Waits for rebalance `id` to end, tracking the voter counts of every
/// shard meanwhile; returns the final status and the (min, max) voters.
async fn wait_done(
    admin: &AdminConfig,
    procs: &Processes,
    id: i64,
    limit: Duration,
) -> (pb::RebalanceStatus, (usize, usize)) {
    let started = Instant::now();
    let (mut least, mut most) = (usize::MAX, 0);
    loop {
        if let Some((lo, hi)) = voter_range(admin).await {
            least = least.min(lo);
            most = most.max(hi);
        }
        match nodes::progress(admin).await {
            Ok(s) if s.id == id && s.state != "running" => return (s, (least, most)),
            Ok(s) if started.elapsed() > limit => {
                procs.fail(
                    40,
                    format!(
                        "rebalance not done after {limit:?}: {} of {} moves",
                        s.done,
                        s.moves.len()
                    ),
                );
            }
            Err(e) if started.elapsed() > limit => {
                procs.fail(40, format!("no rebalance progress after {limit:?}: {e:#}"));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until every member that should be running answers.
async fn wait_up(admin: &AdminConfig, procs: &Processes, node: usize) {
    let started = Instant::now();
    loop {
        let view = lumbung::admin::status::collect(admin).await;
        let row = view
            .as_ref()
            .ok()
            .and_then(|v| v.nodes.iter().find(|n| n.node_id == node as u64));
        if row.is_some_and(|n| n.up && n.chunks_missing == 0) {
            return;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let row = serde_json::to_string(&row).unwrap();
            procs.fail(
                40,
                format!("node {node} did not come back within 60 s: {row}"),
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalance_and_node_loss_survive_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let env: S3Env =
        init_cluster(&common::init_options(&dir, common::free_ports(4), SHARDS)).unwrap();
    // New replicas catch up by snapshot: the logs are purged long before.
    common::processes::set_snapshot_every(&dir, 10);
    // Collections run throughout, moves and kills included (node 4 copies
    // node 1's settings).
    common::processes::set_gc(&dir, 5, 2);
    let admin: AdminConfig = lumbung::config::load(&dir.join("admin.toml")).unwrap();
    let mut procs = Processes::new(&dir);
    for slot in [1, 2, 3, 0] {
        procs.spawn(slot);
    }
    let client = common::s3(&env);
    let ready = Instant::now();
    while client.head_bucket().bucket("demo").send().await.is_err() {
        assert!(
            ready.elapsed() < Duration::from_secs(60),
            "cluster never came up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(writer(common::s3(&env), acked.clone(), stop.clone()));
    while acked.lock().unwrap().len() < 100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 1. A 4th node joins; its rebalance loses its coordinator mid-plan.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_ports(1))
        .parse()
        .unwrap();
    lumbung::admin::init::init_node(&dir, 4, addr, None).unwrap();
    procs.spawn(4);
    let joined = Instant::now();
    while let Err(e) = nodes::add(&admin, addr, "", None).await {
        assert!(
            joined.elapsed() < Duration::from_secs(30),
            "node 4 could not join: {e:#}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let run = nodes::rebalance(&admin, pb::RebalanceRequest::default())
        .await
        .unwrap();
    assert!(run.moves.len() >= 4, "too small a plan: {:?}", run.moves);
    let waiting = Instant::now();
    let coordinator = loop {
        let progress = nodes::progress(&admin).await.unwrap();
        assert_eq!(progress.state, "running", "finished before the kill");
        if progress.done >= 1 {
            // Never the new node: every move needs it.
            if let Some(leader) = meta_leader(&admin).await.filter(|l| *l != 4) {
                break leader;
            }
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(120),
            "no move in progress to interrupt"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let done_at_kill = nodes::progress(&admin).await.unwrap().done;
    procs.kill(coordinator);
    let resumed = Instant::now();
    let (end, (least, most)) = wait_done(&admin, &procs, run.id, Duration::from_secs(300)).await;
    println!(
        "coordinator node {coordinator} SIGKILLed after {done_at_kill} of {} moves; \
         the rest finished in {:?}; voters per shard ranged {least}..={most}",
        run.moves.len(),
        resumed.elapsed()
    );
    assert_eq!(end.state, "done");
    assert_eq!(end.done as usize, run.moves.len());
    assert!(least >= RF, "a shard fell to {least} voters");
    assert!(most <= RF + 1, "a shard had {most} voters (RF + 1 at most)");
    let node4_log = std::fs::read_to_string(dir.join("node4.log")).unwrap();
    assert!(
        node4_log.contains("installed snapshot from the leader"),
        "no new replica caught up by snapshot; the test did not purge enough log"
    );
    procs.spawn(coordinator);
    wait_up(&admin, &procs, coordinator).await;
    let collections = common::processes::collections_logged(&dir);
    println!("{collections} garbage collections ran so far");
    assert!(collections > 0, "no garbage collection ran");

    // 2. A node dies for good and is removed as dead.
    let leader = meta_leader(&admin).await;
    let dead = [4, 1, 2, 3]
        .into_iter()
        .find(|n| Some(*n) != leader)
        .unwrap();
    procs.kill(dead);
    let lost = Instant::now();
    let removal = nodes::remove(&admin, dead as u64, true).await.unwrap();
    let (end, _) = wait_done(&admin, &procs, removal.id, Duration::from_secs(300)).await;
    let took = lost.elapsed();
    assert_eq!(end.state, "done");
    common::assert_at_rf(&admin, RF, &[dead as u64]).await;
    println!(
        "node {dead} SIGKILLed for good: {} replicas re-created, every shard at RF {RF} \
         {took:?} after the kill",
        end.done
    );

    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    println!(
        "{} acknowledged writes, {failures} failed attempts",
        acked.len()
    );
    for (key, (seed, len)) in &acked {
        common::assert_reads_back(&client, "demo", key, *seed, *len).await;
    }
}
