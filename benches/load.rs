//! The load tool: drives PUT and GET over the real S3 API (the AWS SDK for
//! Rust, over TLS) at a given object size and concurrency, and prints
//! ops/s, MiB/s and latency percentiles.
//!
//! ```sh
//! cargo bench --bench load -- --env-file s3.env --size 4KiB --concurrency 64 --seconds 20
//! # a soak: half GETs, half PUTs, every 5xx counted, a line a minute
//! cargo bench --bench load -- --env-file s3.env --op mixed --seconds 600 \
//!     --no-retries --report-every 60
//! # the sum of every shard's Raft term (elections), for the soak script
//! cargo bench --bench load -- --terms admin.toml
//! ```
//!
//! Each phase ends with one line per kind of request:
//!
//! ```text
//! PUT  size=4096 concurrency=64 ops=9000 errors=3 (5xx=1 [503 SlowDown:1] 4xx=0 transport=2 timeout=0 other=0) ops/s=450 MiB/s=1.8 p50=120.0ms p99=400.0ms max=900.0ms longest_stall=0.9s
//! ```
//!
//! `ops` counts successes; `longest_stall` is the longest time in which no
//! request of the phase succeeded. With `--report-every` the same figures
//! come for each interval too, on lines starting with `interval`.
//!
//! `benches/run.sh` starts a 3-node cluster of real processes, measures the
//! disk's fsync bandwidth, and runs the figures README reports;
//! `benches/soak.sh` holds the cluster at saturation for minutes.

#[path = "../tests/common/mod.rs"]
mod common;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use clap::Parser;
use lumbung::admin::S3Env;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The S3 env file (`lumbung dev --env-file` or init-cluster's s3.env).
    #[arg(long, required_unless_present = "terms")]
    env_file: Option<PathBuf>,
    /// Object size: bytes, or with KiB/MiB/GiB.
    #[arg(long, default_value = "4KiB")]
    size: String,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Length of each phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Which phases: put, get, both (get reads what put wrote) or mixed
    /// (one phase, each worker's requests half GETs of keys it wrote, half
    /// PUTs of new keys, at random).
    #[arg(long, default_value = "both", value_parser = ["put", "get", "both", "mixed"])]
    op: String,
    /// End a phase early once this file exists (the rebalance bench
    /// measures latency exactly while a rebalance runs).
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Send each request once: the SDK retries 5xx and transport errors by
    /// default, which hides them from the error counts.
    #[arg(long)]
    no_retries: bool,
    /// Every this many seconds, print that interval's figures on a line
    /// starting with `interval` (0: only the phase's).
    #[arg(long, default_value_t = 0)]
    report_every: u64,
    /// A request not done after this long is abandoned and counted as a
    /// `timeout`, so a hung cluster shows as errors and the phase still
    /// ends on time.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Print the sum of every shard's Raft term, as the nodes in this
    /// admin.toml report it, and exit: terms only grow by elections, so
    /// the difference between two readings counts leader changes.
    #[arg(long)]
    terms: Option<PathBuf>,
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

/// Latencies in microseconds, counted in fixed buckets: exact below
/// 128 µs, then 128 buckets per power of two (under 1% wide). Recording
/// is one addition, and an hour of requests takes no more memory than a
/// second's, so the soak can keep one per interval.
struct Histogram {
    counts: Vec<u64>,
    n: u64,
    max: u64,
}

const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB as usize;

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
        }
    }

    fn bucket(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let shift = 63 - v.leading_zeros() - SUB_BITS;
        ((shift as u64 + 1) * SUB + ((v >> shift) - SUB)) as usize
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let shift = i / SUB - 1;
        ((i % SUB + SUB) << shift) + ((1u64 << shift) >> 1)
    }

    fn add(&mut self, micros: u64) {
        self.counts[Self::bucket(micros)] += 1;
        self.n += 1;
        self.max = self.max.max(micros);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.max = self.max.max(other.max);
    }

    /// The `p` quantile in milliseconds (0 when empty).
    fn pct_ms(&self, p: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let rank = ((self.n as f64 * p).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).min(self.max) as f64 / 1000.0;
            }
        }
        self.max as f64 / 1000.0
    }
}

