//! The nemesis: a cluster under clients keeps every answer linearizable
//! and loses no acknowledged write while its nodes are hurt in turn.
//!
//! Real processes: three `lumbung node`s (RF 3, 8 shards), each in a
//! network namespace of its own, and one gateway in a hub namespace joined
//! to the nodes by a bridge. Five S3 clients (the AWS SDK for Rust over
//! TLS, retries off) share six keys and PUT (a unique body per write), GET,
//! DELETE and LIST them, and PUT conditionally (`If-None-Match: *`, and
//! `If-Match` the ETag of a value the client read; `NEMESIS_CONDITIONAL=0`
//! leaves those out). Every call goes into the
//! linearizability checker's history: a 2xx, a 404 read and a 412 are
//! definite results, another 4xx (and a 507, refused before writing) had no
//! effect, and a timeout, a broken connection or any other 5xx may or may
//! not have taken effect.
//!
//! Meanwhile faults come in cycles, each on one node (the leader of the
//! bucket's index shard or a follower, in alternate rounds), healed before
//! the next: SIGKILL and a restart; SIGSTOP for 5 to 15 s and SIGCONT (the
//! node's watchdog must see a paused process, not a stalled one, and leave
//! it running: the first pause outlasts its `stall_secs`); the node's cable
//! unplugged and plugged back; and a full disk: every node's data
//! directory is a 256 MiB tmpfs of which it keeps a reserve of 64 MiB
//! free (`[space] reserve_mib`), and a filler file takes all but 16 MiB
//! (below half the reserve: Raft appends wait) or 48 MiB (within it: new
//! data is refused with 507), then goes. After each healing the cluster
//! must settle within a minute: every node answers, every shard has a
//! leader and three voters, and every replica keeps up with the others.
//! If it does not, the lagging node is restarted as a supervisor would
//! (the outcome is noted) and no further fault is done.
//!
//! Once everything is healed and the cluster has settled, a last GET of
//! every key closes the history, and the test shows that:
//!   1. the checker finds an order explaining every answer;
//!   2. no key's final read misses its last acknowledged write;
//!   3. no process ended without being told to;
//!   4. the cluster settled after every fault.
//!
//! It prints a table: fault cycles, calls ok/fail/unknown, 5xx answers by
//! code, and per fault kind the longest time without any successful call
//! while the fault lasted or the cluster recovered from it. The issue
//! allows no 5xx but a 503 for a write whose outcome is unknown (and 507
//! for a write refused on a full disk); others are counted apart, and fail
//! the test with `NEMESIS_STRICT_5XX=1`. When a check fails, or a 5xx was
//! not allowed, the checker's explanation, the history, every log and the
//! nodes' data are kept under /var/tmp/lumbung-nemesis/ (also with
//! `NEMESIS_KEEP=1`).
//!
//! `NEMESIS_CYCLES` (default: three of each fault), `NEMESIS_SEED` and
//! `NEMESIS_FAULTS` (e.g. `disk,pause`: only these, in turn) shape a run;
//! `benches/nemesis.sh` runs the long one. Needs root.

mod common;
mod linearizable;

#[path = "nemesis/clients.rs"]
mod clients;
#[path = "nemesis/cluster.rs"]
mod cluster;
#[path = "nemesis/network.rs"]
mod network;
#[path = "nemesis/report.rs"]
mod report;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::StalledStreamProtectionConfig;
use aws_sdk_s3::primitives::ByteStream;
use clients::{key_name, Client, Workload, KEYS};
use cluster::{Cluster, Fault, Unsettled, NODES, RESERVE_MIB};
use linearizable::{Observed, Outcome};
use lumbung::admin::{init_cluster, InitOptions, S3Env};
use md5::{Digest, Md5};
use network::{node_addr, Network, HUB_ADDR};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use report::{Cycle, Report};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shards of the cluster: few, to keep it light.
const SHARDS: u32 = 8;
/// The gateway listens here; node i on this plus i (inside namespaces, so
/// fixed ports collide with nothing).
const BASE_PORT: u16 = 7480;
/// Concurrent S3 clients.
const CLIENTS: usize = 5;
/// A call that has no answer by then is recorded as unknown.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the cluster may take to settle after a fault is healed.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// Load kept on a settled cluster before the next fault: part of the
/// "just after" of the fault before.
const AFTER_SETTLE: Duration = Duration::from_secs(2);
/// The nodes' watchdog `stall_secs` (the default, written by init-cluster).
const STALL_SECS: u64 = 10;

