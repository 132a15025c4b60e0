//! Several gateways serve one cluster, sharing nothing but the cluster:
//! what one writes the other reads, lists and deletes at once, and each
//! reports its own view of the nodes to `admin status`.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use lumbung::config::{AdminConfig, GatewayConfig};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_serve_one_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = common::cluster(tmp.path(), 4).await;
    let dir = tmp.path().join("cluster");
    let mut cfg: GatewayConfig = lumbung::config::load(&dir.join("gateway.toml")).unwrap();
    cfg.listen = format!("127.0.0.1:{}", common::free_ports(1))
        .parse()
        .unwrap();
    let second = lumbung::gateway::start(cfg.clone()).await.unwrap();
    let one = common::s3(&cluster.env);
    let mut env2 = cluster.env.clone();
    env2.endpoint = format!("https://{}", cfg.listen);
    let two = common::s3(&env2);

    for i in 0..20u64 {
        one.put_object()
            .bucket("demo")
            .key(format!("both/{i}"))
            .body(ByteStream::from(common::bytes(i, 10_000)))
            .send()
            .await
            .unwrap();
    }
    let listed = two
        .list_objects_v2()
        .bucket("demo")
        .prefix("both/")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.key_count(), Some(20));
    for i in 0..20u64 {
        let got = two
            .get_object()
            .bucket("demo")
            .key(format!("both/{i}"))
            .send()
            .await
            .unwrap();
        assert!(got.body.collect().await.unwrap().into_bytes() == common::bytes(i, 10_000));
        two.delete_object()
            .bucket("demo")
            .key(format!("both/{i}"))
            .send()
            .await
            .unwrap();
        let err = one
            .head_object()
            .bucket("demo")
            .key(format!("both/{i}"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(
            common::status(&err),
            404,
            "deleted through the other gateway"
        );
    }

    // Each gateway reports its own view; both show up within a few seconds.
    let admin: AdminConfig = lumbung::config::load(&dir.join("admin.toml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = lumbung::admin::status::collect(&admin).await.unwrap();
        let mut names: Vec<&str> = status.gateways.iter().map(|g| g.gateway.as_str()).collect();
        names.dedup();
        if names.len() == 2 {
            assert_eq!(
                status.gateways.len(),
                6,
                "3 nodes as each gateway sees them"
            );
            break;
        }
        assert!(Instant::now() < deadline, "gateways reported: {names:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    second.stop().await;
    cluster.stop().await;
}