/// Why a request failed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Failure {
    /// An HTTP error status and the S3 error code ("-" when the body had
    /// none).
    Status(u16, String),
    /// No response: the connection failed or broke.
    Transport,
    /// Not done within `--timeout-secs`, or the SDK's own timeouts.
    Timeout,
    /// Anything else: the request could not be built, or a GET's body had
    /// the wrong length.
    Other,
}

impl Failure {
    /// Sorts an SDK error; the text, for the first of each kind, is what
    /// the SDK said.
    fn of<E: ProvideErrorMetadata + std::error::Error + 'static>(
        e: &SdkError<E>,
    ) -> (Failure, String) {
        let failure = match e {
            SdkError::TimeoutError(_) => Failure::Timeout,
            SdkError::DispatchFailure(d) if d.is_timeout() => Failure::Timeout,
            SdkError::DispatchFailure(_) => Failure::Transport,
            SdkError::ServiceError(_) | SdkError::ResponseError(_) => Failure::Status(
                e.raw_response().map_or(0, |r| r.status().as_u16()),
                e.code().unwrap_or("-").to_string(),
            ),
            _ => Failure::Other,
        };
        (failure, DisplayErrorContext(e).to_string())
    }

    fn label(&self) -> String {
        match self {
            Failure::Status(status, code) => format!("{status} {code}"),
            Failure::Transport => "transport".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Other => "other".into(),
        }
    }
}

/// Failures counted by kind; HTTP ones by status and S3 code.
#[derive(Default)]
struct Errors {
    status: BTreeMap<(u16, String), u64>,
    transport: u64,
    timeout: u64,
    other: u64,
}

impl Errors {
    fn add(&mut self, f: &Failure) {
        match f {
            Failure::Status(s, code) => *self.status.entry((*s, code.clone())).or_default() += 1,
            Failure::Transport => self.transport += 1,
            Failure::Timeout => self.timeout += 1,
            Failure::Other => self.other += 1,
        }
    }

    fn merge(&mut self, other: &Errors) {
        for (k, n) in &other.status {
            *self.status.entry(k.clone()).or_default() += n;
        }
        self.transport += other.transport;
        self.timeout += other.timeout;
        self.other += other.other;
    }

    fn total(&self) -> u64 {
        self.status.values().sum::<u64>() + self.transport + self.timeout + self.other
    }

    /// `3 (5xx=1 [503 SlowDown:1] 4xx=0 transport=2 timeout=0 other=0)`
    fn render(&self) -> String {
        let class = |lo: u16, hi: u16| {
            let codes: Vec<_> = self
                .status
                .iter()
                .filter(|((s, _), _)| (lo..hi).contains(s))
                .collect();
            let n: u64 = codes.iter().map(|(_, n)| **n).sum();
            if codes.is_empty() {
                format!("{n}")
            } else {
                let list: Vec<_> = codes
                    .iter()
                    .map(|((s, code), n)| format!("{s} {code}:{n}"))
                    .collect();
                format!("{n} [{}]", list.join(" "))
            }
        };
        // Statuses outside 4xx and 5xx (none expected) go with `other`.
        let odd: u64 = self
            .status
            .iter()
            .filter(|((s, _), _)| !(400..600).contains(s))
            .map(|(_, n)| n)
            .sum();
        format!(
            "{} (5xx={} 4xx={} transport={} timeout={} other={})",
            self.total(),
            class(500, 600),
            class(400, 500),
            self.transport,
            self.timeout,
            self.other + odd
        )
    }
}

/// What one kind of request did in some stretch of time.
struct Window {
    latencies: Histogram,
    errors: Errors,
}

impl Window {
    fn new() -> Window {
        Window {
            latencies: Histogram::new(),
            errors: Errors::default(),
        }
    }

    fn merge(&mut self, other: &Window) {
        self.latencies.merge(&other.latencies);
        self.errors.merge(&other.errors);
    }

    /// `ops=.. errors=.. ops/s=.. MiB/s=.. p50=.. p99=.. max=..`
    fn render(&self, size: usize, secs: f64) -> String {
        let n = self.latencies.n;
        format!(
            "ops={} errors={} ops/s={:.0} MiB/s={:.1} p50={:.1}ms p99={:.1}ms max={:.1}ms",
            n,
            self.errors.render(),
            n as f64 / secs,
            (n as f64 * size as f64) / secs / (1024.0 * 1024.0),
            self.latencies.pct_ms(0.50),
            self.latencies.pct_ms(0.99),
            self.latencies.max as f64 / 1000.0,
        )
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Put,
    Get,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Put => "PUT",
            Kind::Get => "GET",
        }
    }
}

