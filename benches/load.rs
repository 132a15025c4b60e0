//! The load tool: drives PUT and GET over the real S3 API (the AWS SDK for
//! Rust, over TLS) at a given object size and concurrency, and prints
//! ops/s, MiB/s and latency percentiles.
//!
//! ```sh
//! cargo bench --bench load -- --env-file s3.env --size 4KiB --concurrency 64 --seconds 20
//! ```
//!
//! `benches/run.sh` starts a 3-node cluster of real processes, measures the
//! disk's fsync bandwidth, and runs the figures README reports.

#[path = "../tests/common/mod.rs"]
mod common;

use aws_sdk_s3::primitives::ByteStream;
use clap::Parser;
use lumbung::admin::S3Env;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The S3 env file (`lumbung dev --env-file` or init-cluster's s3.env).
    #[arg(long)]
    env_file: std::path::PathBuf,
    /// Object size: bytes, or with KiB/MiB/GiB.
    #[arg(long, default_value = "4KiB")]
    size: String,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Length of each phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Which phases: put, get or both (get reads what put wrote).
    #[arg(long, default_value = "both")]
    op: String,
    /// End a phase early once this file exists (the rebalance bench
    /// measures latency exactly while a rebalance runs).
    #[arg(long)]
    stop_file: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_size(s: &str) -> usize {
    let s = s.trim();
    let (num, mult) = [
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    num.trim().parse::<usize>().expect("size is a number") * mult
}

/// Latencies of one phase, in microseconds.
struct Phase {
    name: &'static str,
    latencies: Mutex<Vec<u64>>,
    errors: AtomicU64,
}

impl Phase {
    fn report(&self, size: usize, elapsed: Duration, concurrency: usize) {
        let mut l = self.latencies.lock().unwrap();
        l.sort_unstable();
        let n = l.len();
        let pct = |p: f64| {
            if n == 0 {
                0.0
            } else {
                l[((n as f64 * p) as usize).min(n - 1)] as f64 / 1000.0
            }
        };
        let secs = elapsed.as_secs_f64();
        println!(
            "{:<4} size={} concurrency={} ops={} errors={} ops/s={:.0} MiB/s={:.1} p50={:.1}ms p99={:.1}ms",
            self.name,
            size,
            concurrency,
            n,
            self.errors.load(Ordering::Relaxed),
            n as f64 / secs,
            (n * size) as f64 / secs / (1024.0 * 1024.0),
            pct(0.50),
            pct(0.99),
        );
    }
}

async fn run_phase<F, Fut>(name: &'static str, args: &Args, size: usize, op: F) -> usize
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let phase = Arc::new(Phase {
        name,
        latencies: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
    });
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let stop_file = args.stop_file.clone();
    let running =
        move || Instant::now() < deadline && !stop_file.as_ref().is_some_and(|f| f.exists());
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let (phase, op, running) = (phase.clone(), op.clone(), running.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while running() {
                    let t = Instant::now();
                    if op(w, i).await {
                        phase
                            .latencies
                            .lock()
                            .unwrap()
                            .push(t.elapsed().as_micros() as u64);
                    } else {
                        phase.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
                i
            })
        })
        .collect();
    // Keys 0..n exist for every worker, n being the fewest any wrote.
    let mut fewest = usize::MAX;
    for w in workers {
        fewest = fewest.min(w.await.unwrap() as usize);
    }
    phase.report(size, start.elapsed(), args.concurrency);
    fewest
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let env = S3Env::parse(&std::fs::read_to_string(&args.env_file).expect("env file")).unwrap();
    let size = parse_size(&args.size);
    let client = common::s3(&env);
    let body = bytes::Bytes::from(common::bytes(size as u64, size));
    let bucket = env.bucket.clone();
    let prefix = format!("bench/{size}");

    let mut written = 0;
    if args.op == "put" || args.op == "both" {
        let (c, b, p, body) = (client.clone(), bucket.clone(), prefix.clone(), body.clone());
        written = run_phase("PUT", &args, size, move |w, i| {
            let (c, b, body) = (c.clone(), b.clone(), body.clone());
            let key = format!("{p}/{w}-{i}");
            async move {
                // Over TLS, like aws-cli: the body is not hashed for the signature.
                c.put_object()
                    .bucket(b)
                    .key(key)
                    .body(ByteStream::from(body))
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .is_ok()
            }
        })
        .await;
    }
    if args.op == "get" || args.op == "both" {
        if written == 0 {
            // Reading alone: write one round first.
            for w in 0..args.concurrency {
                client
                    .put_object()
                    .bucket(&bucket)
                    .key(format!("{prefix}/{w}-0"))
                    .body(ByteStream::from(body.clone()))
                    .send()
                    .await
                    .expect("seeding objects to read");
            }
            written = 1;
        }
        let (c, b, p) = (client.clone(), bucket.clone(), prefix.clone());
        let per_worker = written.max(1) as u64;
        run_phase("GET", &args, size, move |w, i| {
            let (c, b) = (c.clone(), b.clone());
            let key = format!("{p}/{w}-{}", i % per_worker);
            async move {
                match c.get_object().bucket(b).key(key).send().await {
                    Ok(o) => o
                        .body
                        .collect()
                        .await
                        .map(|d| d.into_bytes().len() == size)
                        .unwrap_or(false),
                    Err(_) => false,
                }
            }
        })
        .await;
    }
}
