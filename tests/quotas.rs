//! Quotas: concurrent writers against a small quota, the documented bound
//! on overshoot, and room freed by deletes once garbage collection took
//! what they freed.
//!
//! The bound (README, "Quotas"): writes to one bucket are checked
//! atomically by its index shard and never overshoot; writes to several
//! buckets of one tenant may overshoot by at most what the writers of the
//! *other* buckets had in flight when the limit was reached.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use common::{code, s3_with, status};
use lumbung::admin::tenants::{self, QuotaSpec};
use lumbung::config::{self, AdminConfig};

const OBJECT: usize = 100 * 1024;
const WRITERS: usize = 6;

/// Puts objects from `WRITERS` tasks, spread over `buckets`, until every
/// writer has been refused; returns how many were stored.
async fn fill(c: &aws_sdk_s3::Client, buckets: &[&str], tag: &str) -> usize {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let c = c.clone();
        let bucket = buckets[w % buckets.len()].to_string();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut stored = 0;
            for i in 0.. {
                let r = c
                    .put_object()
                    .bucket(&bucket)
                    .key(format!("{tag}/{w}/{i}"))
                    .body(ByteStream::from(common::bytes(i, OBJECT)))
                    .send()
                    .await;
                match r {
                    Ok(_) => stored += 1,
                    Err(e) => {
                        assert_eq!(code(&e), "QuotaExceeded", "{e:?}");
                        assert_eq!(status(&e), 403);
                        return stored;
                    }
                }
            }
            unreachable!()
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_stay_within_the_documented_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = common::cluster_collecting(dir.path(), 8, 1).await;
    let admin: AdminConfig = config::load(&cluster.dir.join("admin.toml")).unwrap();
    let quota_bytes = 20 * OBJECT as u64 + OBJECT as u64 / 2;
    tenants::create_tenant(
        &admin,
        "small",
        QuotaSpec {
            bytes: Some(quota_bytes),
            objects: None,
        },
    )
    .await
    .unwrap();
    let key = tenants::create_key(&admin, "small").await.unwrap();
    let c = s3_with(&cluster.env, &key.access_key, &key.secret_key);
    for b in ["one", "two", "three"] {
        c.create_bucket().bucket(b).send().await.unwrap();
    }

    // One bucket: checked atomically, so exactly as many as fit.
    let stored = fill(&c, &["one"], "a").await;
    let shown = tenants::show_tenant(&admin, "small").await.unwrap();
    assert_eq!(
        stored, 20,
        "20 objects of {OBJECT} bytes fit in {quota_bytes}"
    );
    assert_eq!(shown.used_bytes, 20 * OBJECT as u64);
    assert_eq!(shown.used_objects, 20);

    // The refusal names the limit.
    let refused = c
        .put_object()
        .bucket("one")
        .key("over")
        .body(ByteStream::from(vec![0u8; OBJECT]))
        .send()
        .await
        .unwrap_err();
    let message = refused
        .as_service_error()
        .unwrap()
        .meta()
        .message()
        .unwrap()
        .to_string();
    assert!(message.contains(&quota_bytes.to_string()), "{message}");

    // Deleting frees room; the room is then raced for from three buckets.
    for w in 0..WRITERS {
        let listed = c
            .list_objects_v2()
            .bucket("one")
            .prefix(format!("a/{w}/"))
            .send()
            .await
            .unwrap();
        for o in listed.contents() {
            c.delete_object()
                .bucket("one")
                .key(o.key().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    let emptied = tenants::show_tenant(&admin, "small").await.unwrap();
    assert_eq!((emptied.used_bytes, emptied.used_objects), (0, 0));
    // What the deletes freed counts until a collection takes it: past the
    // grace and the 10 s window it is dated by.
    assert!(emptied.garbage_bytes >= 20 * OBJECT as u64, "{emptied:?}");
    let refused = c
        .put_object()
        .bucket("one")
        .key("while-garbage-counts")
        .body(ByteStream::from(vec![7u8; OBJECT]))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&refused), "QuotaExceeded");
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    lumbung::admin::gc::collect(&admin, true).await.unwrap();
    let collected = tenants::show_tenant(&admin, "small").await.unwrap();
    assert_eq!(collected.garbage_bytes, 0, "{collected:?}");
    let stored = fill(&c, &["one", "two", "three"], "b").await as u64;
    let shown = tenants::show_tenant(&admin, "small").await.unwrap();
    let bound = quota_bytes + (WRITERS as u64 - WRITERS as u64 / 3) * OBJECT as u64;
    eprintln!(
        "three buckets: {stored} objects, {} bytes stored of a {quota_bytes}-byte quota (bound {bound})",
        shown.used_bytes
    );
    assert_eq!(
        shown.used_bytes,
        stored * OBJECT as u64,
        "usage is the sum of sizes"
    );
    assert!(shown.used_bytes <= bound);
    assert!(stored >= 20, "the quota was reached, not missed");

    // An object-count limit, set while the tenant is full of bytes: lifting
    // the byte limit lets writes through until the count is reached.
    let limit = stored + 2;
    tenants::set_quota(
        &admin,
        "small",
        QuotaSpec {
            bytes: None,
            objects: Some(limit),
        },
    )
    .await
    .unwrap();
    // Other nodes see a new quota within the 5 s their key caches live.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    for i in 0..2 {
        c.put_object()
            .bucket("two")
            .key(format!("count/{i}"))
            .body(ByteStream::from_static(b"x"))
            .send()
            .await
            .unwrap();
    }
    let refused = c
        .put_object()
        .bucket("three")
        .key("count/over")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&refused), "QuotaExceeded");
    // Replacing an existing object adds no object, so it is allowed.
    c.put_object()
        .bucket("two")
        .key("count/0")
        .body(ByteStream::from_static(b"y"))
        .send()
        .await
        .unwrap();

    // A multipart part over the byte quota is refused before it is stored.
    tenants::set_quota(
        &admin,
        "small",
        QuotaSpec {
            bytes: Some(quota_bytes),
            objects: None,
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let up = c
        .create_multipart_upload()
        .bucket("one")
        .key("big")
        .send()
        .await
        .unwrap();
    let part = c
        .upload_part()
        .bucket("one")
        .key("big")
        .upload_id(up.upload_id().unwrap())
        .part_number(1)
        .body(ByteStream::from(vec![7u8; 5 * 1024 * 1024]))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&part), "QuotaExceeded");
    let after = tenants::show_tenant(&admin, "small").await.unwrap();
    assert_eq!(
        after.used_bytes,
        shown.used_bytes + 2,
        "nothing of the part counted"
    );
}
