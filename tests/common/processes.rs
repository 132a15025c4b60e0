//! Real `lumbung node` and `lumbung gateway` processes, for the tests that
//! kill them with SIGKILL (or pause them with SIGSTOP). Each process logs to
//! `DIR/nodeN.log` or `DIR/gateway0.log`, and may run in a network
//! namespace of its own.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// The cluster's processes by slot: 0 is the gateway, N is node N.
pub struct Processes {
    dir: PathBuf,
    children: BTreeMap<usize, Child>,
    /// The network namespace a slot is started in (`ip netns exec`, which
    /// execs the program, so a child's PID is lumbung's own).
    namespaces: BTreeMap<usize, String>,
    /// The `lumbung` executable to start.
    binary: PathBuf,
}

impl Processes {
    /// No processes yet, for the cluster folder `dir`.
    pub fn new(dir: &Path) -> Self {
        Processes {
            dir: dir.to_path_buf(),
            children: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            binary: PathBuf::from(env!("CARGO_BIN_EXE_lumbung")),
        }
    }

    /// Starts processes from `binary` instead of cargo's `lumbung`.
    pub fn use_binary(&mut self, binary: &Path) {
        self.binary = binary.to_path_buf();
    }

    /// Starts `slot` inside network namespace `ns` from now on.
    pub fn run_in_namespace(&mut self, slot: usize, ns: &str) {
        self.namespaces.insert(slot, ns.to_string());
    }

    fn log_name(slot: usize) -> String {
        if slot == 0 {
            "gateway0.log".into()
        } else {
            format!("node{slot}.log")
        }
    }

