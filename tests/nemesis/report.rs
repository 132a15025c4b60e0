//! What a nemesis run found: the cycles, the clients' tallies, the longest
//! unavailability per fault kind, acknowledged writes lost, and the
//! checker's verdict; printed as one table, and kept on disk when asked or
//! when something failed.

use crate::clients::{Answer, Tally};
use crate::cluster::Fault;
use crate::linearizable::{CheckError, Event, Observed, Op, Outcome, Summary, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One fault cycle as it happened (times on the history's clock).
pub struct Cycle {
    pub number: usize,
    pub fault: Fault,
    pub node: usize,
    /// Whether the node led the bucket's index shard when the fault began.
    pub was_leader: bool,
    pub started: Duration,
    pub healed: Duration,
    /// End of the cycle: the cluster settled and a little more.
    pub ended: Duration,
    /// How long the cluster took to settle after healing, or what was
    /// still wrong when the test gave up waiting.
    pub settled_in: Result<Duration, Vec<String>>,
    /// Anything noteworthy (the watchdog's view of a pause, exits).
    pub notes: Vec<String>,
}

impl Cycle {
    /// One line: what was done, when, how the cluster recovered, and the
    /// longest time without a successful call (given the successes).
    pub fn line(&self, successes: &[Duration]) -> String {
        let role = if self.was_leader {
            "leader"
        } else {
            "follower"
        };
        let settled = match &self.settled_in {
            Ok(d) => format!("settled {:.1} s after", d.as_secs_f64()),
            Err(wrong) => format!("NEVER SETTLED ({})", wrong.join(", ")),
        };
        let gap = longest_unavailability(successes, self.started, self.ended);
        let mut line = format!(
            "cycle {:>2}: {:<9} node {} ({role:<8}) {:>6.1} s .. {:>6.1} s, {settled}, unavailable {:.1} s",
            self.number,
            self.fault.name(),
            self.node,
            self.started.as_secs_f64(),
            self.healed.as_secs_f64(),
            gap.as_secs_f64(),
        );
        for n in &self.notes {
            let _ = write!(line, "; {n}");
        }
        line
    }
}

/// The longest time with no successful call that overlaps `[from, to]`,
/// counted from `from` at the earliest (`successes` sorted).
pub fn longest_unavailability(successes: &[Duration], from: Duration, to: Duration) -> Duration {
    let mut prev = from;
    let mut longest = Duration::ZERO;
    for &t in successes.iter().filter(|t| **t > from) {
        longest = longest.max(t - prev);
        prev = t;
        if t >= to {
            return longest;
        }
    }
    longest.max(to.saturating_sub(prev))
}

/// What a completed write left in the register, if it certainly wrote.
fn acknowledged_state(e: &Event) -> Option<Option<Value>> {
    match (&e.op, e.outcome) {
        (Op::Put(v), Outcome::Ok(Observed::Done)) => Some(Some(*v)),
        (Op::Delete, Outcome::Ok(Observed::Done)) => Some(None),
        (Op::PutIfAbsent(v), Outcome::Ok(Observed::Applied(true))) => Some(Some(*v)),
        (Op::PutIfMatch { new, .. }, Outcome::Ok(Observed::Applied(true))) => Some(Some(*new)),
        _ => None,
    }
}

/// What a write may have left, if it may have written at all.
fn possible_state(e: &Event) -> Option<Option<Value>> {
    match (&e.op, e.outcome) {
        (_, Outcome::Fail) | (_, Outcome::Ok(Observed::Applied(false))) => None,
        (Op::Put(v) | Op::PutIfAbsent(v), _) => Some(Some(*v)),
        (Op::PutIfMatch { new, .. }, _) => Some(Some(*new)),
        (Op::Delete, _) => Some(None),
        (Op::Get | Op::List, _) => None,
    }
}

/// Keys whose final read does not show the last acknowledged write, where
/// no write that may have come after it explains what was read: an
/// acknowledged write lost. (The checker judges every other case.)
pub fn lost_writes(events: &[Event], final_reads: &BTreeMap<String, Option<Value>>) -> Vec<String> {
    let mut lost = Vec::new();
    for (key, read) in final_reads {
        let of_key: Vec<&Event> = events.iter().filter(|e| &e.key == key).collect();
        let last = of_key
            .iter()
            .filter_map(|e| acknowledged_state(e).map(|s| (e, s)))
            .max_by_key(|(e, _)| e.completed);
        let Some((last, state)) = last else { continue };
        if state == *read {
            continue;
        }
        // A write that overlaps or follows the last one may be what stayed.
        let explained = of_key.iter().any(|e| {
            !std::ptr::eq(*e, *last)
                && e.completed.is_none_or(|c| c > last.invoked)
                && possible_state(e) == Some(*read)
        });
        if !explained {
            lost.push(format!(
                "{key}: last acknowledged write {} by client {} (completed at {:.3} s), final read saw {}",
                last.op,
                last.client,
                last.completed.unwrap_or_default().as_secs_f64(),
                read.map_or("no object".to_string(), |v| v.to_string())
            ));
        }
    }
    lost
}

/// Everything the summary table shows.
pub struct Report<'a> {
    pub seed: u64,
    /// The wall-clock time of the history's time zero (to find a moment
    /// of the history in the logs).
    pub time_zero: time::OffsetDateTime,
    pub faults: &'a [Fault],
    pub cycles: &'a [Cycle],
    pub tally: &'a Tally,
    pub lost: &'a [String],
    pub unexpected_exits: &'a [String],
    pub verdict: &'a Result<Summary, CheckError>,
    /// Keys whose history alone fails the check.
    pub failing_keys: &'a [String],
    pub planned_cycles: usize,
    pub check_took: Duration,
    pub load_secs: f64,
}

impl Report<'_> {
    pub fn table(&self) -> String {
        let t = self.tally;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== nemesis: seed {}, {} fault cycles, {:.0} s of load from {} (time 0 of the history) ==",
            self.seed,
            self.cycles.len(),
            self.load_secs,
            self.time_zero
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "{:<10} {:>6}  {:>14} {:>14} {:>14}",
            "fault", "cycles", "unavailability", "on a leader", "on a follower"
        );
        let longest = |cycles: &mut dyn Iterator<Item = &&Cycle>| {
            cycles
                .map(|c| longest_unavailability(&t.successes, c.started, c.ended))
                .max()
                .map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()))
        };
        for fault in self.faults {
            let of_kind: Vec<&Cycle> = self.cycles.iter().filter(|c| c.fault == *fault).collect();
            let _ = writeln!(
                out,
                "{:<10} {:>6}  {:>14} {:>14} {:>14}",
                fault.name(),
                of_kind.len(),
                longest(&mut of_kind.iter()),
                longest(&mut of_kind.iter().filter(|c| c.was_leader)),
                longest(&mut of_kind.iter().filter(|c| !c.was_leader)),
            );
        }
        let _ = writeln!(
            out,
            "ops: {} ok, {} fail, {} unknown (timeouts {}, transport errors {})",
            t.ok,
            t.fail,
            t.unknown,
            t.timeouts,
            t.transport.values().sum::<u64>()
        );
        for (op, [ok, fail, unknown]) in &t.by_op {
            let _ = writeln!(
                out,
                "  {op:<18} {ok:>7} ok {fail:>5} fail {unknown:>5} unknown"
            );
        }
        let list = |answers: &mut dyn Iterator<Item = (&Answer, &u64)>| {
            let all: Vec<String> = answers.map(|(a, n)| format!("{n} × {a}")).collect();
            if all.is_empty() {
                "none".to_string()
            } else {
                all.join(", ")
            }
        };
        let _ = writeln!(out, "5xx answers: {}", list(&mut t.five_xx()));
        let _ = writeln!(
            out,
            "5xx the issue does not allow (not a 503 or 507 on a write): {}",
            list(&mut t.disallowed_5xx())
        );
        let mut other = t.answers.iter().filter(|(a, _)| a.status < 500);
        let _ = writeln!(out, "4xx answers: {}", list(&mut other));
        for (e, n) in &t.transport {
            let _ = writeln!(out, "  transport: {n} × {e}");
        }
        let _ = writeln!(
            out,
            "slowest call: {:.1} s, {}",
            t.slowest.0.as_secs_f64(),
            t.slowest.1
        );
        for l in self.lost {
            let _ = writeln!(out, "lost: {l}");
        }
        let _ = writeln!(
            out,
            "processes that ended by themselves: {}",
            if self.unexpected_exits.is_empty() {
                "none".to_string()
            } else {
                self.unexpected_exits.join("; ")
            }
        );
        for o in &t.oddities {
            let _ = writeln!(out, "oddity: {o}");
        }
        let _ = match self.verdict {
            Ok(s) => writeln!(
                out,
                "checker: linearizable; {} keys, {} ops checked ({} unknown), {} dropped, {} steps (hardest key {}), {:.1} s",
                s.keys,
                s.ops_checked,
                s.unknown,
                s.dropped,
                s.steps,
                s.max_key_steps,
                self.check_took.as_secs_f64()
            ),
            Err(CheckError::NotLinearizable(v)) => {
                writeln!(out, "checker: NOT LINEARIZABLE, first on key {}", v.key)
            }
            Err(e) => writeln!(out, "checker: no verdict: {e}"),
        };
        // The run in four lines (benches/nemesis.sh picks them out).
        let _ = writeln!(
            out,
            "fault cycles run: {} of {} planned",
            self.cycles.len(),
            self.planned_cycles
        );
        let _ = writeln!(out, "acknowledged writes lost: {}", self.lost.len());
        let _ = writeln!(
            out,
            "linearizability violations: {} keys{}",
            self.failing_keys.len(),
            if self.failing_keys.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.failing_keys.join(", "))
            }
        );
        let longest: Vec<String> = self
            .faults
            .iter()
            .map(|f| {
                let gap = self
                    .cycles
                    .iter()
                    .filter(|c| c.fault == *f)
                    .map(|c| longest_unavailability(&t.successes, c.started, c.ended))
                    .max()
                    .unwrap_or_default();
                format!("{} {:.1} s", f.name(), gap.as_secs_f64())
            })
            .collect();
        let _ = writeln!(out, "longest unavailability: {}", longest.join(", "));
        out
    }
}

