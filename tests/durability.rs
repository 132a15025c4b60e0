//! Nothing acknowledged is lost when nodes die.
//!
//! Real `lumbung node` and `lumbung gateway` processes; a writer stores
//! objects (inline and chunked) without pause while:
//!   1. a node is killed with SIGKILL, then restarted;
//!   2. the leader of the bucket's index shard is killed, then restarted;
//!   3. a node is killed, the others write far past its log (the log is
//!      purged behind a snapshot), and it restarts and must catch up by
//!      snapshot, chunks included.
//!
//! Garbage collection runs every 2 s with a 5 s grace throughout.
//! Afterwards every object whose PUT was acknowledged reads back byte for
//! byte, and writes resumed within a few seconds of each kill.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use common::processes::Processes;
use common::{bytes, s3};
use lumbung::admin::{init_cluster, S3Env};
use lumbung::config::{self, AdminConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the writer learned: acknowledged objects and when each PUT ended.
#[derive(Default)]
struct Log {
    acked: Vec<(String, u64, usize)>,
    successes: Vec<Instant>,
    failures: usize,
}

fn size_of(i: u64) -> usize {
    // Alternate inline bodies and bodies of two chunks.
    if i.is_multiple_of(4) {
        4 * 1024 * 1024 + 1000
    } else {
        3000 + (i as usize % 7) * 100
    }
}

async fn writer(c: aws_sdk_s3::Client, log: Arc<Mutex<Log>>, stop: Arc<AtomicBool>, first: u64) {
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("obj-{i:06}");
        let len = size_of(i);
        let put = c
            .put_object()
            .bucket("demo")
            .key(&key)
            .body(ByteStream::from(bytes(i, len)))
            .send()
            .await;
        let mut l = log.lock().unwrap();
        match put {
            Ok(_) => {
                l.acked.push((key, i, len));
                l.successes.push(Instant::now());
            }
            Err(_) => l.failures += 1,
        }
        i += 1;
    }
}

/// Longest stretch without a successful PUT from `since` until now.
fn longest_gap(log: &Mutex<Log>, since: Instant) -> Duration {
    let l = log.lock().unwrap();
    let mut prev = since;
    let mut gap = Duration::ZERO;
    for t in l.successes.iter().filter(|t| **t >= since) {
        gap = gap.max(*t - prev);
        prev = *t;
    }
    gap.max(prev.elapsed())
}

