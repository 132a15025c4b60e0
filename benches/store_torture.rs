//! The state-store torture test: drives a store the way a busy node does,
//! only harder, until it stalls or the time is up.
//!
//! A node under a 4 KiB PUT load applies one entry per object to one of
//! its shards (reads of the old object and the bucket's usage, then an
//! atomic write of the object, the usage and the applied mark) in its state
//! store, records chunks, saves each shard's committed id on every commit
//! in its meta store, answers reads and range scans, persists the meta
//! store for votes and purges and the state store for checkpoints. Here
//! threads do each of these without pause on 64 shards, on whatever cores
//! the machine has. A monitor watches each kind of work: if one makes no
//! progress for `--stall-secs`, it takes this process's stacks with gdb,
//! prints them, and exits with code 2.
//!
//! ```sh
//! cargo bench --bench store_torture -- --seconds 1800             # redb
//! cargo bench --features engine-comparison --bench store_torture -- --engine sled
//! cargo bench --bench store_torture -- --objects 1000000          # memory after 1M objects
//! ```
//!
//! It prints each kind's rate every `--report-every` seconds and at the
//! end, with the longest single call, the process's memory and the store's
//! size on disk.

use clap::Parser;
use lumbung::store::{Batch, Store};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// redb (the store Lumbung uses); with `--features engine-comparison`
    /// also sled and fjall.
    #[arg(long, default_value = "redb")]
    engine: String,
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Stop once this many objects were written instead (the memory
    /// figure: distinct keys, 4 KiB each).
    #[arg(long)]
    objects: Option<u64>,
    /// Declare a stall when one kind of work makes no progress this long.
    #[arg(long, default_value_t = 10)]
    stall_secs: u64,
    #[arg(long, default_value_t = 64)]
    shards: u32,
    /// Distinct object keys per shard (writes beyond them overwrite).
    #[arg(long, default_value_t = 10_000)]
    keys_per_shard: u64,
    #[arg(long, default_value_t = 4096)]
    value_bytes: usize,
    /// Every Nth object is 64 KiB (the largest inline body); 0: none.
    #[arg(long, default_value_t = 0)]
    large_every: u64,
    /// Every Nth entry deletes an object instead; 0: none. Overwrites and
    /// deletes free pages, which is what sled's deadlock needs.
    #[arg(long, default_value_t = 0)]
    delete_every: u64,
    /// One store for votes and state machines, as Lumbung used sled, or
    /// two (state and meta), as it uses redb.
    #[arg(long, default_value = "two", value_parser = ["one", "two"])]
    stores: String,
    /// Threads applying entries (a node's blocking pool runs many).
    #[arg(long, default_value_t = 8)]
    appliers: usize,
    #[arg(long, default_value_t = 2)]
    committers: usize,
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// Pause between persists of the meta store (votes and purges).
    #[arg(long, default_value_t = 10)]
    meta_persist_ms: u64,
    /// Pause between persists of the state store (checkpoints: 64 shards
    /// each checkpointing every 20,000 entries, at about 16,000 entries a
    /// second, is one a second).
    #[arg(long, default_value_t = 1000)]
    state_persist_ms: u64,
    /// Cache of the store, in MiB (the node's default is 32).
    #[arg(long, default_value_t = 32)]
    cache_mib: usize,
    /// Where the store lives; a fresh folder under /var/tmp by default.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 10)]
    report_every: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Progress of one kind of work.
#[derive(Default)]
struct Kind {
    ops: AtomicU64,
    /// Longest single call, in microseconds.
    longest_us: AtomicU64,
}

impl Kind {
    fn done(&self, started: Instant) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.longest_us
            .fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// Every kind of work, by name.
struct Work {
    apply: Kind,
    commit: Kind,
    read: Kind,
    persist_meta: Kind,
    persist_state: Kind,
    /// Distinct objects written so far (first writes of a key).
    objects: AtomicU64,
    stop: AtomicBool,
}

impl Work {
    fn kinds(&self) -> [(&'static str, &Kind); 5] {
        [
            ("apply", &self.apply),
            ("commit", &self.commit),
            ("read", &self.read),
            ("persist-meta", &self.persist_meta),
            ("persist-state", &self.persist_state),
        ]
    }
}

/// A fresh store named `name` in `dir`.
fn open(engine: &str, dir: &std::path::Path, name: &str, cache: usize) -> Store {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).expect("a folder for the store");
    match engine {
        "redb" => Store::open(&dir.join("store.redb"), cache).expect("opening redb"),
        #[cfg(feature = "engine-comparison")]
        "sled" => Store::with_engine(lumbung::store::sled::Sled::open(&dir, cache).expect("sled")),
        #[cfg(feature = "engine-comparison")]
        "fjall" => {
            Store::with_engine(lumbung::store::fjall::Fjall::open(&dir, cache).expect("fjall"))
        }
        other => {
            panic!("unknown engine {other} (sled and fjall need --features engine-comparison)")
        }
    }
}

/// A small xorshift generator: the workload needs speed, not quality.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn object_key(n: u64) -> Vec<u8> {
    format!("Otenant\0bucket\0object-{n:08}").into_bytes()
}

const USAGE: &[u8] = b"Ztenant\0bucket";
const APPLIED: &[u8] = b"\xffapplied";

/// One PutObject's apply: read the old object and the usage, then write
/// the object, the usage and the applied mark at once. Every tenth entry
/// records chunks instead, as a chunk shard's entries do.
fn apply_entry(store: &Store, args: &Args, rng: &mut Rng, seq: u64, work: &Work) {
    let shard = 1 + rng.below(args.shards as u64 - 1);
    let space = format!("sm/{shard}");
    let n = rng.below(args.keys_per_shard);
    let large = args.large_every > 0 && seq.is_multiple_of(args.large_every);
    let mut value = vec![0u8; if large { 64 << 10 } else { args.value_bytes }];
    value[..8].copy_from_slice(&seq.to_le_bytes());
    store
        .write(&space, |w| {
            let mut b = Batch::default();
            if seq.is_multiple_of(10) {
                for i in 0..3u64 {
                    let id = blake3::hash(&(seq * 3 + i).to_le_bytes());
                    let mut k = vec![b'C'];
                    k.extend_from_slice(id.as_bytes());
                    b.insert(k, 4_194_304u64.to_le_bytes().to_vec());
                }
            } else if args.delete_every > 0 && seq.is_multiple_of(args.delete_every) {
                b.remove(object_key(n));
            } else {
                let key = object_key(n);
                if w.get(&key)?.is_none() {
                    work.objects.fetch_add(1, Ordering::Relaxed);
                }
                let usage = w
                    .get(USAGE)?
                    .and_then(|u| Some(u64::from_le_bytes(u.try_into().ok()?)))
                    .unwrap_or(0);
                b.insert(key, value);
                b.insert(USAGE, (usage + 1).to_le_bytes().to_vec());
            }
            b.insert(APPLIED, seq.to_le_bytes().to_vec());
            w.apply(b)
        })
        .expect("applying an entry");
}

/// The node's two stores.
struct Stores {
    state: Store,
    meta: Store,
}

fn spawn_workers(
    stores: &Stores,
    args: &Arc<Args>,
    work: &Arc<Work>,
) -> Vec<std::thread::JoinHandle<()>> {
    let store = &stores.state;
    let mut threads = Vec::new();
    let seq = Arc::new(AtomicU64::new(1));
    for t in 0..args.appliers {
        let (store, args, work, seq) = (store.clone(), args.clone(), work.clone(), seq.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
            while !work.stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let s = seq.fetch_add(1, Ordering::Relaxed);
                apply_entry(&store, &args, &mut rng, s, &work);
                work.apply.done(started);
            }
        }));
    }
    for t in 0..args.committers {
        let (store, args, work) = (stores.meta.clone(), args.clone(), work.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (t as u64 + 1));
            let mut i = 0u64;
            while !work.stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let shard = rng.below(args.shards as u64);
                let mut b = Batch::default();
                b.insert(b"committed".to_vec(), i.to_le_bytes().to_vec());
                store
                    .apply(&format!("vote/{shard}"), b)
                    .expect("saving a committed id");
                work.commit.done(started);
                i += 1;
            }
        }));
    }
    for t in 0..args.readers {
        let (store, args, work) = (store.clone(), args.clone(), work.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0xA076_1D64_78BD_642F ^ (t as u64 + 1));
            let mut i = 0u64;
            while !work.stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let space = format!("sm/{}", 1 + rng.below(args.shards as u64 - 1));
                let r = store.read(&space).expect("reading");
                let key = object_key(rng.below(args.keys_per_shard));
                if i.is_multiple_of(10) {
                    // A listing page.
                    for kv in r.range(&key, None).expect("listing").take(100) {
                        std::hint::black_box(kv.expect("listing"));
                    }
                } else {
                    std::hint::black_box(r.get(&key).expect("reading"));
                }
                work.read.done(started);
                i += 1;
            }
        }));
    }
    let persisters = [
        (stores.meta.clone(), args.meta_persist_ms, true),
        (stores.state.clone(), args.state_persist_ms, false),
    ];
    for (store, pause, meta) in persisters {
        let work = work.clone();
        threads.push(std::thread::spawn(move || {
            while !work.stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                store.persist().expect("persisting");
                let kind = if meta {
                    &work.persist_meta
                } else {
                    &work.persist_state
                };
                kind.done(started);
                std::thread::sleep(Duration::from_millis(pause));
            }
        }));
    }
    threads
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn disk_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                // Allocated blocks, not the apparent length.
                Ok(m) => total += std::os::unix::fs::MetadataExt::blocks(&m) * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// Prints every thread's stack (this process, through gdb) and exits 2.