/// The keys whose own history is not linearizable (or too concurrent to
/// check), each checked alone.
pub fn failing_keys(events: &[Event]) -> Vec<String> {
    let keys: std::collections::BTreeSet<&str> = events.iter().map(|e| e.key.as_str()).collect();
    keys.into_iter()
        .filter(|key| {
            let of_key: Vec<Event> = events.iter().filter(|e| e.key == *key).cloned().collect();
            crate::linearizable::check(&of_key).is_err()
        })
        .map(str::to_string)
        .collect()
}

/// The whole history, one event a line, for the evidence folder.
pub fn history_text(events: &[Event]) -> String {
    let mut out = String::new();
    for (i, e) in events.iter().enumerate() {
        let completed = e
            .completed
            .map_or("-".to_string(), |c| format!("{:.3}", c.as_secs_f64()));
        let _ = writeln!(
            out,
            "{i:>7} client {} {:<14} {:<28} {:>9.3} {:>9} {:?}",
            e.client,
            e.key,
            e.op.to_string(),
            e.invoked.as_secs_f64(),
            completed,
            e.outcome
        );
    }
    out
}

/// A folder under /var/tmp for this run's evidence.
pub fn evidence_dir() -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Path::new("/var/tmp/lumbung-nemesis").join(format!("{stamp}-{}", std::process::id()))
}