/// Everything a phase measured, whole and since the last interval line.
/// One lock per request is cheap next to an HTTP round trip.
struct Recorder {
    start: Instant,
    /// Per kind (indexed by `Kind as usize`): the phase and the interval.
    total: [Window; 2],
    interval: [Window; 2],
    interval_start: Instant,
    /// When a request last succeeded, and the longest time without one:
    /// in the phase (with when it began) and in the interval.
    last_ok: Instant,
    stall: Duration,
    stall_from: Duration,
    interval_stall: Duration,
    /// Error kinds already described on stderr.
    described: HashSet<Failure>,
}

impl Recorder {
    fn new() -> Recorder {
        let now = Instant::now();
        Recorder {
            start: now,
            total: [Window::new(), Window::new()],
            interval: [Window::new(), Window::new()],
            interval_start: now,
            last_ok: now,
            stall: Duration::ZERO,
            stall_from: Duration::ZERO,
            interval_stall: Duration::ZERO,
            described: HashSet::new(),
        }
    }

    fn record(&mut self, kind: Kind, took: Duration, result: Result<(), (Failure, String)>) {
        let k = kind as usize;
        match result {
            Ok(()) => {
                let micros = took.as_micros() as u64;
                self.total[k].latencies.add(micros);
                self.interval[k].latencies.add(micros);
                let now = Instant::now();
                self.gap_until(now);
                self.last_ok = now;
            }
            Err((failure, text)) => {
                self.total[k].errors.add(&failure);
                self.interval[k].errors.add(&failure);
                // The first of each kind in full: "transport" alone does
                // not say whether the port was closed or TLS failed.
                if self.described.insert(failure.clone()) {
                    eprintln!("{} {}: {text}", kind.name(), failure.label());
                }
            }
        }
    }

    /// Counts the time since the last success as a gap ending `now`.
    fn gap_until(&mut self, now: Instant) {
        let gap = now - self.last_ok;
        if gap > self.stall {
            self.stall = gap;
            self.stall_from = self.last_ok - self.start;
        }
        let in_interval = now - self.last_ok.max(self.interval_start);
        self.interval_stall = self.interval_stall.max(in_interval);
    }

    /// Prints the interval that ends now and starts the next.
    fn print_interval(&mut self, kinds: &[Kind], size: usize) {
        let now = Instant::now();
        self.gap_until(now);
        let span = (now - self.interval_start).as_secs_f64().max(1e-9);
        let t = (now - self.start).as_secs_f64();
        let windows = std::mem::replace(&mut self.interval, [Window::new(), Window::new()]);
        let prefix = format!("interval t={t:.0}s span={span:.1}s ");
        print_lines(
            &prefix,
            "",
            kinds,
            &windows,
            size,
            span,
            self.interval_stall,
        );
        self.interval_start = now;
        self.interval_stall = Duration::ZERO;
    }
}

/// One line per kind, `{prefix}PUT  size=.. {after_size}ops=.. ...`; after
/// two kinds, a `MIX` line of both. The stall is the phase's (or the
/// interval's), so it goes on the line that covers every kind.
fn print_lines(
    prefix: &str,
    after_size: &str,
    kinds: &[Kind],
    windows: &[Window; 2],
    size: usize,
    secs: f64,
    stall: Duration,
) {
    let stall = format!(" longest_stall={:.1}s", stall.as_secs_f64());
    let mut all = Window::new();
    for kind in kinds {
        let w = &windows[*kind as usize];
        let last = if kinds.len() == 1 { stall.as_str() } else { "" };
        println!(
            "{prefix}{:<4} size={size} {after_size}{}{last}",
            kind.name(),
            w.render(size, secs)
        );
        all.merge(w);
    }
    if kinds.len() > 1 {
        println!(
            "{prefix}MIX  size={size} {after_size}{}{stall}",
            all.render(size, secs)
        );
    }
}

/// The S3 client and what every request needs.
struct Target {
    client: aws_sdk_s3::Client,
    bucket: String,
    body: bytes::Bytes,
    size: usize,
    timeout: Duration,
}