/// What a run does, from the environment.
struct Plan {
    cycles: usize,
    faults: Vec<Fault>,
    conditional: bool,
    seed: u64,
    keep: bool,
    /// A 5xx the issue does not allow fails the test.
    strict_5xx: bool,
}

impl Plan {
    fn from_env() -> Plan {
        let flag = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
        let off = |name: &str| std::env::var(name).is_ok_and(|v| v == "0");
        let faults: Vec<Fault> = match std::env::var("NEMESIS_FAULTS") {
            Ok(names) => names
                .split(',')
                .map(|n| Fault::named(n.trim()).unwrap_or_else(|| panic!("no fault {n:?}")))
                .collect(),
            Err(_) => vec![Fault::Kill, Fault::Pause, Fault::Partition, Fault::DiskFull],
        };
        let cycles = std::env::var("NEMESIS_CYCLES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3 * faults.len());
        let seed = std::env::var("NEMESIS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        Plan {
            cycles,
            faults,
            conditional: !off("NEMESIS_CONDITIONAL"),
            seed,
            keep: flag("NEMESIS_KEEP"),
            strict_5xx: flag("NEMESIS_STRICT_5XX"),
        }
    }

    /// What cycle `number` does. The faults take turns; each hits the
    /// index shard's leader and a follower in alternate rounds.
    fn step(&self, number: usize, rng: &mut StdRng) -> Step {
        let (round, kind) = (number / self.faults.len(), number % self.faults.len());
        let fault = self.faults[kind];
        let secs = match fault {
            Fault::Kill => rng.gen_range(2.0..8.0),
            // The first pause outlasts the watchdog's stall_secs.
            Fault::Pause if round == 0 => STALL_SECS as f64 + 2.0,
            Fault::Pause => rng.gen_range(5.0..15.0),
            Fault::Partition => rng.gen_range(5.0..12.0),
            Fault::DiskFull => rng.gen_range(8.0..12.0),
        };
        // Two rounds in four, the disk fills below half the reserve (Raft
        // appends wait); otherwise to within the reserve (new data 507).
        let reserve = RESERVE_MIB << 20;
        Step {
            fault,
            hold: Duration::from_secs_f64(secs),
            on_leader: (round + kind).is_multiple_of(2),
            follower: (round / 2) % 2,
            disk_left: if (round / 2).is_multiple_of(2) {
                reserve / 4
            } else {
                reserve * 3 / 4
            },
        }
    }
}

/// What one fault cycle does.
struct Step {
    fault: Fault,
    /// How long the fault lasts.
    hold: Duration,
    /// Whether it hits the leader of the bucket's index shard...
    on_leader: bool,
    /// ...or else which of the two followers.
    follower: usize,
    /// What a full disk leaves free.
    disk_left: u64,
}

fn init(dir: &Path) -> S3Env {
    init_cluster(&InitOptions {
        nodes: NODES,
        dir: dir.to_path_buf(),
        base_port: BASE_PORT,
        shards: SHARDS,
        replication: 3,
        host: HUB_ADDR.parse().unwrap(),
        node_hosts: (1..=NODES).map(|i| node_addr(i).parse().unwrap()).collect(),
        public_host: None,
        region: "us-east-1".into(),
    })
    .unwrap()
}

/// An S3 client that reports every outcome as it happened: no retries, a
/// bound on each call.
fn s3_client(env: &S3Env) -> aws_sdk_s3::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_timeout(CALL_TIMEOUT)
        .build();
    let config = common::s3_config(env, &env.access_key, &env.secret_key)
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts)
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

