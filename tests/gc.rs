//! Garbage collection gives space back, and never takes a chunk a write
//! still needs. An in-process cluster with a 2 s grace; collections and
//! orphan sweeps are run by the test, not by the nodes' timers.
//!   - churn: overwrites, deletes, a batch delete, an aborted upload, a
//!     replaced part and one left out at Complete, a BadDigest PUT, a copy
//!     whose source is deleted, a write whose coordinator went away before
//!     it committed, and a chunk file no record names. After collection
//!     every node holds at most its live bytes x 1.05, and every live
//!     object reads back byte for byte;
//!   - the race: a PUT streaming slowly across many collections commits
//!     and reads back; a write whose coordinator stalled past the grace
//!     while a collection ran is refused at commit, never half-stored.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::Bytes;
use common::{assert_reads_back, bytes};
use lumbung::config::AdminConfig;
use lumbung::dev::DevCluster;
use lumbung::node::objects::Target;
use lumbung::node::RunningNode;
use lumbung::shard::command::Precondition;
use lumbung::shard::ShardError;
use lumbung::types::WriteId;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;
const GRACE: Duration = Duration::from_secs(2);

/// A 3-node cluster whose nodes collect with a 2 s grace, and never on
/// their own.
async fn cluster(dir: &std::path::Path) -> DevCluster {
    common::cluster_collecting(dir, 8, GRACE.as_secs()).await
}

fn nodes(c: &DevCluster) -> Vec<&RunningNode> {
    c.nodes.iter().flatten().collect()
}

/// One collection (on the meta shard's leader's behalf, from node 1),
/// then an orphan sweep on every node.
async fn collect(c: &DevCluster) {
    let n = nodes(c)[0];
    n.objects.gc.collect(&n.host).await.unwrap();
    for n in nodes(c) {
        n.objects.gc.sweep(&n.objects.chunks).await.unwrap();
    }
}

/// Chunk bytes each node holds.
fn held(c: &DevCluster) -> Vec<u64> {
    nodes(c)
        .iter()
        .map(|n| n.objects.chunks.store.totals().0)
        .collect()
}

async fn put(s3: &aws_sdk_s3::Client, key: &str, seed: u64, len: usize) {
    s3.put_object()
        .bucket("demo")
        .key(key)
        .body(ByteStream::from(bytes(seed, len)))
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {key}: {}", common::code(&e)));
}

/// Writes a multipart upload's part `n` and returns it for Complete.
async fn part(
    s3: &aws_sdk_s3::Client,
    key: &str,
    upload: &str,
    n: i32,
    seed: u64,
) -> CompletedPart {
    let r = s3
        .upload_part()
        .bucket("demo")
        .key(key)
        .upload_id(upload)
        .part_number(n)
        .body(ByteStream::from(bytes(seed, 5 * MIB)))
        .send()
        .await
        .unwrap();
    CompletedPart::builder()
        .part_number(n)
        .e_tag(r.e_tag().unwrap())
        .build()
}

fn target(key: &str) -> Target {
    Target {
        tenant: "demo".into(),
        bucket: "demo".into(),
        key: key.into(),
        content_type: String::new(),
        user_metadata: BTreeMap::new(),
        part: None,
        write_id: WriteId::random(),
        precondition: Precondition::default(),
    }
}

