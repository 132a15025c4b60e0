//! Real `lumbung node` and `lumbung gateway` processes, for the tests that
//! kill them with SIGKILL. Each process logs to `DIR/nodeN.log` or
//! `DIR/gateway0.log`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The cluster's processes by slot: 0 is the gateway, N is node N.
pub struct Processes {
    dir: PathBuf,
    children: BTreeMap<usize, Child>,
}

impl Processes {
    /// No processes yet, for the cluster folder `dir`.
    pub fn new(dir: &Path) -> Self {
        Processes {
            dir: dir.to_path_buf(),
            children: BTreeMap::new(),
        }
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
        let child = Command::new(env!("CARGO_BIN_EXE_lumbung"))
            .args([what, "--config"])
            .arg(self.dir.join(file))
            .env(
                "RUST_LOG",
                "warn,openraft=error,lumbung::shard=info,lumbung::node=info",
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.insert(slot, child);
    }

    /// SIGKILL: no shutdown path runs, exactly like a power cut of the process.
    pub fn kill(&mut self, slot: usize) {
        if let Some(mut c) = self.children.remove(&slot) {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The end of every process's log, so a failure in CI can be read.
    /// With `KEEP_LOGS=DIR` set, whole logs are copied there too.
    pub fn print_log_tails(&self, lines: usize) {
        if let Some(keep) = std::env::var_os("KEEP_LOGS") {
            let _ = std::fs::create_dir_all(&keep);
            for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let _ = std::fs::copy(entry.path(), Path::new(&keep).join(entry.file_name()));
                }
            }
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
