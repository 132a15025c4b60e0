//! A node whose disk fills up refuses new data, keeps serving, loses
//! nothing and recovers by itself.
//!
//! Node 3's data folder is a 256 MiB tmpfs, and it keeps 64 MiB in reserve.
//! It leads the bucket's index shard. A filler file first takes the disk
//! below the reserve: node 3 refuses new objects with 507
//! InsufficientStorage (and its chunk copies) and within seconds hands the
//! index shard to another replica, where writes go on. Then below half of
//! it with node 1 leading the index shard (nodes 1 and 2 store new
//! objects; node 3's Raft appends wait and it falls behind). Meanwhile
//! every request answers 200 or 507, and every acknowledged object reads
//! back. The filler goes, node 3 catches up by itself. Then its disk fills
//! below half the reserve at once while it leads the index shard: PUTs and
//! DELETEs go on at another replica without waiting for the write
//! deadline. With node 1 stopped every acknowledged object still reads
//! back from nodes 2 and 3. Needs root (`mount`); the mount is removed
//! when the test ends, pass or fail.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use lumbung::config::AdminConfig;
use lumbung::shard::command::MembershipOp;
use lumbung::types::ShardId;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A size-limited tmpfs, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("running mount (this test needs root)")
            .success();
        assert!(ok, "mounting a tmpfs failed (this test needs root)");
        SmallDisk(at.to_path_buf())
    }

    /// Fills the disk with one file until `left` bytes stay free.
    fn fill_to(&self, left: u64) {
        let filler = self.0.join("filler");
        let _ = std::fs::remove_file(&filler);
        let free = lumbung::space::free_bytes(&self.0).unwrap();
        let len = free.saturating_sub(left) as usize;
        std::fs::write(&filler, vec![0u8; len]).unwrap();
    }

    fn empty(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes object `seed` (4 KiB, or 2 MiB every fifth) and returns whether
/// it was acknowledged; any answer but 200 and 507 fails the test.
async fn write(client: &Client, bucket: &str, seed: u64) -> Option<(String, u64, usize)> {
    let len = if seed.is_multiple_of(5) {
        2 << 20
    } else {
        4096
    };
    let key = format!("full/{seed}");
    match client
        .put_object()
        .bucket(bucket)
        .key(&key)
        .body(ByteStream::from(common::bytes(seed, len)))
        .send()
        .await
    {
        Ok(_) => Some((key, seed, len)),
        Err(e) => {
            let (status, code) = (common::status(&e), common::code(&e));
            assert_eq!(
                (status, code.as_str()),
                (507, "InsufficientStorage"),
                "{key}: only 200 or 507 may answer"
            );
            None
        }
    }
}

async fn assert_all_read_back(client: &Client, bucket: &str, acked: &[(String, u64, usize)]) {
    for (key, seed, len) in acked {
        common::assert_reads_back(client, bucket, key, *seed, *len).await;
    }
}

/// Waits until node 3 has applied as far as the cluster on every shard it
/// holds, and no node still lacks a chunk.
async fn wait_caught_up(admin: &AdminConfig, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let view = lumbung::admin::status::collect(admin).await.unwrap();
        let missing: u64 = view.nodes.iter().map(|n| n.chunks_missing).sum();
        let behind = common::shards_behind(admin, 3, &view).await;
        if missing == 0 && behind.is_empty() && view.nodes.iter().all(|n| n.up) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not caught up after {limit:?}: {missing} chunks missing, shards behind: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Hands the leadership of `shard` to `node`.
async fn lead(host: std::sync::Arc<lumbung::shard::ShardHost>, shard: ShardId, node: u64) {
    host.membership(shard, &MembershipOp::TransferLeader { node })
        .await
        .unwrap();
    // This node's own view of the election can lag a little.
    for _ in 0..50 {
        if host.find_leader(shard).await == Some(node) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("shard {shard} did not move to node {node}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_full_disk_refuses_new_data_and_recovers_when_space_returns() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let port = common::free_ports(4);
    lumbung::admin::init_cluster(&common::init_options(&dir, port, 8)).unwrap();
    let node3 = dir.join("node3.toml");
    let cfg = std::fs::read_to_string(&node3).unwrap();
    assert!(
        cfg.contains("reserve_mib = 1024"),
        "init-cluster writes the default reserve"
    );
    std::fs::write(
        &node3,
        cfg.replace("reserve_mib = 1024", "reserve_mib = 64"),
    )
    .unwrap();
    let disk = SmallDisk::mount(&dir.join("data/node3"), "256m");

    let mut cluster = lumbung::dev::start(&lumbung::dev::DevOptions::new(dir.clone(), port))
        .await
        .unwrap();
    let admin: AdminConfig = lumbung::config::load(&dir.join("admin.toml")).unwrap();
    let (client, bucket) = (common::s3(&cluster.env), cluster.env.bucket.clone());

    // Node 3 leads the bucket's index shard, so its refusals reach clients.
    let node1_host = cluster.nodes[0].as_ref().unwrap().host.clone();
    let index = node1_host.layout().shard_for_bucket("demo", &bucket);
    lead(node1_host.clone(), index, 3).await;

    let mut acked = Vec::new();
    for seed in 0..10 {
        acked.push(
            write(&client, &bucket, seed)
                .await
                .expect("room on every disk"),
        );
    }

    // Below the reserve: node 3 takes no new data. While it still leads
    // the index shard it answers 507; within seconds it hands the shard to
    // another replica, where writes go on.
    disk.fill_to(40 << 20);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (mut refused, mut seed) = (0, 1000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while node1_host.find_leader(index).await == Some(3) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 3 kept leading the index shard with its disk below the reserve"
        );
        // Acknowledged only once another replica took over meanwhile.
        match write(&client, &bucket, seed).await {
            Some(a) => acked.push(a),
            None => refused += 1,
        }
        seed += 1;
    }
    for seed in 10..30 {
        let a = write(&client, &bucket, seed).await;
        acked.push(a.expect("another replica leads the index shard"));
    }
    assert_all_read_back(&client, &bucket, &acked).await;

    // Below half the reserve, with node 1 leading the index shard: writes
    // go on without node 3, whose appends wait; it is left behind.
    disk.fill_to(10 << 20);
    lead(node1_host.clone(), index, 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = acked.len();
    for seed in 30..60 {
        if let Some(a) = write(&client, &bucket, seed).await {
            acked.push(a);
        }
    }
    let behind = acked.len() - before;
    assert!(
        behind > 0,
        "nodes 1 and 2 should take writes without node 3"
    );
    assert_all_read_back(&client, &bucket, &acked).await;
    println!(
        "{} objects acknowledged: {refused} refused by node 3 below the reserve before it handed the index shard on, {behind} stored without node 3",
        acked.len()
    );

    // Space returns: node 3 catches up by itself and takes writes again.
    disk.empty();
    wait_caught_up(&admin, Duration::from_secs(90)).await;
    for seed in 60..70 {
        acked.push(write(&client, &bucket, seed).await.expect("room again"));
    }

    // Below half the reserve at once while node 3 leads the index shard:
    // its Raft core waits with the first append it gets. Calls caught
    // there go on at the replica elected next instead of waiting for the
    // write deadline (10 s), and a delete is retried there safely.
    lead(node1_host.clone(), index, 3).await;
    disk.fill_to(10 << 20);
    let filled = tokio::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let mut seed = 2000;
    while filled.elapsed() < Duration::from_secs(6) {
        let started = tokio::time::Instant::now();
        if let Some((key, ..)) = write(&client, &bucket, seed).await {
            client
                .delete_object()
                .bucket(&bucket)
                .key(&key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("deleting {key}: {e:?}"));
        }
        slowest = slowest.max(started.elapsed());
        seed += 1;
    }
    assert!(
        slowest < Duration::from_secs(8),
        "a call waited {slowest:?} on a leader whose log waits for space"
    );
    println!(
        "with node 3 leading when its disk filled: {} PUT+DELETE rounds, the slowest took {slowest:?}",
        seed - 2000
    );
    disk.empty();
    wait_caught_up(&admin, Duration::from_secs(90)).await;

    // Node 3 holds everything: with node 1 gone, 2 and 3 serve it all.
    cluster.stop_node(1).await;
    assert_all_read_back(&client, &bucket, &acked).await;
    cluster.stop().await;
    drop(disk);
}