type Outcome = Result<(), (Failure, String)>;

impl Target {
    async fn put(&self, key: String) -> Outcome {
        // Over TLS, like aws-cli: the body is not hashed for the signature.
        let send = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(self.body.clone()))
            .customize()
            .disable_payload_signing()
            .send();
        match tokio::time::timeout(self.timeout, send).await {
            Err(_) => Err((Failure::Timeout, "no answer within --timeout-secs".into())),
            Ok(Err(e)) => Err(Failure::of(&e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    async fn get(&self, key: String) -> Outcome {
        let read = async {
            let o = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| Failure::of(&e))?;
            let body = o
                .body
                .collect()
                .await
                .map_err(|e| (Failure::Transport, format!("reading the body: {e}")))?;
            let len = body.into_bytes().len();
            if len != self.size {
                return Err((
                    Failure::Other,
                    format!("body of {len} bytes, not {}", self.size),
                ));
            }
            Ok(())
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .unwrap_or_else(|_| Err((Failure::Timeout, "no answer within --timeout-secs".into())))
    }
}

/// What the workers of a phase do; keys are `{prefix}/{worker}-{i}`.
#[derive(Clone)]
enum Plan {
    /// PUT new keys.
    Put,
    /// GET the keys 0..n of the worker's own.
    Get(u64),
    /// At random, GET one of the keys this worker wrote or PUT a new one.
    Mixed,
}

/// A small, fast, per-worker random sequence (xorshift).
fn next_random(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Runs one worker until the phase ends; returns how many requests it
/// sent.
async fn worker(
    w: usize,
    plan: Plan,
    prefix: String,
    target: Arc<Target>,
    rec: Arc<Mutex<Recorder>>,
    running: impl Fn() -> bool,
) -> u64 {
    let mut i = 0u64;
    let mut rng = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    // Mixed: the keys this worker has written (key 0 was seeded).
    let mut written: Vec<u64> = vec![0];
    while running() {
        let (kind, n) = match plan {
            Plan::Put => (Kind::Put, i),
            Plan::Get(per_worker) => (Kind::Get, i % per_worker),
            Plan::Mixed => {
                let r = next_random(&mut rng);
                if r & 1 == 0 && !written.is_empty() {
                    (
                        Kind::Get,
                        written[((r >> 1) % written.len() as u64) as usize],
                    )
                } else {
                    // Past the seeded key 0.
                    (Kind::Put, i + 1)
                }
            }
        };
        let key = format!("{prefix}/{w}-{n}");
        let t = Instant::now();
        let result = match kind {
            Kind::Put => target.put(key).await,
            Kind::Get => target.get(key).await,
        };
        let ok = result.is_ok();
        rec.lock().unwrap().record(kind, t.elapsed(), result);
        if matches!(plan, Plan::Mixed) && kind == Kind::Put && ok {
            written.push(n);
        }
        i += 1;
    }
    i
}

/// Runs one phase and prints its lines; returns the fewest requests any
/// worker sent (keys 0..that exist for every worker after a PUT phase).
async fn run_phase(args: &Args, target: &Arc<Target>, plan: Plan, prefix: &str) -> usize {
    let kinds: &[Kind] = match plan {
        Plan::Put => &[Kind::Put],
        Plan::Get(_) => &[Kind::Get],
        Plan::Mixed => &[Kind::Get, Kind::Put],
    };
    let size = target.size;
    let rec = Arc::new(Mutex::new(Recorder::new()));
    let start = rec.lock().unwrap().start;
    let deadline = start + Duration::from_secs(args.seconds);
    let stop_file = args.stop_file.clone();
    let running =
        move || Instant::now() < deadline && !stop_file.as_ref().is_some_and(|f| f.exists());

    // Interval lines at whole multiples of --report-every; the last
    // interval is closed when the workers are done, so it holds the
    // requests that finished after the deadline too.
    let reporter = (args.report_every > 0).then(|| {
        let (rec, every) = (rec.clone(), Duration::from_secs(args.report_every));
        tokio::spawn(async move {
            let mut next = start + every;
            while next < deadline {
                tokio::time::sleep_until(next.into()).await;
                rec.lock().unwrap().print_interval(kinds, size);
                next += every;
            }
        })
    });

    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let fut = worker(
                w,
                plan.clone(),
                prefix.to_string(),
                target.clone(),
                rec.clone(),
                running.clone(),
            );
            tokio::spawn(fut)
        })
        .collect();
    let mut fewest = usize::MAX;
    for w in workers {
        fewest = fewest.min(w.await.unwrap() as usize);
    }
    if let Some(r) = reporter {
        r.abort();
    }

    let mut rec = rec.lock().unwrap();
    if args.report_every > 0 {
        rec.print_interval(kinds, size);
    }
    rec.gap_until(Instant::now());
    let secs = start.elapsed().as_secs_f64();
    // The phase's lines keep the fields they always had, in their order:
    // `PUT  size=.. concurrency=.. ops=.. errors=.. ops/s=.. ...`.
    let concurrency = format!("concurrency={} ", args.concurrency);
    print_lines("", &concurrency, kinds, &rec.total, size, secs, rec.stall);
    eprintln!(
        "longest stall {:.1}s, from {:.1}s into the phase",
        rec.stall.as_secs_f64(),
        rec.stall_from.as_secs_f64()
    );
    fewest
}

/// Writes key 0 of every worker, so that GETs have something to read from
/// the first request on. Not timed; retried a few times, and a key that
/// cannot be written is reported (a mixed worker then PUTs first).
async fn seed(target: &Target, prefix: &str, workers: usize) {
    let puts = (0..workers).map(|w| async move {
        for _ in 0..3 {
            if target.put(format!("{prefix}/{w}-0")).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        false
    });
    let failed = futures::future::join_all(puts)
        .await
        .into_iter()
        .filter(|ok| !ok)
        .count();
    if failed > 0 {
        eprintln!("seeding: {failed} of {workers} objects could not be written");
    }
}

/// `--terms`: asks every node of admin.toml for its shards and prints the
/// sum over shards of the highest term any replica reports.
async fn print_terms(path: &Path) -> anyhow::Result<()> {
    use lumbung::rpc::{pb, Pool};
    let cfg: lumbung::config::AdminConfig = lumbung::config::load(path)?;
    let pool = Pool::new(&cfg.tls)?;
    let mut terms: BTreeMap<u32, u64> = BTreeMap::new();
    let mut answered = 0;
    for addr in &cfg.nodes {
        let mut client = pool.client(*addr)?;
        let reply = tokio::time::timeout(Duration::from_secs(3), client.status(pb::Empty {})).await;
        if let Ok(Ok(status)) = reply {
            answered += 1;
            for s in status.into_inner().shards {
                let t = terms.entry(s.shard).or_default();
                *t = (*t).max(s.term);
            }
        }
    }
    println!(
        "terms sum={} shards={} nodes={}/{}",
        terms.values().sum::<u64>(),
        terms.len(),
        answered,
        cfg.nodes.len()
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(admin) = &args.terms {
        if let Err(e) = print_terms(admin).await {
            eprintln!("terms: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let env_file = args.env_file.as_ref().expect("--env-file");
    let env = S3Env::parse(&std::fs::read_to_string(env_file).expect("env file")).unwrap();
    let size = parse_size(&args.size);
    let mut config = common::s3_config(&env, &env.access_key, &env.secret_key);
    if args.no_retries {
        config = config.retry_config(RetryConfig::disabled());
    }
    let target = Arc::new(Target {
        client: aws_sdk_s3::Client::from_conf(config.build()),
        bucket: env.bucket.clone(),
        body: bytes::Bytes::from(common::bytes(size as u64, size)),
        size,
        timeout: Duration::from_secs(args.timeout_secs),
    });
    let prefix = format!("bench/{size}");

    if args.op == "mixed" {
        // Its own keys: overwriting the put phase's would measure another
        // path than writing new objects.
        let prefix = format!("{prefix}/mixed");
        seed(&target, &prefix, args.concurrency).await;
        run_phase(&args, &target, Plan::Mixed, &prefix).await;
        return;
    }
    let mut written = 0;
    if args.op == "put" || args.op == "both" {
        written = run_phase(&args, &target, Plan::Put, &prefix).await;
    }
    if args.op == "get" || args.op == "both" {
        if written == 0 {
            // Reading alone: write one round first.
            seed(&target, &prefix, args.concurrency).await;
            written = 1;
        }
        run_phase(&args, &target, Plan::Get(written.max(1) as u64), &prefix).await;
    }
}
