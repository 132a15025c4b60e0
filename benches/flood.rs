//! The flood bench, in two roles. `--mode victim` measures a well-behaved
//! tenant's GET latency (4 KiB objects); `--mode flood` floods the gateway
//! from another address with bad signatures, garbage bytes and half-open
//! TLS handshakes.
//!
//! ```sh
//! cargo bench --bench flood -- --env-file s3.env --mode victim --seconds 15
//! cargo bench --bench flood -- --env-file s3.env --mode flood --seconds 20
//! ```
//!
//! `benches/flood.sh` runs the victim alone, then beside a flood, against
//! a 3-node cluster of release processes whose gateway keeps its default
//! limits, and prints the ratio of the two p99s.

#[path = "../tests/common/mod.rs"]
mod common;

use aws_sdk_s3::primitives::ByteStream;
use clap::Parser;
use lumbung::admin::S3Env;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    env_file: std::path::PathBuf,
    /// Length of each phase.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Concurrent GETs of the well-behaved tenant.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Flooding tasks of each kind.
    #[arg(long, default_value_t = 32)]
    flooders: usize,
    /// The flood's source address (any of 127/8 on loopback).
    #[arg(long, default_value = "127.0.0.2")]
    flood_from: std::net::IpAddr,
    /// `victim` or `flood`.
    #[arg(long)]
    mode: String,
    /// The victim's label in its output line.
    #[arg(long, default_value = "victim")]
    label: String,
    #[arg(long, hide = true)]
    bench: bool,
}

const SIZE: usize = 4096;
const OBJECTS: usize = 200;

/// GETs of 4 KiB objects for `seconds`; returns sorted latencies (µs).
async fn victim(c: &aws_sdk_s3::Client, bucket: &str, args: &Args) -> (Vec<u64>, u64) {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let (c, bucket, errors) = (c.clone(), bucket.to_string(), errors.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = w;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let key = format!("flood-bench/{}", i % OBJECTS);
                    let ok = match c.get_object().bucket(&bucket).key(key).send().await {
                        Ok(o) => o
                            .body
                            .collect()
                            .await
                            .is_ok_and(|d| d.into_bytes().len() == SIZE),
                        Err(_) => false,
                    };
                    if ok {
                        lat.push(t.elapsed().as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 7;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all.sort_unstable();
    (all, errors.load(Ordering::Relaxed))
}

fn pct(l: &[u64], p: f64) -> f64 {
    if l.is_empty() {
        return 0.0;
    }
    l[((l.len() as f64 * p) as usize).min(l.len() - 1)] as f64 / 1000.0
}

async fn connect_from(
    from: std::net::IpAddr,
    to: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

#[derive(Default)]
struct Counts {
    /// Every TCP connection opened, whatever became of it.
    connections: AtomicU64,
    bad_signatures: AtomicU64,
    slow_down: AtomicU64,
    garbage: AtomicU64,
    half_open: AtomicU64,
}

/// One flooding task of `kind` until `stop`.
async fn flood(
    kind: usize,
    env: S3Env,
    args_from: std::net::IpAddr,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let to: SocketAddr = env.endpoint.trim_start_matches("https://").parse().unwrap();
    let tls = common::tls_client(&env.ca_cert);
    let name = rustls::pki_types::ServerName::try_from(to.ip().to_string()).unwrap();
    let date = chrono_like_now();
    let mut buf = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let Ok(tcp) = connect_from(args_from, to).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        match kind {
            // A signed-looking request with a wrong signature.
            0 => {
                let Ok(mut s) = tls.connect(name.clone(), tcp).await else {
                    continue;
                };
                let req = format!(
                    "GET /{b}/flood-bench/1 HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\nx-amz-date: {date}\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\nAuthorization: AWS4-HMAC-SHA256 Credential={ak}/{day}/{region}/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={sig}\r\n\r\n",
                    b = env.bucket,
                    ak = env.access_key,
                    day = &date[..8],
                    region = env.region,
                    sig = "0".repeat(64)
                );
                let _ = s.write_all(req.as_bytes()).await;
                let mut reply = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
                if reply.windows(8).any(|w| w == b"SlowDown") {
                    counts.slow_down.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.bad_signatures.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Garbage after a good handshake.
            1 => {
                let Ok(mut s) = tls.connect(name.clone(), tcp).await else {
                    continue;
                };
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(31) ^ 0x5a;
                }
                let _ = s.write_all(&buf).await;
                let mut reply = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
                counts.garbage.fetch_add(1, Ordering::Relaxed);
            }
            // Half a ClientHello, then silence until the gateway gives up.
            _ => {
                let mut tcp = tcp;
                let _ = tcp
                    .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
                    .await;
                counts.half_open.fetch_add(1, Ordering::Relaxed);
                let mut one = [0u8; 1];
                let _ = tokio::time::timeout(Duration::from_secs(60), tcp.read(&mut one)).await;
            }
        }
    }
}

/// Now as `YYYYMMDDTHHMMSSZ`, the SigV4 date format.
fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let env = S3Env::parse(&std::fs::read_to_string(&args.env_file).expect("env file")).unwrap();
    match args.mode.as_str() {
        "victim" => run_victim(&args, &env).await,
        "flood" => run_flood(&args, &env).await,
        other => panic!("--mode is victim or flood, not {other}"),
    }
}

async fn run_victim(args: &Args, env: &S3Env) {
    let c = common::s3(env);
    for i in 0..OBJECTS {
        c.put_object()
            .bucket(&env.bucket)
            .key(format!("flood-bench/{i}"))
            .body(ByteStream::from(common::bytes(i as u64, SIZE)))
            .send()
            .await
            .expect("seeding the objects to read");
    }
    let (lat, errors) = victim(&c, &env.bucket, args).await;
    println!(
        "{}: GETs={} errors={} p50={:.1}ms p99={:.1}ms",
        args.label,
        lat.len(),
        errors,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
}

async fn run_flood(args: &Args, env: &S3Env) {
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut flooders = Vec::new();
    for kind in 0..3 {
        for _ in 0..args.flooders {
            flooders.push(tokio::spawn(flood(
                kind,
                env.clone(),
                args.flood_from,
                stop.clone(),
                counts.clone(),
            )));
        }
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let rate = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / secs;
    println!(
        "flood from {}: {:.0} connections/s opened; {:.0} bad-signature requests/s answered (of which {:.0}/s SlowDown), {:.0} garbage connections/s served, {:.0} half-open handshakes/s",
        args.flood_from,
        rate(&counts.connections),
        rate(&counts.bad_signatures) + rate(&counts.slow_down),
        rate(&counts.slow_down),
        rate(&counts.garbage),
        rate(&counts.half_open),
    );
    for f in flooders {
        f.abort();
    }
}