async fn status(admin: &AdminConfig) -> lumbung::admin::status::ClusterView {
    lumbung::admin::status::collect(admin).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_and_laggards_catch_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let env: S3Env = init_cluster(&common::init_options(&dir, common::free_ports(4), 8)).unwrap();
    common::processes::set_snapshot_every(&dir, 40);
    // Collections and orphan sweeps run throughout: none may take a chunk
    // an acknowledged object names.
    common::processes::set_gc(&dir, 5, 2);
    let admin: AdminConfig = config::load(&dir.join("admin.toml")).unwrap();
    let layout = config::load::<lumbung::config::NodeConfig>(&dir.join("node1.toml"))
        .unwrap()
        .cluster
        .layout();
    let index_shard = layout.shard_for_bucket("demo", "demo").0;

    let mut procs = Processes::new(&dir);
    for slot in [1, 2, 3, 0] {
        procs.spawn(slot);
    }
    let c = s3(&env);
    let ready = Instant::now();
    while c.head_bucket().bucket("demo").send().await.is_err() {
        assert!(
            ready.elapsed() < Duration::from_secs(60),
            "cluster never came up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| tokio::spawn(writer(s3(&env), log.clone(), stop.clone(), w * 1_000_000)))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. A node dies and comes back.
    let killed = Instant::now();
    procs.kill(2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    procs.spawn(2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let gap = longest_gap(&log, killed);
    println!("after killing node 2: longest pause in writes {gap:?}");
    assert!(
        gap < Duration::from_secs(8),
        "writes stalled {gap:?} after a node died"
    );

    // 2. The leader of the bucket's index shard dies.
    let leader = status(&admin)
        .await
        .shards
        .iter()
        .find(|s| s.shard == index_shard)
        .and_then(|s| s.leader)
        .expect("the index shard has a leader") as usize;
    let killed = Instant::now();
    procs.kill(leader);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let gap = longest_gap(&log, killed);
    println!("after killing leader node {leader}: longest pause in writes {gap:?}");
    assert!(
        gap < Duration::from_secs(8),
        "writes stalled {gap:?} after the leader died"
    );
    procs.spawn(leader);
    // Only once it is back and caught up can the other two lose a node.
    let back = Instant::now();
    loop {
        let view = status(&admin).await;
        if view.nodes.iter().all(|n| n.up)
            && common::shards_behind(&admin, leader, &view)
                .await
                .is_empty()
        {
            println!("node {leader} back and caught up in {:?}", back.elapsed());
            break;
        }
        if back.elapsed() > Duration::from_secs(60) {
            procs.fail(
                60,
                format!("node {leader} did not come back and catch up within 60 s"),
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // 3. A node misses far more than the log keeps, then catches up.
    let laggard = if leader == 3 { 1 } else { 3 };
    procs.kill(laggard);
    let before = log.lock().unwrap().acked.len();
    let behind = Instant::now();
    while log.lock().unwrap().acked.len() < before + 120 {
        assert!(
            behind.elapsed() < Duration::from_secs(60),
            "writes too slow without node {laggard}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    procs.spawn(laggard);
    let caught_up = Instant::now();
    loop {
        let view = status(&admin).await;
        let up = view.nodes.iter().all(|n| n.up);
        let missing: Vec<u64> = view.nodes.iter().map(|n| n.chunks_missing).collect();
        let behind = common::shards_behind(&admin, laggard, &view).await;
        if up && behind.is_empty() && missing.iter().all(|m| *m == 0) {
            let chunks: Vec<u64> = view.nodes.iter().map(|n| n.chunk_count).collect();
            println!(
                "node {laggard} caught up in {:?} (chunks per node {chunks:?})",
                caught_up.elapsed()
            );
            break;
        }
        if caught_up.elapsed() > Duration::from_secs(180) {
            procs.fail(60, format!("node {laggard} did not catch up: shards behind {behind:?}, chunks missing per node {missing:?}"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let laggard_log = std::fs::read_to_string(dir.join(format!("node{laggard}.log"))).unwrap();
    assert!(
        laggard_log.contains("installed snapshot from the leader"),
        "node {laggard} caught up without a snapshot; the test did not purge enough log"
    );

    let collections = common::processes::collections_logged(&dir);
    println!("{collections} garbage collections ran");
    assert!(collections > 0, "no garbage collection ran");

    // Snapshot files go once sent or installed.
    let left: Vec<_> = (1..=3)
        .flat_map(|n| std::fs::read_dir(dir.join(format!("data/node{n}/snapshots"))).unwrap())
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".snap") || name.ends_with(".receiving"))
        .collect();
    assert!(left.is_empty(), "snapshot files left: {left:?}");

    // Every acknowledged object, byte for byte.
    let acked = log.lock().unwrap().acked.clone();
    let failures = log.lock().unwrap().failures;
    println!(
        "{} acknowledged writes, {failures} failed attempts",
        acked.len()
    );
    assert!(acked.len() > 150);
    for (key, seed, len) in acked {
        common::assert_reads_back(&c, "demo", &key, seed, len).await;
    }

    // What the SIGKILLed coordinators left (chunks recorded for writes
    // that never committed, files never recorded) goes: every node ends
    // up holding about the chunked objects the bucket lists (RF 3 on 3
    // nodes: all of them).
    let mut live = 0u64;
    let mut pages = c.list_objects_v2().bucket("demo").into_paginator().send();
    while let Some(page) = pages.next().await {
        for o in page.unwrap().contents() {
            let size = o.size().unwrap() as u64;
            live += if size > 64 * 1024 { size } else { 0 };
        }
    }
    let started = Instant::now();
    loop {
        let held: Vec<u64> = status(&admin)
            .await
            .nodes
            .iter()
            .map(|n| n.chunk_bytes)
            .collect();
        if held.len() == 3 && held.iter().all(|b| *b <= live + live / 20) {
            println!(
                "chunk bytes per node {held:?} for {live} live, {:?} after the writes",
                started.elapsed()
            );
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            procs.fail(
                20,
                format!("chunk bytes per node {held:?} still above {live} live + 5 %"),
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
