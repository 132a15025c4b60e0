//! `lumbung dev` restarted on the same data dir keeps data and credentials.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use lumbung::dev::DevOptions;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_dev_cluster_keeps_objects_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevOptions::new(dir.path().join("data"), common::free_ports(4));
    opts.shards = 8;
    let first = lumbung::dev::start(&opts).await.unwrap();
    let env = first.env.clone();
    let data = common::bytes(42, 5 * 1024 * 1024 + 3);
    let c = common::s3(&env);
    c.put_object()
        .bucket("demo")
        .key("kept")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    first.stop().await;

    // The previous process's files may take a moment to be released.
    let mut again = None;
    for _ in 0..50 {
        match lumbung::dev::start(&opts).await {
            Ok(c) => {
                again = Some(c);
                break;
            }
            Err(e) => {
                eprintln!("restart not yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await
            }
        }
    }
    let again = again.expect("dev cluster restarts on the same data dir");
    assert_eq!(again.env.access_key, env.access_key);
    assert_eq!(again.env.secret_key, env.secret_key);
    let got = common::s3(&again.env)
        .get_object()
        .bucket("demo")
        .key("kept")
        .send()
        .await
        .unwrap();
    let body = got.body.collect().await.unwrap().into_bytes();
    assert!(
        body.as_ref() == data.as_slice(),
        "object changed across restart"
    );
    again.stop().await;
}
