//! Fail-stop: a process whose runtime or storage stops making progress
//! exits, so that its supervisor (systemd's `Restart=always`, see
//! `config/lumbung-node.service`) starts it again.
//!
//! A stuck node is worse than a dead one. Its peers and gateways keep
//! sending it work that never finishes, its listen backlog fills, and
//! nothing is logged. A dead node is replaced at once: Raft elects new
//! leaders, gateways route around it, and the restarted process recovers
//! from its log. So each process registers probes, parts that prove they
//! are alive by beating at least once a second: the tokio runtime (a task
//! that ticks), and on a node the state store, the meta store and the log
//! fsync (each a small write that must finish). A thread of its own, not a
//! tokio task, looks at them; when one has not beaten for `stall_secs`, it
//! logs which part is stuck and exits with [`EXIT_STALLED`].
//!
//! A process that was paused as a whole (SIGSTOP, a suspended VM) comes
//! back with every probe old; the watchdog then sees that it missed its
//! own ticks too, and starts counting again instead of exiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The exit code of a process the watchdog stopped: distinct from a crash
/// (101, a panic) and a bad start (1), so a supervisor's log tells them
/// apart. 75 is EX_TEMPFAIL: a restart is expected to help.
pub const EXIT_STALLED: i32 = 75;

/// How often the watchdog looks, and probes are expected to beat.
pub const TICK: Duration = Duration::from_millis(500);

/// One part of the process that proves it is alive by beating.
pub struct Probe {
    /// What is stuck, in the log line, if this stops beating.
    name: String,
    /// Milliseconds since the watchdog started, at the last beat.
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Probe {
    pub fn beat(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn age(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// The watchdog of one process.
pub struct Watchdog {
    stall: Duration,
    epoch: Instant,
    probes: Arc<Mutex<Vec<Arc<Probe>>>>,
}

/// What the watchdog makes of one look.
#[derive(Debug, PartialEq)]
enum Verdict {
    Alive,
    /// The watchdog itself was not scheduled for a long while: the whole
    /// process was paused, so the probes could not beat either.
    Paused,
    Stalled {
        part: String,
        for_: Duration,
    },
}

/// Judges probe ages, given how long the watchdog's own sleep lasted.
fn judge(stall: Duration, slept: Duration, ages: &[(&str, Duration)]) -> Verdict {
    if slept > TICK * 4 {
        return Verdict::Paused;
    }
    ages.iter()
        .filter(|(_, age)| *age > stall)
        .max_by_key(|(_, age)| *age)
        .map_or(Verdict::Alive, |(part, age)| Verdict::Stalled {
            part: part.to_string(),
            for_: *age,
        })
}

impl Watchdog {
    /// Starts watching; `stall_secs` 0 means never stop the process (the
    /// probes still run, and a stall is only logged).
    pub fn start(stall_secs: u64) -> Watchdog {
        let dog = Watchdog {
            stall: Duration::from_secs(stall_secs),
            epoch: Instant::now(),
            probes: Arc::new(Mutex::new(Vec::new())),
        };
        let (probes, stall) = (dog.probes.clone(), dog.stall);
        let epoch = dog.epoch;
        std::thread::Builder::new()
            .name("lumbung-watchdog".into())
            .spawn(move || watch(epoch, stall, probes))
            .expect("spawning the watchdog thread");
        dog
    }

    /// A new probe named `name`, counted as alive from now.
    pub fn probe(&self, name: impl Into<String>) -> Arc<Probe> {
        let probe = Arc::new(Probe {
            name: name.into(),
            last_ms: AtomicU64::new(0),
            epoch: self.epoch,
        });
        probe.beat();
        self.probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(probe.clone());
        probe
    }

    /// Watches the tokio runtime this is called on: a task that beats on
    /// every tick runs only while some worker is free to run it.
    pub fn watch_runtime(&self) {
        let probe = self.probe("the tokio runtime (no task has run)");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                probe.beat();
            }
        });
    }

    /// Beats `name`'s probe each time `check` finishes, one tick apart:
    /// `check` is a small piece of real work that hangs when the part it
    /// exercises hangs.
    pub fn watch<F, Fut>(&self, name: impl Into<String>, check: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
    {
        let probe = self.probe(name);
        tokio::spawn(async move {
            loop {
                match check().await {
                    Ok(()) => probe.beat(),
                    Err(e) => tracing::warn!(part = %probe.name, "watchdog probe failed: {e:#}"),
                }
                tokio::time::sleep(TICK).await;
            }
        });
    }
}

fn watch(epoch: Instant, stall: Duration, probes: Arc<Mutex<Vec<Arc<Probe>>>>) {
    let mut last_look = Instant::now();
    loop {
        std::thread::sleep(TICK);
        let slept = last_look.elapsed();
        last_look = Instant::now();
        let probes: Vec<Arc<Probe>> = probes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let now_ms = epoch.elapsed().as_millis() as u64;
        let ages: Vec<(&str, Duration)> = probes
            .iter()
            .map(|p| (p.name.as_str(), p.age(now_ms)))
            .collect();
        match judge(stall.max(TICK * 2), slept, &ages) {
            Verdict::Alive => {}
            Verdict::Paused => {
                tracing::warn!(paused_for = ?slept, "the process was paused; the watchdog counts afresh");
                probes.iter().for_each(|p| p.beat());
            }
            Verdict::Stalled { part, for_ } if !stall.is_zero() => {
                tracing::error!(
                    %part,
                    stuck_for = ?for_,
                    "stalled: exiting with code {EXIT_STALLED} so that a supervisor restarts this process"
                );
                std::process::exit(EXIT_STALLED);
            }
            Verdict::Stalled { part, for_ } => {
                tracing::error!(%part, stuck_for = ?for_, "stalled (the watchdog is set not to stop the process)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(10);

    #[test]
    fn fresh_probes_are_alive() {
        let ages = [
            ("runtime", Duration::from_millis(400)),
            ("log", Duration::from_secs(9)),
        ];
        assert_eq!(judge(STALL, TICK, &ages), Verdict::Alive);
    }

    #[test]
    fn the_oldest_stuck_part_is_named() {
        let ages = [
            ("runtime", Duration::from_millis(400)),
            ("state store", Duration::from_secs(11)),
            ("log fsync", Duration::from_secs(14)),
        ];
        assert_eq!(
            judge(STALL, TICK, &ages),
            Verdict::Stalled {
                part: "log fsync".into(),
                for_: Duration::from_secs(14)
            }
        );
    }

    #[test]
    fn a_paused_process_is_not_a_stalled_one() {
        // SIGSTOP for 30 s: every probe is old, and so is the watchdog's
        // own last look.
        let ages = [("runtime", Duration::from_secs(30))];
        assert_eq!(
            judge(STALL, Duration::from_secs(30), &ages),
            Verdict::Paused
        );
    }

    #[test]
    fn probes_age_from_their_last_beat() {
        let dog = Watchdog {
            stall: STALL,
            epoch: Instant::now() - Duration::from_secs(100),
            probes: Arc::new(Mutex::new(Vec::new())),
        };
        let p = dog.probe("part");
        let now_ms = dog.epoch.elapsed().as_millis() as u64;
        assert!(p.age(now_ms) < Duration::from_secs(1));
        assert!(p.age(now_ms + 12_000) >= Duration::from_secs(12));
    }
}
