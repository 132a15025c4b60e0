//! Tenants and access keys from the admin side, and what a tenant can see.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use common::{code, s3, s3_with};
use lumbung::admin::tenants;
use lumbung::config::{self, AdminConfig};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_own_their_names_and_revoked_keys_stop_working() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = common::cluster(dir.path(), 8).await;
    let admin: AdminConfig = config::load(&cluster.dir.join("admin.toml")).unwrap();

    // Bad input is refused and changes nothing.
    assert!(
        tenants::create_tenant(&admin, "Not Valid", Default::default())
            .await
            .is_err()
    );
    assert!(
        tenants::create_tenant(&admin, "demo", Default::default())
            .await
            .is_err(),
        "demo exists"
    );
    assert!(tenants::create_key(&admin, "nobody").await.is_err());
    assert!(tenants::revoke_key(&admin, "LKNOSUCHKEY").await.is_err());
    let names: Vec<_> = tenants::list_tenants(&admin)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["demo"]);

    tenants::create_tenant(&admin, "acme", Default::default())
        .await
        .unwrap();
    let key = tenants::create_key(&admin, "acme").await.unwrap();
    let listed = tenants::list_keys(&admin, "acme").await.unwrap();
    assert_eq!(listed, std::slice::from_ref(&key.access_key));
    let acme = s3_with(&cluster.env, &key.access_key, &key.secret_key);
    let demo = s3(&cluster.env);

    // Both may own a bucket called "backups"; each sees only its own.
    demo.create_bucket().bucket("backups").send().await.unwrap();
    acme.create_bucket().bucket("backups").send().await.unwrap();
    demo.put_object()
        .bucket("backups")
        .key("ledger")
        .body(ByteStream::from_static(b"demo's"))
        .send()
        .await
        .unwrap();
    let acme_sees = acme
        .list_objects_v2()
        .bucket("backups")
        .send()
        .await
        .unwrap();
    assert_eq!(acme_sees.key_count(), Some(0));
    let err = acme
        .get_object()
        .bucket("backups")
        .key("ledger")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&err), "NoSuchKey");
    let err = acme
        .get_object()
        .bucket("demo")
        .key("anything")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        code(&err),
        "NoSuchBucket",
        "another tenant's bucket looks missing"
    );
    // Copies and multipart uploads across tenants fail like a missing
    // bucket, both ways round, and change nothing of demo's.
    let err = acme
        .copy_object()
        .bucket("backups")
        .key("stolen")
        .copy_source("demo/anything")
        .send()
        .await
        .unwrap_err();
    // A source the tenant cannot see answers as a missing one would.
    assert!(
        ["NoSuchBucket", "NoSuchKey"].contains(&code(&err).as_str()),
        "{err:?}"
    );
    let err = acme
        .copy_object()
        .bucket("demo")
        .key("planted")
        .copy_source("backups/ledger")
        .send()
        .await
        .unwrap_err();
    // acme's own `backups` has no `ledger`; demo's `demo` is not acme's.
    assert!(
        ["NoSuchBucket", "NoSuchKey"].contains(&code(&err).as_str()),
        "{err:?}"
    );
    let err = acme
        .create_multipart_upload()
        .bucket("demo")
        .key("planted")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&err), "NoSuchBucket");
    let demo_upload = demo
        .create_multipart_upload()
        .bucket("demo")
        .key("mine")
        .send()
        .await
        .unwrap();
    let err = acme
        .upload_part()
        .bucket("demo")
        .key("mine")
        .upload_id(demo_upload.upload_id().unwrap())
        .part_number(1)
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&err), "NoSuchBucket");
    let err = acme
        .list_multipart_uploads()
        .bucket("demo")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&err), "NoSuchBucket");
    let err = acme
        .delete_object()
        .bucket("demo")
        .key("mine")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&err), "NoSuchBucket");
    let uploads = demo
        .list_multipart_uploads()
        .bucket("demo")
        .send()
        .await
        .unwrap();
    assert_eq!(uploads.uploads().len(), 1, "demo's upload is untouched");
    let ledger = demo
        .get_object()
        .bucket("backups")
        .key("ledger")
        .send()
        .await
        .unwrap();
    let body = ledger.body.collect().await.unwrap().into_bytes();
    assert_eq!(body.as_ref(), b"demo's");

    let acme_buckets: Vec<_> = acme
        .list_buckets()
        .send()
        .await
        .unwrap()
        .buckets()
        .iter()
        .filter_map(|b| b.name().map(str::to_string))
        .collect();
    assert_eq!(acme_buckets, ["backups"]);

    // A revoked key stops working within seconds.
    tenants::revoke_key(&admin, &key.access_key).await.unwrap();
    let revoked = Instant::now();
    loop {
        match acme.list_buckets().send().await {
            Err(e) if code(&e) == "InvalidAccessKeyId" => break,
            _ => {
                assert!(
                    revoked.elapsed() < Duration::from_secs(10),
                    "revoked key still works"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    println!("revoked key refused after {:?}", revoked.elapsed());
    cluster.stop().await;
}