fn dump_stacks_and_exit(what: &str) -> ! {
    println!("STALL: {what}; this process's stacks follow (gdb)");
    let out = std::process::Command::new("gdb")
        .args(["-p", &std::process::id().to_string(), "-batch"])
        .args(["-ex", "thread apply all bt"])
        .output();
    match out {
        Ok(o) => println!("{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => println!("could not run gdb: {e}"),
    }
    std::process::exit(2);
}

fn main() {
    let args = Arc::new(Args::parse());
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("lumbung-torture.")
                .tempdir_in("/var/tmp")
                .expect("a folder under /var/tmp");
            tmp.path().to_path_buf()
        }
    };
    let state = open(&args.engine, &dir, "state", args.cache_mib << 20);
    let stores = Stores {
        meta: match args.stores.as_str() {
            "one" => state.clone(),
            _ => open(&args.engine, &dir, "meta", 8 << 20),
        },
        state,
    };
    let work = Arc::new(Work {
        apply: Kind::default(),
        commit: Kind::default(),
        read: Kind::default(),
        persist_meta: Kind::default(),
        persist_state: Kind::default(),
        objects: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    println!(
        "engine={} stores={} shards={} keys/shard={} appliers={} committers={} readers={} persist meta every {}ms, state every {}ms, value={}B large-every={} delete-every={} cache={}MiB dir={}",
        args.engine,
        args.stores,
        args.shards,
        args.keys_per_shard,
        args.appliers,
        args.committers,
        args.readers,
        args.meta_persist_ms,
        args.state_persist_ms,
        args.value_bytes,
        args.large_every,
        args.delete_every,
        args.cache_mib,
        dir.display()
    );
    let threads = spawn_workers(&stores, &args, &work);

    let start = Instant::now();
    let stall = Duration::from_secs(args.stall_secs);
    let mut last_seen: Vec<(u64, Instant)> = work
        .kinds()
        .iter()
        .map(|(_, k)| (k.ops.load(Ordering::Relaxed), start))
        .collect();
    let mut last_report = (
        start,
        work.kinds().map(|(_, k)| k.ops.load(Ordering::Relaxed)),
    );
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        for (i, (name, kind)) in work.kinds().iter().enumerate() {
            let ops = kind.ops.load(Ordering::Relaxed);
            if ops != last_seen[i].0 {
                last_seen[i] = (ops, now);
            } else if now - last_seen[i].1 > stall {
                dump_stacks_and_exit(&format!(
                    "no {name} finished for {:.0} s, {:.0} s into the run",
                    (now - last_seen[i].1).as_secs_f64(),
                    (now - start).as_secs_f64()
                ));
            }
        }
        if now - last_report.0 >= Duration::from_secs(args.report_every) {
            let secs = (now - last_report.0).as_secs_f64();
            let counts = work.kinds().map(|(_, k)| k.ops.load(Ordering::Relaxed));
            let rates: Vec<String> = work
                .kinds()
                .iter()
                .zip(counts.iter().zip(last_report.1.iter()))
                .map(|((name, _), (now, before))| {
                    format!("{name}={:.0}/s", (now - before) as f64 / secs)
                })
                .collect();
            println!(
                "t={:.0}s {} objects={} rss={}MiB",
                (now - start).as_secs_f64(),
                rates.join(" "),
                work.objects.load(Ordering::Relaxed),
                status_kib("VmRSS:") / 1024
            );
            last_report = (now, counts);
        }
        let done = match args.objects {
            Some(n) => work.objects.load(Ordering::Relaxed) >= n,
            None => now - start >= Duration::from_secs(args.seconds),
        };
        if done {
            break;
        }
    }
    work.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a worker panicked");
    }
    stores.state.persist().expect("a last persist");
    stores.meta.persist().expect("a last persist");
    let secs = start.elapsed().as_secs_f64();
    for (name, kind) in work.kinds() {
        let ops = kind.ops.load(Ordering::Relaxed);
        println!(
            "{name}: {ops} in {secs:.0} s = {:.0}/s, longest call {:.1} ms",
            ops as f64 / secs,
            kind.longest_us.load(Ordering::Relaxed) as f64 / 1000.0
        );
    }
    println!(
        "objects={} rss={}MiB peak={}MiB disk={}MiB no stall",
        work.objects.load(Ordering::Relaxed),
        status_kib("VmRSS:") / 1024,
        status_kib("VmHWM:") / 1024,
        disk_bytes(&dir) >> 20
    );
}