/// A body of `pieces` MiB-sized pieces, one every `pause`.
fn slow_body(
    seed: u64,
    pieces: usize,
    pause: Duration,
) -> impl futures::Stream<Item = Result<Bytes, ShardError>> + Unpin {
    let data = Bytes::from(bytes(seed, pieces * MIB));
    Box::pin(futures::stream::unfold(0, move |i| {
        let data = data.clone();
        async move {
            if i == pieces {
                return None;
            }
            tokio::time::sleep(pause).await;
            Some((Ok(data.slice(i * MIB..(i + 1) * MIB)), i + 1))
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_leaves_only_live_bytes_after_collection() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path()).await;
    let s3 = common::s3(&c.env);
    // What should be live at the end.
    let mut live: BTreeMap<&str, Vec<u8>> = BTreeMap::new();

    for round in 0..5 {
        put(&s3, "overwritten", round, 6 * MIB).await;
    }
    live.insert("overwritten", bytes(4, 6 * MIB));
    put(&s3, "deleted", 10, 5 * MIB).await;
    s3.delete_object()
        .bucket("demo")
        .key("deleted")
        .send()
        .await
        .unwrap();
    let batch: Vec<ObjectIdentifier> = (0..3)
        .map(|i| {
            ObjectIdentifier::builder()
                .key(format!("batch{i}"))
                .build()
                .unwrap()
        })
        .collect();
    for (i, o) in batch.iter().enumerate() {
        put(&s3, o.key(), 20 + i as u64, 5 * MIB).await;
    }
    s3.delete_objects()
        .bucket("demo")
        .delete(Delete::builder().set_objects(Some(batch)).build().unwrap())
        .send()
        .await
        .unwrap();

    // An upload aborted; another with part 1 replaced and part 3 left out.
    let aborted = s3
        .create_multipart_upload()
        .bucket("demo")
        .key("aborted")
        .send()
        .await
        .unwrap();
    let aborted = aborted.upload_id().unwrap();
    part(&s3, "aborted", aborted, 1, 30).await;
    s3.abort_multipart_upload()
        .bucket("demo")
        .key("aborted")
        .upload_id(aborted)
        .send()
        .await
        .unwrap();
    let mp = s3
        .create_multipart_upload()
        .bucket("demo")
        .key("mp")
        .send()
        .await
        .unwrap();
    let mp = mp.upload_id().unwrap();
    part(&s3, "mp", mp, 1, 40).await;
    let one = part(&s3, "mp", mp, 1, 41).await;
    let two = part(&s3, "mp", mp, 2, 42).await;
    part(&s3, "mp", mp, 3, 43).await;
    s3.complete_multipart_upload()
        .bucket("demo")
        .key("mp")
        .upload_id(mp)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(one)
                .parts(two)
                .build(),
        )
        .send()
        .await
        .unwrap();
    live.insert("mp", [bytes(41, 5 * MIB), bytes(42, 5 * MIB)].concat());

    let refused = s3
        .put_object()
        .bucket("demo")
        .key("bad-digest")
        .content_md5("AAAAAAAAAAAAAAAAAAAAAA==")
        .body(ByteStream::from(bytes(50, 5 * MIB)))
        .send()
        .await
        .unwrap_err();
    assert_eq!(common::code(&refused), "BadDigest");

    // A copy outlives its source.
    put(&s3, "source", 60, 5 * MIB).await;
    s3.copy_object()
        .bucket("demo")
        .key("copy")
        .copy_source("demo/source")
        .send()
        .await
        .unwrap();
    s3.delete_object()
        .bucket("demo")
        .key("source")
        .send()
        .await
        .unwrap();
    live.insert("copy", bytes(60, 5 * MIB));

    // A coordinator gone before its commit: chunks stored and recorded,
    // no manifest.
    let n1 = nodes(&c)[0];
    let keys = n1.objects.tenant_keys("demo", None).await.unwrap();
    let body = futures::stream::iter([Ok(Bytes::from(bytes(70, 9 * MIB)))]);
    n1.objects
        .ingest(body, keys, false, async { Ok(()) })
        .await
        .unwrap();
    // And a chunk file no record names, as a crash between writing a
    // chunk and recording it leaves, written long ago.
    let orphan = Bytes::from(bytes(80, MIB));
    let orphan_id = lumbung::types::ChunkId::of(&orphan);
    n1.objects
        .chunks
        .store
        .put_verified(orphan_id, orphan)
        .await
        .unwrap();
    let hex = orphan_id.to_hex();
    let path = c.dir.join("data/node1/chunks").join(&hex[..2]).join(&hex);
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();

    let before = held(&c);
    let live_bytes: u64 = live.values().map(|v| v.len() as u64).sum();
    tokio::time::sleep(GRACE + Duration::from_millis(200)).await;
    let started = Instant::now();
    // The collection as `admin gc --wait` runs it, then the sweeps.
    let admin: AdminConfig = lumbung::config::load(&c.dir.join("admin.toml")).unwrap();
    let report = lumbung::admin::gc::collect(&admin, true).await.unwrap();
    print!("admin gc --wait: {}", lumbung::admin::gc::render(&report));
    for n in nodes(&c) {
        n.objects.gc.sweep(&n.objects.chunks).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = held(&c);
        if now.iter().all(|b| *b <= live_bytes * 105 / 100) {
            println!(
                "chunk bytes per node {before:?} -> {now:?} (live {live_bytes}) in {:?}",
                started.elapsed()
            );
            assert!(!path.exists(), "the orphan file is still there");
            // What the report says it freed is what went, the orphan aside.
            let gone = before.iter().sum::<u64>() - now.iter().sum::<u64>() - MIB as u64;
            let told = report.disk_bytes;
            assert!(
                told.abs_diff(gone) <= gone / 100,
                "the report says {told} bytes freed, {gone} went"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "chunk bytes per node {now:?}, live {live_bytes}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // `admin status` shows the collection, the sweep and the disk by kind.
    let view = lumbung::admin::status::collect(&admin).await.unwrap();
    let ran = view
        .nodes
        .iter()
        .find_map(|n| n.last_gc.as_ref())
        .expect("a collection shown");
    assert_eq!(ran.disk_bytes_freed, report.disk_bytes);
    let n1 = view.nodes.iter().find(|n| n.node_id == 1).unwrap();
    assert_eq!((n1.swept_files, n1.swept_bytes), (1, MIB as u64));
    assert!(view
        .nodes
        .iter()
        .all(|n| n.raft_log_bytes > 0 && n.state_bytes > 0));
    let text = lumbung::admin::status::render(&view);
    assert!(text.contains("last garbage collection: by node"), "{text}");
    for (key, data) in &live {
        let got = s3
            .get_object()
            .bucket("demo")
            .key(*key)
            .send()
            .await
            .unwrap();
        let got = got.body.collect().await.unwrap().into_bytes();
        assert!(got == data[..], "{key} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_spanning_collections_keeps_its_chunks_or_fails_whole() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path()).await;
    let s3 = common::s3(&c.env);
    let n1 = nodes(&c)[0];
    let keys = n1.objects.tenant_keys("demo", None).await.unwrap();

    // 13 MiB over about 6.5 s (three grace periods), collections every
    // 300 ms meanwhile.
    let collecting = std::sync::atomic::AtomicBool::new(true);
    let collections = async {
        let mut runs = 0;
        while collecting.load(std::sync::atomic::Ordering::Relaxed) {
            collect(&c).await;
            runs += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        runs
    };
    let write = async {
        let body = slow_body(1, 13, Duration::from_millis(500));
        let data = n1
            .objects
            .ingest(body, keys.clone(), false, async { Ok(()) })
            .await
            .unwrap();
        let done = n1.objects.commit(target("slow"), &keys, data).await;
        collecting.store(false, std::sync::atomic::Ordering::Relaxed);
        done
    };
    let (written, runs) = tokio::join!(write, collections);
    written.unwrap();
    println!("a 13 MiB PUT over 6.5 s committed across {runs} collections");
    for _ in 0..2 {
        tokio::time::sleep(GRACE).await;
        collect(&c).await;
    }
    assert_reads_back(&s3, "demo", "slow", 1, 13 * MIB).await;

    // A coordinator that stalls past the grace after storing its chunks
    // while a collection runs: its commit is refused, nothing half-stored.
    let data = n1
        .objects
        .ingest(
            slow_body(2, 9, Duration::ZERO),
            keys.clone(),
            false,
            async { Ok(()) },
        )
        .await
        .unwrap();
    tokio::time::sleep(GRACE + Duration::from_millis(500)).await;
    collect(&c).await;
    let refused = n1
        .objects
        .commit(target("stalled"), &keys, data)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("chunks were collected"),
        "{refused}"
    );
    let err = s3
        .head_object()
        .bucket("demo")
        .key("stalled")
        .send()
        .await
        .unwrap_err();
    assert_eq!(common::status(&err), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_counts_toward_the_quota_until_collected() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path()).await;
    let admin: AdminConfig = lumbung::config::load(&c.dir.join("admin.toml")).unwrap();
    use lumbung::admin::tenants::{self, QuotaSpec};
    let quota = QuotaSpec {
        bytes: Some(12 * MIB as u64),
        objects: None,
    };
    tenants::create_tenant(&admin, "q", quota).await.unwrap();
    let key = tenants::create_key(&admin, "q").await.unwrap();
    let s3 = common::s3_with(&c.env, &key.access_key, &key.secret_key);
    s3.create_bucket()
        .bucket("quota-bucket")
        .send()
        .await
        .unwrap();
    let put = |seed| {
        s3.put_object()
            .bucket("quota-bucket")
            .key("k")
            .body(ByteStream::from(bytes(seed, 5 * MIB)))
            .send()
    };
    put(1).await.unwrap();
    put(2).await.unwrap();
    // 5 MiB live and 5 MiB awaiting collection: another 5 MiB is over.
    let shown = tenants::show_tenant(&admin, "q").await.unwrap();
    assert_eq!(
        (shown.used_bytes, shown.garbage_bytes),
        (5 * MIB as u64, 5 * MIB as u64)
    );
    assert_eq!(
        shown.stored_bytes,
        30 * MIB as u64,
        "(live + garbage) x RF 3"
    );
    let refused = put(3).await.unwrap_err();
    assert_eq!(common::code(&refused), "QuotaExceeded");
    let message = refused
        .as_service_error()
        .unwrap()
        .meta()
        .message()
        .unwrap()
        .to_string();
    assert!(message.contains("awaiting garbage collection"), "{message}");

    // Collected (past the grace and the 10 s window garbage is dated by),
    // the room is back.
    tokio::time::sleep(Duration::from_secs(10) + GRACE).await;
    lumbung::admin::gc::collect(&admin, true).await.unwrap();
    let shown = tenants::show_tenant(&admin, "q").await.unwrap();
    assert_eq!(shown.garbage_bytes, 0);
    put(3).await.unwrap();
    assert_reads_back(&s3, "quota-bucket", "k", 3, 5 * MIB).await;
}
