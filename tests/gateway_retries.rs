//! Never a 500 for a broken internal connection.
//!
//! The gateway reaches node 3 only through a proxy that resets TCP
//! connections at random: some at once (the gateway's connect or TLS
//! handshake fails), the others after a random number of bytes, so in the
//! middle of calls and of GET streams. Nodes talk to each other directly.
//! With the client's own retries off, every GET, HEAD and listing must
//! succeed (the gateway retries reads and resumes broken GET bodies), and
//! so must every PUT (all under 1 MiB, so the gateway holds them whole)
//! and DELETE: both carry a write id, so the gateway sends them again
//! elsewhere and the node applies them once. Any write may answer 503
//! SlowDown with `Retry-After` (the test counts those as failures of the
//! resend), never 500. Afterwards every write that answered 200 reads back
//! byte for byte, every delete that answered 204 is gone, and a PUT that
//! answered 503 is either absent or whole.
//!
//! TCP resets do not reach tonic as Internal statuses. The h2-level
//! failures of the original report (GOAWAY, RST_STREAM, which tonic turns
//! into Internal) cannot be injected through TLS from outside; their
//! classification and mapping are unit-tested in `rpc::failure` and
//! `s3::errors`.

mod common;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use lumbung::admin::init_cluster;
use lumbung::config::{AdminConfig, GatewayConfig};
use rand::Rng;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long the load runs while the proxy resets connections.
const LOAD: Duration = Duration::from_secs(20);

/// The proxy's switch and what it did.
#[derive(Default)]
struct Chaos {
    on: AtomicBool,
    /// Connections reset as soon as they were accepted.
    at_once: AtomicU64,
    /// Connections reset after carrying more than a TLS handshake.
    mid_stream: AtomicU64,
}

/// Forwards TCP to `target`; while `chaos.on`, resets one connection in
/// four at once and every other after a random 8 to 256 KiB.
async fn resetting_proxy(target: SocketAddr, chaos: Arc<Chaos>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            // Closing with a zero linger sends RST, not FIN.
            let _ = inbound.set_zero_linger();
            if chaos.on.load(Ordering::Relaxed) && rand::thread_rng().gen_ratio(1, 4) {
                chaos.at_once.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            let _ = outbound.set_zero_linger();
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let budget = rand::thread_rng().gen_range(8 << 10..256 << 10);
            tokio::spawn(forward(inbound, outbound, budget, chaos.clone()));
        }
    });
    addr
}

