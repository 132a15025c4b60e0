//! The gateway routes like a scheduler: a node made slow (a delaying TCP
//! proxy between it and the gateway; this kernel has no netem) is steered
//! around within seconds and gets its work back once it recovers; a node
//! that dies costs a client at most one retryable failure per request.

mod common;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use lumbung::admin::init_cluster;
use lumbung::config::{AdminConfig, GatewayConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards TCP to `target`, holding every chunk for `delay_ms` first.
async fn delaying_proxy(target: SocketAddr, delay_ms: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            // Without these, Nagle's algorithm adds its own delays.
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pump(ri, wo, delay_ms.clone()));
            tokio::spawn(pump(ro, wi, delay_ms.clone()));
        }
    });
    addr
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One client operation: when it ended, how long it took, how it went.
#[derive(Clone, Copy)]
struct Op {
    at: Instant,
    took: Duration,
    /// 0: first try worked; 1: failed once, retry worked; 2: failed twice.
    failures: u8,
}

/// The p99 latency of the operations that ended in [from, to), if any did.
fn p99(ops: &[Op], from: Instant, to: Instant) -> Option<Duration> {
    let mut l: Vec<Duration> = ops
        .iter()
        .filter(|o| o.at >= from && o.at < to)
        .map(|o| o.took)
        .collect();
    l.sort();
    (!l.is_empty()).then(|| l[(l.len() * 99 / 100).min(l.len() - 1)])
}

/// Writers and readers that retry a failed request once, and record.
fn start_load(
    c: Client,
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<Op>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..8u64)
        .map(|w| {
            let (c, stop, ops) = (c.clone(), stop.clone(), ops.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("route/{w}/{}", i % 50);
                    let body = common::bytes(w * 1000 + i, 4096);
                    let started = Instant::now();
                    let mut failures = 0;
                    loop {
                        let put = c
                            .put_object()
                            .bucket("demo")
                            .key(&key)
                            .body(ByteStream::from(body.clone()))
                            .send()
                            .await;
                        let ok = match put {
                            Ok(_) => match c.get_object().bucket("demo").key(&key).send().await {
                                Ok(o) => o.body.collect().await.unwrap().into_bytes() == body,
                                Err(_) => false,
                            },
                            Err(_) => false,
                        };
                        if ok || failures == 2 {
                            break;
                        }
                        failures += 1;
                        if failures == 2 {
                            break;
                        }
                    }
                    ops.lock().unwrap().push(Op {
                        at: Instant::now(),
                        took: started.elapsed(),
                        failures,
                    });
                    i += 1;
                }
            })
        })
        .collect()
}

fn init(dir: &Path) -> AdminConfig {
    init_cluster(&common::init_options(dir, common::free_ports(4), 8)).unwrap();
    lumbung::config::load(&dir.join("admin.toml")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_nodes_are_steered_around_and_dead_ones_cost_one_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let admin = init(&dir);
    // The gateway reaches node 3 only through the proxy.
    let delay = Arc::new(AtomicU64::new(0));
    let proxy = delaying_proxy(admin.nodes[2], delay.clone()).await;
    let path = dir.join("gateway.toml");
    let mut gw: GatewayConfig = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    gw.nodes[2] = proxy;
    std::fs::write(&path, toml::to_string(&gw).unwrap()).unwrap();
    let mut cluster = lumbung::dev::start(&lumbung::dev::DevOptions::new(dir.clone(), 0))
        .await
        .unwrap();
    let client = Client::from_conf(
        common::s3_config(
            &cluster.env,
            &cluster.env.access_key,
            &cluster.env.secret_key,
        )
        .retry_config(RetryConfig::disabled())
        .build(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(Mutex::new(Vec::new()));
    let workers = start_load(client, stop.clone(), ops.clone());

    // Normal, once the gateway has its routing table.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let normal_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let slow_from = Instant::now();
    let normal = p99(&ops.lock().unwrap(), normal_from, slow_from).expect("operations ran");

    // Node 3 answers the gateway 200 ms late on every chunk, each way.
    delay.store(200, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let recovered_from = Instant::now();
    let (first_second, steered) = {
        let ops = ops.lock().unwrap();
        (
            p99(&ops, slow_from, slow_from + Duration::from_secs(2)),
            p99(&ops, slow_from + Duration::from_secs(7), recovered_from)
                .expect("operations ran while node 3 was slow"),
        )
    };
    let view = cluster.gateway.as_ref().unwrap().node_view();
    let node3 = view.iter().find(|n| n.addr == proxy.to_string()).unwrap();
    println!(
        "p99 normal {normal:?}; node 3 slowed: first 2 s {first_second:?} (None: nothing finished), seconds 7-12 {steered:?}; gateway sees node 3 as {} at {:.0} ms",
        node3.state, node3.latency_ms
    );
    assert_eq!(node3.state, "slow");
    assert!(
        steered <= (normal * 3).max(normal + Duration::from_millis(100)),
        "p99 did not come back: {steered:?} against {normal:?} before"
    );

    // Node 3 recovers and gets work back.
    delay.store(0, Ordering::Relaxed);
    let calls_before = node3.calls;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let view = cluster.gateway.as_ref().unwrap().node_view();
    let node3 = view.iter().find(|n| n.addr == proxy.to_string()).unwrap();
    println!(
        "node 3 recovered: {} at {:.1} ms, {} calls in 8 s",
        node3.state,
        node3.latency_ms,
        node3.calls - calls_before
    );
    assert_eq!(node3.state, "ok");
    // More than the eight probes: real requests went back to it.
    assert!(
        node3.calls - calls_before > 20,
        "{} calls",
        node3.calls - calls_before
    );

    // `admin status` shows what the gateway sees.
    let status = lumbung::admin::status::collect(&admin).await.unwrap();
    assert_eq!(status.gateways.len(), 3, "one row per node");
    assert!(status.gateways.iter().all(|g| g.calls > 0));
    let leads: u32 = status.gateways.iter().map(|g| g.leads).sum();
    assert_eq!(leads, 8, "the gateway knows the leader of every shard");

    // A node dies: each client request fails at most once.
    let killed_at = Instant::now();
    cluster.stop_node(1).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let ops = ops.lock().unwrap().clone();
    let after: Vec<&Op> = ops.iter().filter(|o| o.at >= killed_at).collect();
    let once = after.iter().filter(|o| o.failures == 1).count();
    let twice = after.iter().filter(|o| o.failures == 2).count();
    println!(
        "node 1 stopped: {} requests after, {once} failed once then worked, {twice} failed twice",
        after.len()
    );
    assert!(after.len() > 20, "the load went on");
    assert_eq!(twice, 0);
    let before_kill: Vec<&Op> = ops.iter().filter(|o| o.at < killed_at).collect();
    assert!(
        before_kill.iter().all(|o| o.failures == 0),
        "no failures while every node was up"
    );
    cluster.stop().await;
}
