//! Key lifecycle: master key rotation under load, tenant key rotation, and
//! tenant deletion that leaves nothing in the cluster able to decrypt.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use common::{code, s3, s3_with};
use lumbung::admin::tenants;
use lumbung::config::{self, AdminConfig};
use lumbung::crypto::master::MasterKeys;
use lumbung::crypto::tenant_keys::unwrap_dek;
use lumbung::crypto::{self as crypto, Purpose};
use lumbung::shard::{Query, Value};
use lumbung::types::ShardId;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn chunk_files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for entry in walk(dir) {
        if entry.components().any(|c| c.as_os_str() == "chunks")
            && entry.file_name().is_some_and(|n| n.len() == 64)
        {
            out.insert(entry);
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn master_files(dir: &Path) -> Vec<PathBuf> {
    (1..=3)
        .map(|id| dir.join(format!("node{id}.master.key")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn master_rotation_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = common::cluster(dir.path(), 8).await;
    let admin: AdminConfig = config::load(&cluster.dir.join("admin.toml")).unwrap();
    let c = s3(&cluster.env);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w/{i}");
                let body = common::bytes(i, if i.is_multiple_of(5) { 300_000 } else { 2_000 });
                c.put_object()
                    .bucket("demo")
                    .key(&key)
                    .body(ByteStream::from(body.clone()))
                    .send()
                    .await
                    .expect("no write fails during a rotation");
                c.get_object()
                    .bucket("demo")
                    .key(&key)
                    .send()
                    .await
                    .expect("no read fails during a rotation");
                written.push((key, body));
                i += 1;
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    for expected in [2, 3] {
        let r = tenants::rotate_master_key(&admin).await.unwrap();
        assert_eq!(r.generation, expected);
        assert!(r.rewrapped >= 1, "the demo tenant's DEK was rewrapped");
        for path in master_files(&cluster.dir) {
            let keys = MasterKeys::load(&path).unwrap();
            assert_eq!(keys.generations(), vec![expected], "old keys destroyed");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written.len() > 10, "the writer ran throughout");
    for (key, body) in &written {
        let got = c.get_object().bucket("demo").key(key).send().await.unwrap();
        let data = got.body.collect().await.unwrap().into_bytes();
        assert!(data.as_ref() == body.as_slice(), "{key} changed");
    }
    eprintln!(
        "{} objects written and read during two rotations",
        written.len()
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_key_rotation_keeps_old_objects_readable() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = common::cluster(dir.path(), 8).await;
    let admin: AdminConfig = config::load(&cluster.dir.join("admin.toml")).unwrap();
    let c = s3(&cluster.env);
    let old = common::bytes(1, 5 * 1024 * 1024);
    c.put_object()
        .bucket("demo")
        .key("old")
        .body(ByteStream::from(old.clone()))
        .send()
        .await
        .unwrap();
    let t = tenants::rotate_tenant_key(&admin, "demo").await.unwrap();
    assert_eq!(t.key_generation, 2);
    let new = common::bytes(2, 5 * 1024 * 1024);
    c.put_object()
        .bucket("demo")
        .key("new")
        .body(ByteStream::from(new.clone()))
        .send()
        .await
        .unwrap();
    for (key, body) in [("old", &old), ("new", &new)] {
        let got = c.get_object().bucket("demo").key(key).send().await.unwrap();
        let data = got.body.collect().await.unwrap().into_bytes();
        assert!(data.as_ref() == body.as_slice(), "{key} changed");
    }
    assert!(tenants::rotate_tenant_key(&admin, "nobody").await.is_err());
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_tenant_leaves_no_key_that_opens_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = common::cluster(dir.path(), 8).await;
    let admin: AdminConfig = config::load(&cluster.dir.join("admin.toml")).unwrap();
    let node = cluster.nodes[0].as_ref().unwrap();
    tenants::create_tenant(&admin, "gone", Default::default())
        .await
        .unwrap();
    let key = tenants::create_key(&admin, "gone").await.unwrap();
    let c = s3_with(&cluster.env, &key.access_key, &key.secret_key);
    c.create_bucket().bucket("vault").send().await.unwrap();
    let before = chunk_files(&cluster.dir);
    c.put_object()
        .bucket("vault")
        .key("secret")
        .body(ByteStream::from(common::bytes(9, 9 * 1024 * 1024)))
        .send()
        .await
        .unwrap();
    let chunks: Vec<Vec<u8>> = chunk_files(&cluster.dir)
        .difference(&before)
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "three chunks on three replicas at least");
    let wrapped = node.objects.tenant("gone").await.unwrap().deks;

    // Bad input changes nothing.
    assert!(tenants::delete_tenant(&admin, "nobody").await.is_err());
    let d = tenants::delete_tenant(&admin, "gone").await.unwrap();
    assert_eq!(d.buckets, 1);
    assert_eq!(d.shred_error, "", "the old master key was destroyed");

    // Its keys, buckets and usage are gone.
    assert!(tenants::show_tenant(&admin, "gone").await.is_err());
    assert!(tenants::list_keys(&admin, "gone").await.unwrap().is_empty());
    let names: Vec<_> = tenants::list_tenants(&admin)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["demo"]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let refused = c.list_buckets().send().await.unwrap_err();
    assert_eq!(code(&refused), "InvalidAccessKeyId");

    // No master key left on any node unwraps its DEKs ...
    for path in master_files(&cluster.dir) {
        let master = MasterKeys::load(&path).unwrap();
        for w in &wrapped {
            assert!(unwrap_dek(&master, "gone", w).is_err());
        }
    }
    // ... and no DEK left in the cluster opens its chunks.
    let records = match node
        .host
        .query(ShardId::META, &Query::Tenants)
        .await
        .unwrap()
    {
        Value::Tenants(t) => t,
        v => panic!("{v:?}"),
    };
    let mut tried = 0;
    for (tenant, record) in &records {
        for w in &record.deks {
            let dek = unwrap_dek(&node.objects.keys.master, tenant, w).unwrap();
            for chunk in &chunks {
                assert!(crypto::open(&dek, Purpose::Chunk, b"gone", chunk).is_err());
                tried += 1;
            }
        }
    }
    assert!(tried > 0);

    // Its index is collected, then the name is free again, and empty.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node.host.query(ShardId::META, &Query::Tombstones).await {
            Ok(Value::Tombstones(t)) if t.is_empty() => break,
            _ => assert!(Instant::now() < deadline, "never collected"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(node.objects.head_bucket("gone", "vault").await.is_err());
    tenants::create_tenant(&admin, "gone", Default::default())
        .await
        .unwrap();
    let again = tenants::show_tenant(&admin, "gone").await.unwrap();
    assert_eq!((again.buckets, again.used_bytes), (0, 0));
    cluster.stop().await;
}