    /// Starts the gateway (slot 0) or node `slot` from its config file.
    pub fn spawn(&mut self, slot: usize) {
        let (what, file) = if slot == 0 {
            ("gateway", "gateway.toml".to_string())
        } else {
            ("node", format!("node{slot}.toml"))
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(Self::log_name(slot)))
            .unwrap();
        let bin = self.binary.as_os_str();
        let mut command = match self.namespaces.get(&slot) {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                // A process left running in a namespace outlives nothing
                // it needs: if the test is killed (no Drop runs), so is it.
                // SAFETY: prctl is async-signal-safe; it only sets a flag.
                unsafe {
                    c.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .args([what, "--config"])
            .arg(self.dir.join(file))
            .env("RUST_LOG", process_log_filter())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.insert(slot, child);
    }

    /// SIGKILL: no shutdown path runs, exactly like a power cut of the
    /// process (a stopped process dies too).
    pub fn kill(&mut self, slot: usize) {
        if let Some(mut c) = self.children.remove(&slot) {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The PID of `slot`, if it runs.
    pub fn pid(&self, slot: usize) -> Option<u32> {
        self.children.get(&slot).map(Child::id)
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to `slot`, if it runs.
    pub fn signal(&self, slot: usize, signal: i32) {
        if let Some(pid) = self.pid(slot) {
            // SAFETY: kill(2) on a child we have not reaped: the PID is ours.
            let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
            assert_eq!(
                rc,
                0,
                "kill({pid}, {signal}): {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// The processes that ended by themselves since the last call, reaped
    /// and forgotten, with how they ended.
    pub fn reap_exited(&mut self) -> Vec<(usize, ExitStatus)> {
        let mut ended = Vec::new();
        for (slot, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                ended.push((*slot, status));
            }
        }
        for (slot, _) in &ended {
            self.children.remove(slot);
        }
        ended
    }

    /// The log file of `slot`.
    pub fn log_path(&self, slot: usize) -> PathBuf {
        self.dir.join(Self::log_name(slot))
    }

    /// Copies every process's whole log into `to`.
    pub fn copy_logs(&self, to: &Path) {
        let _ = std::fs::create_dir_all(to);
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
            }
        }
    }

    /// The end of every process's log, so a failure in CI can be read.
    /// With `KEEP_LOGS=DIR` set, whole logs are copied there too.
    /// Fails the test: the reason first (CI shows the head of a long
    /// output), then the last `lines` of every log, then the panic.
    pub fn fail(&self, lines: usize, reason: String) -> ! {
        println!("FAILED: {reason}");
        self.print_log_tails(lines);
        panic!("{reason}");
    }

    fn print_log_tails(&self, lines: usize) {
        if let Some(keep) = std::env::var_os("KEEP_LOGS") {
            self.copy_logs(Path::new(&keep));
        }
        let mut slots: Vec<usize> = (0..=3).collect();
        slots.extend(self.children.keys().copied().filter(|s| *s > 3));
        for slot in slots {
            let name = Self::log_name(slot);
            let text = std::fs::read_to_string(self.dir.join(&name)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            println!("--- last lines of {name} ---");
            for line in &all[all.len().saturating_sub(lines)..] {
                println!("{line}");
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        let slots: Vec<usize> = self.children.keys().copied().collect();
        for slot in slots {
            self.kill(slot);
        }
    }
}

/// A copy of cargo's `lumbung` in `dir`, for a test that restarts
/// processes for minutes: worktrees sharing one target directory replace
/// `target/debug/lumbung` whenever one of them builds, and a restart must
/// not pick up another worktree's binary. Fails unless the copy was built
/// from this test's own source tree (its debug info names the folder it
/// was compiled in).
pub fn own_copy_of_lumbung(dir: &Path) -> PathBuf {
    let copy = dir.join("lumbung");
    std::fs::copy(env!("CARGO_BIN_EXE_lumbung"), &copy).unwrap();
    let image = std::fs::read(&copy).unwrap();
    let mut needle = env!("CARGO_MANIFEST_DIR").as_bytes().to_vec();
    needle.push(0);
    assert!(
        image.windows(needle.len()).any(|w| w == needle.as_slice()),
        "{} was not built from {} (or without debug info): build it here again",
        env!("CARGO_BIN_EXE_lumbung"),
        env!("CARGO_MANIFEST_DIR")
    );
    copy
}

/// Makes nodes 1 to 3 of the cluster in `dir` snapshot (and purge their
/// logs) every `entries` log entries, so a replica that falls behind or
/// joins catches up by snapshot.
pub fn set_snapshot_every(dir: &Path, entries: u64) {
    for id in 1..=3 {
        let p = dir.join(format!("node{id}.toml"));
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replace(
            "snapshot_every = 20000",
            &format!("snapshot_every = {entries}"),
        );
        std::fs::write(&p, text).unwrap();
    }
}

/// How many garbage collections the nodes in `dir` logged as finished.
pub fn collections_logged(dir: &Path) -> usize {
    (1..=9)
        .filter_map(|id| std::fs::read_to_string(dir.join(format!("node{id}.log"))).ok())
        .map(|log| log.matches("garbage collected").count())
        .sum()
}

/// Makes nodes 1-3 collect garbage every `interval_secs` with a grace of
/// `grace_secs`, so collections run beside the faults a test injects.
pub fn set_gc(dir: &Path, grace_secs: u64, interval_secs: u64) {
    for id in 1..=3 {
        let p = dir.join(format!("node{id}.toml"));
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("grace_secs = 3600", &format!("grace_secs = {grace_secs}"))
            .replace(
                "interval_secs = 900",
                &format!("interval_secs = {interval_secs}"),
            );
        std::fs::write(&p, text).unwrap();
    }
}

/// What the processes log: `LUMBUNG_TEST_LOG` (a `RUST_LOG` filter) when
/// set, to follow one fault in detail; warnings and the shards' and nodes'
/// own lines otherwise.
fn process_log_filter() -> String {
    std::env::var("LUMBUNG_TEST_LOG")
        .unwrap_or_else(|_| "warn,openraft=error,lumbung::shard=info,lumbung::node=info".into())
}