/// Copies both ways until a side closes, or, while chaos is on, until
/// more than `budget` bytes went through; then drops both (RST).
async fn forward(mut a: TcpStream, mut b: TcpStream, budget: u64, chaos: Arc<Chaos>) {
    let (mut from_a, mut from_b) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    let mut carried = 0u64;
    loop {
        let (read, a_to_b) = tokio::select! {
            r = a.read(&mut from_a) => (r, true),
            r = b.read(&mut from_b) => (r, false),
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        carried += n as u64;
        if chaos.on.load(Ordering::Relaxed) && carried > budget {
            if carried > 16 << 10 {
                chaos.mid_stream.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let written = if a_to_b {
            b.write_all(&from_a[..n]).await
        } else {
            a.write_all(&from_b[..n]).await
        };
        if written.is_err() {
            return;
        }
    }
}

fn init(dir: &Path) -> AdminConfig {
    init_cluster(&common::init_options(dir, common::free_ports(4), 8)).unwrap();
    lumbung::config::load(&dir.join("admin.toml")).unwrap()
}

/// An object written before the resets: key, seed, length.
fn preloaded() -> Vec<(String, u64, usize)> {
    let mut objects: Vec<_> = (0..24).map(|i| (format!("small/{i}"), i, 4096)).collect();
    // Over the inline limit: stored as a chunk.
    objects.extend((0..4).map(|i| (format!("mid/{i}"), 100 + i, 300 << 10)));
    // Two chunks: the GET stream has several data frames to break between.
    objects.extend((0..2).map(|i| (format!("large/{i}"), 200 + i, (6 << 20) + 17)));
    objects
}

async fn put(c: &Client, key: &str, seed: u64, len: usize) -> Result<(), String> {
    put_maybe_create_only(c, key, seed, len, false).await
}

/// A PUT, with `If-None-Match: *` when `create_only`: sent again by the
/// gateway after it landed, it must still answer 200, not 412.
async fn put_maybe_create_only(
    c: &Client,
    key: &str,
    seed: u64,
    len: usize,
    create_only: bool,
) -> Result<(), String> {
    c.put_object()
        .bucket("demo")
        .key(key)
        .set_if_none_match(create_only.then(|| "*".to_string()))
        .body(ByteStream::from(common::bytes(seed, len)))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| slow_down_or_violation(&e))
}

/// "503" for a 503 SlowDown with Retry-After; anything else described.
fn slow_down_or_violation<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::fmt::Debug,
{
    let retry_after = e
        .raw_response()
        .and_then(|r| r.headers().get("retry-after"))
        .map(str::to_string);
    match (common::status(e), common::code(e).as_str(), retry_after) {
        (503, "SlowDown", Some(_)) => "503".into(),
        (status, code, retry_after) => {
            format!("{status} {code} (Retry-After {retry_after:?})")
        }
    }
}

/// Every kind of read, in turn, on the preloaded objects; each failure is
/// recorded.
async fn read_one(c: &Client, turn: u64, objects: &[(String, u64, usize)]) -> Result<(), String> {
    let (key, seed, len) = &objects[rand::thread_rng().gen_range(0..objects.len())];
    match turn % 8 {
        0..=2 => {
            let got = c
                .get_object()
                .bucket("demo")
                .key(key)
                .send()
                .await
                .map_err(|e| format!("GET {key}: {}", slow_down_or_violation(&e)))?;
            let body = got
                .body
                .collect()
                .await
                .map_err(|e| format!("GET {key} body: {e}"))?;
            if body.into_bytes() != common::bytes(*seed, *len) {
                return Err(format!("GET {key}: other bytes"));
            }
        }
        3 => {
            let head = c
                .head_object()
                .bucket("demo")
                .key(key)
                .send()
                .await
                .map_err(|e| format!("HEAD {key}: {}", slow_down_or_violation(&e)))?;
            if head.content_length() != Some(*len as i64) {
                return Err(format!("HEAD {key}: length {:?}", head.content_length()));
            }
        }
        4 => {
            let list = c
                .list_objects_v2()
                .bucket("demo")
                .prefix("small/")
                .send()
                .await
                .map_err(|e| format!("LIST v2: {}", slow_down_or_violation(&e)))?;
            if list.contents().len() != 24 {
                return Err(format!("LIST v2: {} keys", list.contents().len()));
            }
        }
        5 => {
            let list = c
                .list_objects()
                .bucket("demo")
                .prefix("mid/")
                .send()
                .await
                .map_err(|e| format!("LIST v1: {}", slow_down_or_violation(&e)))?;
            if list.contents().len() != 4 {
                return Err(format!("LIST v1: {} keys", list.contents().len()));
            }
        }
        6 => {
            c.head_bucket()
                .bucket("demo")
                .send()
                .await
                .map_err(|e| format!("HEAD bucket: {}", slow_down_or_violation(&e)))?;
            c.get_bucket_location()
                .bucket("demo")
                .send()
                .await
                .map_err(|e| format!("location: {}", slow_down_or_violation(&e)))?;
        }
        _ => {
            let buckets = c
                .list_buckets()
                .send()
                .await
                .map_err(|e| format!("LIST buckets: {}", slow_down_or_violation(&e)))?;
            if buckets.buckets().is_empty() {
                return Err("LIST buckets: none".into());
            }
        }
    }
    Ok(())
}

/// What the writers saw.
#[derive(Default)]
struct Writes {
    /// PUTs that answered 200: key, seed, length.
    acked: Vec<(String, u64, usize)>,
    /// PUTs that answered 503: absent or whole afterwards.
    refused: Vec<(String, u64, usize)>,
    /// Deletes that answered 204.
    deleted: Vec<String>,
    /// Deletes that answered 503: either way afterwards.
    unsure: Vec<String>,
    /// Answers that were neither success nor 503 SlowDown.
    violations: Vec<String>,
}

/// PUTs of new keys (4 KiB, every fifth 100 KiB; every third create-only),
/// and now and then a DELETE of one of this writer's own acknowledged keys.
async fn write_until(c: Client, w: u64, stop: Arc<AtomicBool>, writes: Arc<Mutex<Writes>>) {
    let mut mine: Vec<(String, u64, usize)> = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        if i.is_multiple_of(4) && !mine.is_empty() {
            let (key, _, _) = mine.swap_remove(0);
            let deleted = c.delete_object().bucket("demo").key(&key).send().await;
            let mut writes = writes.lock().unwrap();
            match deleted.map_err(|e| slow_down_or_violation(&e)) {
                Ok(_) => writes.deleted.push(key),
                Err(s) if s == "503" => writes.unsure.push(key),
                Err(s) => writes.violations.push(format!("DELETE {key}: {s}")),
            }
            continue;
        }
        let key = format!("w{w}/{i}");
        let (seed, len) = (
            w * 1_000_000 + i,
            if i.is_multiple_of(5) { 100 << 10 } else { 4096 },
        );
        let outcome = put_maybe_create_only(&c, &key, seed, len, i.is_multiple_of(3)).await;
        let mut writes = writes.lock().unwrap();
        match outcome {
            Ok(()) => {
                writes.acked.push((key.clone(), seed, len));
                mine.push((key, seed, len));
            }
            Err(s) if s == "503" => writes.refused.push((key, seed, len)),
            Err(s) => writes.violations.push(format!("PUT {key}: {s}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_survive_resets_and_writes_answer_200_or_503() {
    common::log_if_asked();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let admin = init(&dir);
    let chaos = Arc::new(Chaos::default());
    let proxy = resetting_proxy(admin.nodes[2], chaos.clone()).await;
    let path = dir.join("gateway.toml");
    let mut gw: GatewayConfig = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    gw.nodes[2] = proxy;
    std::fs::write(&path, toml::to_string(&gw).unwrap()).unwrap();
    let cluster = lumbung::dev::start(&lumbung::dev::DevOptions::new(dir.clone(), 0))
        .await
        .unwrap();
    let env = &cluster.env;
    let client = Client::from_conf(
        common::s3_config(env, &env.access_key, &env.secret_key)
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    let objects = preloaded();
    for (key, seed, len) in &objects {
        put(&client, key, *seed, *len).await.unwrap();
    }

    chaos.on.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Writes::default()));
    let mut writers = Vec::new();
    for w in 0..3 {
        writers.push(tokio::spawn(write_until(
            client.clone(),
            w,
            stop.clone(),
            writes.clone(),
        )));
    }
    let mut readers = Vec::new();
    for r in 0..4u64 {
        let (c, stop, objects) = (client.clone(), stop.clone(), objects.clone());
        readers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut turn = r;
            while !stop.load(Ordering::Relaxed) {
                match read_one(&c, turn, &objects).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
                turn += 1;
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(LOAD).await;
    stop.store(true, Ordering::Relaxed);
    let (mut reads, mut read_failures) = (0, Vec::new());
    for r in readers {
        let (ok, failed) = r.await.unwrap();
        reads += ok;
        read_failures.extend(failed);
    }
    for w in writers {
        w.await.unwrap();
    }
    chaos.on.store(false, Ordering::Relaxed);
    let mut writes = std::mem::take(&mut *writes.lock().unwrap());
    // A key deleted since, or maybe deleted, is no longer expected.
    let touched: std::collections::HashSet<String> = writes
        .deleted
        .iter()
        .chain(&writes.unsure)
        .cloned()
        .collect();
    writes.acked.retain(|(key, _, _)| !touched.contains(key));
    println!(
        "{:.1} s of resets: {} connections reset at once, {} mid-stream; {reads} reads, {} failed; \
         {} PUTs 200, {} PUTs 503, {} DELETEs 204, {} DELETEs 503, {} other answers",
        started.elapsed().as_secs_f64(),
        chaos.at_once.load(Ordering::Relaxed),
        chaos.mid_stream.load(Ordering::Relaxed),
        read_failures.len(),
        writes.acked.len(),
        writes.refused.len(),
        writes.deleted.len(),
        writes.unsure.len(),
        writes.violations.len(),
    );
    assert!(
        chaos.mid_stream.load(Ordering::Relaxed) >= 2,
        "the proxy hardly reset anything"
    );
    assert!(reads > 100, "the readers hardly ran");
    assert!(read_failures.is_empty(), "reads failed: {read_failures:?}");
    assert!(writes.violations.is_empty(), "{:?}", writes.violations);
    assert!(writes.acked.len() > 50, "the writers hardly ran");
    assert!(
        writes.refused.is_empty() && writes.unsure.is_empty(),
        "named writes answered 503 though they can be sent again: PUT {:?}, DELETE {:?}",
        writes.refused,
        writes.unsure
    );

    // Every acknowledged write is there, byte for byte; every
    // acknowledged delete took; a refused PUT left nothing or all.
    for (key, seed, len) in &writes.acked {
        common::assert_reads_back(&client, "demo", key, *seed, *len).await;
    }
    for key in &writes.deleted {
        let got = client.get_object().bucket("demo").key(key).send().await;
        let err = got.err().unwrap_or_else(|| panic!("{key} was deleted"));
        assert_eq!(common::code(&err), "NoSuchKey", "{key}");
    }
    for (key, seed, len) in &writes.refused {
        match client.get_object().bucket("demo").key(key).send().await {
            Ok(o) => assert!(
                o.body.collect().await.unwrap().into_bytes() == common::bytes(*seed, *len),
                "{key} was refused and is there, but not whole"
            ),
            Err(e) => assert_eq!(common::code(&e), "NoSuchKey", "{key}"),
        }
    }
    cluster.stop().await;
}
