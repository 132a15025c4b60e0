//! Encryption at rest, seen from the disk: nothing a tenant stores, neither
//! content nor `x-amz-meta-*`, may appear in any file of any node.
//!
//! The story: a cluster whose shards snapshot every 50 entries loses
//! node 3. While it is down, objects carrying a long unique marker go in
//! every way S3 allows (inline, chunked, multipart, an upload left
//! unfinished, a copy with new metadata), with the marker also in user
//! metadata. Node 3 comes back and catches up by snapshot (a snapshot
//! file holds the state store's pairs as stored, and is deleted once
//! installed, so the state store's search covers it). Every object reads
//! back intact; then, with the cluster stopped and every file flushed, no
//! file under the cluster's folder holds the marker or its first 64 bytes.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use lumbung::admin::init_cluster;
use lumbung::config::NodeConfig;
use lumbung::types::ShardId;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// A body made of the marker over and over, so every chunk holds it.
fn marked(marker: &[u8], len: usize) -> Vec<u8> {
    marker.iter().copied().cycle().take(len).collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A shard whose leader has purged log entries that node 3 never
/// received, and the last entry purged.
fn node3_needs_a_snapshot(cluster: &lumbung::dev::DevCluster) -> Option<(ShardId, u64)> {
    let shards = 8;
    cluster.nodes.iter().flatten().find_map(|node| {
        (0..shards).find_map(|s| {
            let raft = node.host.raft(ShardId(s))?;
            let m = raft.metrics().borrow().clone();
            let (purged, replication) = (m.purged?, m.replication?);
            let matched = replication.get(&3).cloned().flatten();
            matched
                .is_none_or(|l| l.index < purged.index)
                .then_some((ShardId(s), purged.index))
        })
    })
}

/// How far node 3 has applied `shard`.
fn node3_applied(cluster: &lumbung::dev::DevCluster, shard: ShardId) -> u64 {
    let node3 = cluster.nodes[2].as_ref().expect("node 3 runs");
    let raft = node3.host.raft(shard).expect("node 3 holds the shard");
    let applied = raft.metrics().borrow().last_applied;
    applied.map_or(0, |l| l.index)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Writes a cluster whose shards snapshot (and purge their logs) often.
fn init_snapshotting_cluster(dir: &Path, base_port: u16) {
    init_cluster(&common::init_options(dir, base_port, 8)).unwrap();
    for id in 1..=3 {
        let path = dir.join(format!("node{id}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let mut cfg: NodeConfig = toml::from_str(&text).unwrap();
        cfg.raft.snapshot_every = 50;
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_plaintext_of_content_or_metadata_reaches_any_disk() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    init_snapshotting_cluster(&dir, common::free_ports(4));
    let opts = lumbung::dev::DevOptions::new(dir.clone(), 0);
    let mut cluster = lumbung::dev::start(&opts).await.unwrap();
    let c = common::s3(&cluster.env);
    let marker = format!(
        "plaintext-marker-{}-must-never-reach-a-disk-{}",
        hex::encode(rand::random::<[u8; 24]>()),
        hex::encode(rand::random::<[u8; 24]>())
    );
    let marker = marker.as_bytes();
    assert!(marker.len() > 128);
    let meta = String::from_utf8(marker.to_vec()).unwrap();

    cluster.stop_node(3).await;
    let inline = marked(marker, 10_000);
    let chunked = marked(marker, 9 * MIB + 17);
    c.put_object()
        .bucket("demo")
        .key("inline")
        .metadata("note", &meta)
        .body(ByteStream::from(inline.clone()))
        .send()
        .await
        .unwrap();
    c.put_object()
        .bucket("demo")
        .key("chunked")
        .content_type("text/plain")
        .metadata("note", &meta)
        .body(ByteStream::from(chunked.clone()))
        .send()
        .await
        .unwrap();
    c.copy_object()
        .bucket("demo")
        .key("copied")
        .copy_source("demo/inline")
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
        .metadata("copied-note", &meta)
        .send()
        .await
        .unwrap();
    let part = marked(marker, 5 * MIB);
    let mut done = Vec::new();
    let up = c
        .create_multipart_upload()
        .bucket("demo")
        .key("multipart")
        .metadata("note", &meta)
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap();
    for n in 1..=2 {
        let r = c
            .upload_part()
            .bucket("demo")
            .key("multipart")
            .upload_id(id)
            .part_number(n)
            .body(ByteStream::from(part.clone()))
            .send()
            .await
            .unwrap();
        done.push(
            CompletedPart::builder()
                .part_number(n)
                .e_tag(r.e_tag().unwrap())
                .build(),
        );
    }
    c.complete_multipart_upload()
        .bucket("demo")
        .key("multipart")
        .upload_id(id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let unfinished = c
        .create_multipart_upload()
        .bucket("demo")
        .key("unfinished")
        .metadata("note", &meta)
        .send()
        .await
        .unwrap();
    c.upload_part()
        .bucket("demo")
        .key("unfinished")
        .upload_id(unfinished.upload_id().unwrap())
        .part_number(1)
        .body(ByteStream::from(marked(marker, 100_000)))
        .send()
        .await
        .unwrap();
    // Enough writes to the bucket's shard that its log is purged behind a
    // snapshot, so node 3 must catch up from a snapshot file.
    for i in 0..80 {
        c.put_object()
            .bucket("demo")
            .key(format!("small/{i}"))
            .metadata("note", &meta)
            .body(ByteStream::from(marked(marker, 300 + i)))
            .send()
            .await
            .unwrap();
    }
    // openraft purges a log only when no replication is using it, and the
    // retries towards the stopped node 3 can hold it for a while. Keep
    // writing until some shard has purged entries node 3 lacks, so it can
    // only catch up from a snapshot.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut extra = 0;
    let (shard, purged) = loop {
        if let Some(needed) = node3_needs_a_snapshot(&cluster) {
            break needed;
        }
        assert!(
            Instant::now() < deadline,
            "no shard purged its log behind node 3 in 60 s"
        );
        c.put_object()
            .bucket("demo")
            .key(format!("extra/{extra}"))
            .body(ByteStream::from(marked(marker, 200)))
            .send()
            .await
            .unwrap();
        extra += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.restart_node(3).await.unwrap();
    // Past what the leader purged, only a snapshot could bring it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while node3_applied(&cluster, shard) < purged {
        assert!(
            Instant::now() < deadline,
            "node 3 never installed a snapshot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Everything reads back as written, metadata included.
    for (key, body) in [("inline", &inline), ("chunked", &chunked)] {
        let got = c.get_object().bucket("demo").key(key).send().await.unwrap();
        assert_eq!(got.metadata().unwrap()["note"], meta);
        let data = got.body.collect().await.unwrap().into_bytes();
        assert!(data.as_ref() == body.as_slice(), "{key} changed");
    }
    let copied = c
        .head_object()
        .bucket("demo")
        .key("copied")
        .send()
        .await
        .unwrap();
    assert_eq!(copied.metadata().unwrap()["copied-note"], meta);
    let multipart = c
        .get_object()
        .bucket("demo")
        .key("multipart")
        .send()
        .await
        .unwrap();
    assert_eq!(multipart.metadata().unwrap()["note"], meta);
    let data = multipart.body.collect().await.unwrap().into_bytes();
    assert!(data.as_ref() == [part.clone(), part].concat().as_slice());

    cluster.stop().await;
    // A control: the search must find the marker where it is.
    let control = tmp.path().join("control");
    std::fs::write(&control, marked(marker, 1000)).unwrap();
    assert!(contains(&std::fs::read(&control).unwrap(), &marker[..64]));
    let files = files_under(&dir);
    let mut searched = 0u64;
    for path in &files {
        // A file listed a moment ago may be gone: a stopped node's last
        // handles (sled's flusher, a snapshot task) can still be retiring
        // temporary files. What is gone holds nothing.
        let data = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("vanished while searching: {}", path.display());
                continue;
            }
            r => r.unwrap(),
        };
        searched += data.len() as u64;
        // The first 64 bytes: any longer piece of the marker contains them.
        assert!(
            !contains(&data, &marker[..64]),
            "plaintext found in {}",
            path.display()
        );
    }
    assert!(
        searched > 20 * MIB as u64,
        "the data itself was searched ({searched} bytes in {} files)",
        files.len()
    );
    eprintln!(
        "searched {searched} bytes in {} files: no plaintext",
        files.len()
    );
}
