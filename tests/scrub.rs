//! Scrub finds what went bad on a disk and repairs it from good replicas.
//! An in-process cluster; on node 2, bytes are flipped in 3 chunk files
//! and 2 are deleted:
//!   1. `admin scrub --wait` finds all 5 (3 corrupt, 2 missing) and
//!      repairs them: the files are back, verified, and no `.corrupt` copy
//!      is left;
//!   2. two more files are corrupted and read through node 2: the reads
//!      return the right bytes (from another replica) and the chunks are
//!      repaired at once, without a scrub.
//!
//! Every object then reads back byte for byte.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use common::{assert_reads_back, bytes};
use lumbung::config::AdminConfig;
use lumbung::types::ChunkId;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;
const OBJECTS: u64 = 6;

/// The chunk files in a node's chunk folder.
fn chunk_files(chunks: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chunks)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .collect();
    files.sort();
    files
}

fn id_of(path: &Path) -> ChunkId {
    let name = path.file_name().unwrap().to_str().unwrap();
    ChunkId::from_slice(&hex::decode(name).unwrap()).unwrap()
}

/// Flips one byte in the middle of a file.
fn corrupt(path: &Path) {
    let mut data = std::fs::read(path).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0x55;
    std::fs::write(path, data).unwrap();
}

/// True once every file in `paths` is back and hashes to its name, and
/// no corrupt copy is left beside it.
fn repaired(paths: &[PathBuf]) -> bool {
    paths.iter().all(|p| {
        std::fs::read(p).is_ok_and(|d| ChunkId::of(&d) == id_of(p))
            && !p.with_extension("corrupt").exists()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_finds_and_repairs_corrupt_and_missing_chunks() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let c = common::cluster(tmp.path(), 8).await;
    let admin: AdminConfig = lumbung::config::load(&c.dir.join("admin.toml")).unwrap();
    let s3 = common::s3(&c.env);
    for i in 0..OBJECTS {
        s3.put_object()
            .bucket("demo")
            .key(format!("o{i}"))
            .body(ByteStream::from(bytes(i, 5 * MIB)))
            .send()
            .await
            .unwrap();
    }
    let node2 = c.dir.join("data/node2/chunks");
    // Every node holds every chunk (RF 3 on 3 nodes); wait for node 2's.
    let started = Instant::now();
    while chunk_files(&node2).len() < 2 * OBJECTS as usize {
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let files = chunk_files(&node2);

    // 1. Three corrupt, two gone; one scrub finds and repairs them all.
    let bad: Vec<PathBuf> = files[..5].to_vec();
    for p in &bad[..3] {
        corrupt(p);
    }
    for p in &bad[3..] {
        std::fs::remove_file(p).unwrap();
    }
    let passes = lumbung::admin::scrub::scrub(&admin, None, true)
        .await
        .unwrap();
    print!("{}", lumbung::admin::scrub::render(&passes, true));
    let (_, pass) = passes.iter().find(|(id, _)| *id == 2).unwrap();
    assert_eq!(
        (pass.corrupt, pass.missing, pass.repaired),
        (3, 2, 5),
        "{pass:?}"
    );
    assert_eq!(pass.files_checked, files.len() as u64 - 2);
    for (id, other) in &passes {
        if *id != 2 {
            assert_eq!(
                (other.corrupt, other.missing),
                (0, 0),
                "node {id}: {other:?}"
            );
        }
    }
    assert!(repaired(&bad), "not every bad chunk was repaired");
    let view = lumbung::admin::status::collect(&admin).await.unwrap();
    let shown = view.nodes.iter().find(|n| n.node_id == 2).unwrap();
    assert_eq!(shown.scrub.as_ref().unwrap().repaired, 5);

    // 2. Corrupt copies met by reads are repaired at once.
    let more: Vec<PathBuf> = files[5..7].to_vec();
    for p in &more {
        corrupt(p);
    }
    let reader = c.nodes[1].as_ref().unwrap();
    for p in &more {
        let data = reader.objects.chunks.fetch(id_of(p)).await.unwrap();
        assert_eq!(
            ChunkId::of(&data),
            id_of(p),
            "a read returned bytes that fail their hash"
        );
    }
    let started = Instant::now();
    while !repaired(&more) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "chunks found corrupt by reads were not repaired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "chunks found corrupt by reads repaired in {:?}",
        started.elapsed()
    );

    for i in 0..OBJECTS {
        assert_reads_back(&s3, "demo", &format!("o{i}"), i, 5 * MIB).await;
    }
}