#[test]
fn faults_in_cycles_leave_answers_linearizable_and_acknowledged_writes_readable() {
    let plan = Plan::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let env = init(&dir);
    let net = Network::build(NODES);
    // This thread, the runtime's threads and every process started from
    // here on live in the hub, next to the gateway.
    net.enter_hub();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(nemesis(plan, &dir, env, net));
}

async fn nemesis(plan: Plan, dir: &Path, env: S3Env, net: Network) {
    println!(
        "nemesis: seed {}, {} cycles of {:?}, conditional puts {}",
        plan.seed,
        plan.cycles,
        plan.faults,
        if plan.conditional { "on" } else { "off" }
    );
    let binary = common::processes::own_copy_of_lumbung(dir.parent().unwrap());
    let small_disks = plan.faults.contains(&Fault::DiskFull);
    let mut cluster = Cluster::start(dir, &binary, net, small_disks);
    let probe = s3_client(&env);
    wait_for_s3(&probe, &env, &cluster).await;
    assert_etags_are_md5(&probe, &env.bucket).await;

    let workload = Arc::new(Workload::new(&env.bucket, plan.conditional));
    let time_zero = time::OffsetDateTime::now_utc();
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|id| {
            let client = Client::new(id, s3_client(&env), workload.clone(), plan.seed);
            tokio::spawn(client.run())
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let layout = lumbung::config::load::<lumbung::config::NodeConfig>(&dir.join("node1.toml"))
        .unwrap()
        .cluster
        .layout();
    let index_shard = layout.shard_for_bucket("demo", &env.bucket).0;
    let cycles = run_cycles(&plan, &mut cluster, &workload, index_shard).await;

    // Everything is healed; the clients go on until the cluster settled.
    let settled = cluster
        .settle(SETTLE_LIMIT, || workload.history.now())
        .await;
    tokio::time::sleep(AFTER_SETTLE).await;
    workload.stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let load_secs = workload.history.now().as_secs_f64();
    let final_reads = read_every_key(&env, &workload).await;
    cluster.reap(workload.history.now());

    let events = workload.history.events();
    let check_started = Instant::now();
    let checked = events.clone();
    let (verdict, failing_keys) = tokio::task::spawn_blocking(move || {
        let verdict = linearizable::check(&checked);
        // The check stops at the first failing key; count them all.
        let failing = match verdict {
            Ok(_) => Vec::new(),
            Err(_) => report::failing_keys(&checked),
        };
        (verdict, failing)
    })
    .await
    .unwrap();
    let check_took = check_started.elapsed();
    let lost = report::lost_writes(&events, &final_reads);
    let tally = workload.tally.lock().unwrap();
    let table = Report {
        seed: plan.seed,
        time_zero,
        faults: &plan.faults,
        cycles: &cycles,
        tally: &tally,
        lost: &lost,
        unexpected_exits: &cluster.unexpected_exits,
        verdict: &verdict,
        failing_keys: &failing_keys,
        check_took,
        planned_cycles: plan.cycles,
        load_secs,
    }
    .table();
    for c in &cycles {
        println!("{}", c.line(&tally.successes));
    }
    println!("{table}");

    let mut problems = Vec::new();
    if let Err(wrong) = &settled {
        let what: Vec<&str> = wrong.iter().map(|u| u.what.as_str()).collect();
        problems.push(format!(
            "the cluster did not settle after the last fault: {}",
            what.join(", ")
        ));
    }
    if let Some(c) = cycles.iter().find(|c| c.settled_in.is_err()) {
        problems.push(format!(
            "the cluster did not settle after cycle {}",
            c.number
        ));
    }
    if final_reads.len() < KEYS {
        problems.push(format!(
            "only {} of {KEYS} keys could be read at the end",
            final_reads.len()
        ));
    }
    if !lost.is_empty() {
        problems.push(format!("{} acknowledged writes lost", lost.len()));
    }
    if !cluster.unexpected_exits.is_empty() {
        problems.push("processes ended by themselves".into());
    }
    if !tally.oddities.is_empty() {
        problems.push("clients saw values no client wrote".into());
    }
    if let Err(e) = &verdict {
        println!("---- checker ----\n{e}");
        problems.push("the history is not linearizable (or could not be checked)".into());
    }
    // The issue allows a 503 for a write whose outcome is unknown (and a
    // 507 refusing a write on a full disk), no other 5xx: a failure with
    // NEMESIS_STRICT_5XX=1, and always worth the logs.
    let disallowed_5xx: u64 = tally.disallowed_5xx().map(|(_, n)| n).sum();
    if disallowed_5xx > 0 && plan.strict_5xx {
        problems.push(format!(
            "{disallowed_5xx} answers were a 5xx the issue does not allow"
        ));
    }
    if !problems.is_empty() || plan.keep || disallowed_5xx > 0 {
        let keep = report::evidence_dir();
        std::fs::create_dir_all(&keep).unwrap();
        cluster.procs.copy_logs(&keep);
        std::fs::write(keep.join("summary.txt"), &table).unwrap();
        std::fs::write(keep.join("history.txt"), report::history_text(&events)).unwrap();
        if let Err(e) = &verdict {
            std::fs::write(keep.join("violation.txt"), e.to_string()).unwrap();
        }
        // The nodes' files too (Raft logs, stores: a few MiB), taken after
        // stopping them so that nothing changes while they are copied.
        cluster.stop_all();
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(dir.join("data"))
            .arg(&keep)
            .status();
        if !copied.is_ok_and(|s| s.success()) {
            println!("could not copy the nodes' data into the evidence");
        }
        println!("evidence kept in {}", keep.display());
    }
    if !problems.is_empty() {
        let found = problems.join("; ");
        cluster.procs.fail(30, format!("nemesis found: {found}"));
    }
}

/// The plan's fault cycles, one after the other; stops early when the
/// cluster does not settle after one (what follows would only measure the
/// damage already done).
async fn run_cycles(
    plan: &Plan,
    cluster: &mut Cluster,
    workload: &Workload,
    index_shard: u32,
) -> Vec<Cycle> {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut cycles = Vec::new();
    for number in 0..plan.cycles {
        let step = plan.step(number, &mut rng);
        let cycle = run_cycle(cluster, workload, index_shard, number, step).await;
        let successes = workload.tally.lock().unwrap().successes.clone();
        println!("{}", cycle.line(&successes));
        let unsettled = cycle.settled_in.is_err();
        cycles.push(cycle);
        if unsettled {
            println!("!! the cluster did not settle: no more faults");
            break;
        }
    }
    cycles
}

/// Waits until the gateway serves the bucket.
async fn wait_for_s3(s3: &aws_sdk_s3::Client, env: &S3Env, cluster: &Cluster) {
    let started = Instant::now();
    while s3.head_bucket().bucket(&env.bucket).send().await.is_err() {
        if started.elapsed() > Duration::from_secs(90) {
            cluster.procs.fail(30, "the cluster never served S3".into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Listings name values by ETag, which the clients compute as the body's
/// MD5: make sure the store agrees.
async fn assert_etags_are_md5(s3: &aws_sdk_s3::Client, bucket: &str) {
    let body = b"etag probe".to_vec();
    let put = s3
        .put_object()
        .bucket(bucket)
        .key("probe/etag")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .expect("a PUT on a healthy cluster");
    let etag = put.e_tag().unwrap_or("").trim_matches('"').to_string();
    assert_eq!(etag, hex::encode(Md5::digest(&body)), "ETags are not MD5s");
}

/// One fault cycle: inject, hold under load, heal, wait for the cluster to
/// settle, then a little more load on the healed cluster.
async fn run_cycle(
    cluster: &mut Cluster,
    workload: &Workload,
    index_shard: u32,
    number: usize,
    step: Step,
) -> Cycle {
    let clock = || workload.history.now();
    let (fault, hold) = (step.fault, step.hold);
    let leader = cluster.leader_of(index_shard).await;
    let node = match leader {
        Some(l) if step.on_leader => l,
        Some(l) => (1..=NODES).filter(|n| *n != l).nth(step.follower).unwrap(),
        None => number % NODES + 1,
    };
    let pauses_before = cluster.pauses_logged(node);
    let exits_before = cluster.unexpected_exits.len();
    let started = clock();
    let what = cluster.inject(fault, node, step.disk_left);
    println!("cycle {number:>2}: {what} for {:.1} s", hold.as_secs_f64());
    let until = Instant::now() + hold;
    while Instant::now() < until {
        // A process that dies of the fault is restarted once it is healed.
        cluster.reap(clock());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cluster.heal(fault, node);
    let healed = clock();
    cluster.reap(clock());
    cluster.restart_missing();
    let settled = cluster.settle(SETTLE_LIMIT, clock).await;
    let mut notes = Vec::new();
    if let Err(wrong) = &settled {
        notes.extend(restart_to_recover(cluster, wrong, clock).await);
    }
    tokio::time::sleep(AFTER_SETTLE).await;
    cluster.reap(clock());
    cluster.restart_missing();

    notes.splice(
        0..0,
        cluster.unexpected_exits[exits_before..].iter().cloned(),
    );
    if fault == Fault::Pause {
        // The watchdog logs each pause it sees, and must leave the node be.
        let seen = cluster.pauses_logged(node) > pauses_before;
        let ended = notes
            .iter()
            .any(|n| n.starts_with(&format!("node {node} ")));
        notes.push(format!(
            "watchdog {} the pause, node {}",
            if seen { "saw" } else { "did NOT log" },
            if ended { "ENDED" } else { "still running" }
        ));
    }
    Cycle {
        number,
        fault,
        node,
        was_leader: leader == Some(node),
        started,
        healed,
        ended: clock(),
        settled_in: settled.map_err(|wrong| wrong.into_iter().map(|u| u.what).collect()),
        notes,
    }
}

/// What a supervisor would try for a node that stays behind: restart it
/// (SIGKILL, start), then wait again. Returns what came of it, for the
/// record; the cycle stays unsettled either way.
async fn restart_to_recover(
    cluster: &mut Cluster,
    wrong: &[Unsettled],
    clock: impl Fn() -> Duration + Copy,
) -> Vec<String> {
    let mut lagging: Vec<usize> = wrong.iter().filter_map(|u| u.node).collect();
    lagging.dedup();
    let mut notes = Vec::new();
    for node in lagging {
        cluster.procs.kill(node);
        cluster.procs.spawn(node);
        let outcome = match cluster.settle(SETTLE_LIMIT, clock).await {
            Ok(took) => format!("settled {:.1} s after that", took.as_secs_f64()),
            Err(still) => {
                let what: Vec<String> = still.into_iter().map(|u| u.what).collect();
                format!("still unsettled: {}", what.join(", "))
            }
        };
        notes.push(format!(
            "restarted node {node} as a supervisor would: {outcome}"
        ));
    }
    notes
}

/// The last GET of every key, on the settled cluster: each retried until
/// it gets a definite answer (every try recorded), within one shared
/// deadline. Returns what each key read held.
async fn read_every_key(env: &S3Env, workload: &Arc<Workload>) -> BTreeMap<String, Option<u64>> {
    let mut reader = Client::new(0, s3_client(env), workload.clone(), 0);
    let mut reads = BTreeMap::new();
    let deadline = Instant::now() + SETTLE_LIMIT;
    for key in 0..KEYS {
        while Instant::now() < deadline {
            if let Outcome::Ok(Observed::Read(value)) = reader.get(key).await {
                reads.insert(key_name(key), value);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    reads
}
