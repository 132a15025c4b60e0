//! A linearizability checker for histories recorded by nemesis tests.
//!
//! # Model
//!
//! Several clients run S3 operations against a cluster while nodes are
//! killed, paused and partitioned, and record every operation as an
//! [`Event`]: who called it, on which key, when it was invoked, when (and
//! whether) it completed, and what it returned. [`check`] then decides
//! whether some total order of the operations exists that (a) respects real
//! time: an operation that completed before another was invoked comes first,
//! and (b) explains every result by a sequential register.
//!
//! Every key is an independent register holding `Option<Value>` (`None`: no
//! object). Linearizability is compositional (Herlihy & Wing's locality, the
//! "P-compositionality" porcupine exploits), so each key's sub-history is
//! checked on its own. The operations ([`Op`]) are:
//!
//! - `Put(v)` sets `Some(v)`; `Delete` sets `None` (deleting a missing key
//!   also succeeds);
//! - `PutIfAbsent(v)` (`If-None-Match: *`) sets `Some(v)` only if the
//!   register is `None`, otherwise reports a failed precondition;
//! - `PutIfMatch { expected, new }` (`If-Match: <etag of expected>`) sets
//!   `Some(new)` only if the register holds `Some(expected)`;
//! - `Get` and `List` read the register. A `List` result is projected onto
//!   each key it concerns ("present with value v" or "absent"), and each
//!   projection is checked as a read of that key. So a listing is checked key
//!   by key, *not* for being one snapshot across keys: a listing that shows a
//!   new value of key A next to an old value of key B, which no single moment
//!   ever held, passes.
//!
//! Values should be unique per write (e.g. a counter written as the body), so
//! that a read names exactly the write it saw. The checker stays correct if
//! they are not, it just learns less from each read.
//!
//! # Use
//!
//! ```ignore
//! let history = Arc::new(History::new());
//! // In each client task, for each request:
//! let call = history.invoke(client, key, Op::PutIfAbsent(value));
//! let outcome = match s3_put_if_absent(key, value).await {
//!     Ok(_) => Outcome::Ok(Observed::Applied(true)),
//!     Err(e) if is_412(&e) => Outcome::Ok(Observed::Applied(false)),
//!     Err(e) if is_definite_4xx(&e) => Outcome::Fail,
//!     Err(_) => Outcome::Unknown, // timeout, reset, 5xx
//! };
//! history.complete(call, outcome);
//! // After the nemesis:
//! if let Err(e) = history.check() {
//!     panic!("{e}");
//! }
//! ```
//!
//! # Outcomes
//!
//! - [`Outcome::Ok`]: completed at a known time with a known result. A 412
//!   answer to a conditional put is `Ok(Observed::Applied(false))`.
//! - [`Outcome::Fail`]: definitely had no effect (e.g. a 4xx that guarantees
//!   no change). Such events are dropped before the search; a read that sees
//!   a failed write's value is therefore a violation.
//! - [`Outcome::Unknown`]: may or may not have taken effect, at any moment
//!   after its invocation (timeout, reset connection, 5xx). Its completion
//!   time is treated as +infinity. Unknown reads constrain nothing and are
//!   dropped; unknown writes are optional: the search may place them anywhere
//!   after their invocation, or nowhere.
//!
//! # Algorithm
//!
//! Wing & Gong's search with Lowe's just-in-time linearization and
//! memoization, as in porcupine (Athalye) and Knossos' linear checker. The
//! invocations and completions of a key's operations are sorted by time into
//! a doubly linked list (calls before returns at equal times, so operations
//! whose intervals touch count as concurrent: the lenient reading). A
//! depth-first search repeatedly picks an operation whose call precedes the
//! first remaining return, checks that its result fits the model's state,
//! "lifts" its call and return out of the list and goes on; when the first
//! remaining entry is a return, every order tried so far is stuck and the
//! search backtracks. A cache of visited (set of linearized operations,
//! register state) pairs stops it from exploring the same configuration
//! twice. The search succeeds once every completed operation is linearized;
//! unknown operations have no return entry, so they may be left out.
//!
//! On top of porcupine's algorithm, each of these prunes only orders that
//! another explored order dominates, so none of them can hide a violation:
//!
//! - values that no read and no `PutIfMatch` of the key names are one state,
//!   "some unread value", since nothing can tell them apart;
//! - a read (or a conditional put that reported a failed precondition) that
//!   fits the current state is linearized at once, without trying other
//!   operations first: moving it earlier never hurts;
//! - an unknown write is only placed where it changes the state, and only if
//!   the next operation reads the state (placing it just before a blind
//!   `Put` or `Delete` is the same as leaving it out);
//! - unknown writes with the same effect are interchangeable, so the search
//!   only tries the earliest invoked one that is still unused;
//! - a configuration that has used a superset of the unknown writes of a
//!   visited one (same state, same completed operations) is pruned too:
//!   fewer used leaves more choices. Completed operations are tried before
//!   unknown ones so that the configurations using fewer come first.
//!
//! Without the last two, a few dozen pending unknown writes multiply the
//! configurations by the subsets of them used so far; with them, random
//! histories with 30% unknown writes and 16 clients check within the default
//! budget.
//!
//! # Explanations
//!
//! When a key fails, the search knows the furthest completion it could not
//! get past. The checker then looks for a small window of the history that
//! fails on its own: the operations around that completion, starting as late
//! as possible, with any state the register could have held at the start.
//! Operations that straddle the window's edges become optional, so a window
//! that fails proves the whole history fails. [`Violation::explanation`]
//! prints that window. The same windows are tried when the search of the
//! whole key runs out of steps, so a violation in a history too concurrent
//! to search whole is still found if a window around it fails on its own.
//!
//! # Limits
//!
//! - The search is exponential in the worst case (in the number of
//!   operations that overlap in time). Each key gets a budget of search steps
//!   ([`Limits::max_steps_per_key`]); a key that exceeds it fails the check
//!   with [`CheckError::TooConcurrent`], never a silent pass. Proving a
//!   violation costs more than finding an order for a correct history (every
//!   configuration up to the violation must be ruled out), so a failing key
//!   can take up to twice the budget (about a second by default: the whole
//!   search, then the windows).
//! - Times come from the clients' clocks; intervals must contain the real
//!   request (take the invocation time before sending, the completion time
//!   after the answer), which [`History`] does.
//! - Listings are checked per key only (see above).

// Each test that includes this module uses only part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// What a write puts in the register: an identifier unique per write, e.g.
/// a counter written as the object's body.
pub type Value = u64;

/// One operation on one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Unconditional put: the register becomes `Some(value)`.
    Put(Value),
    /// Put with `If-None-Match: *`: applies only if the key has no object.
    PutIfAbsent(Value),
    /// Put with `If-Match: <etag of expected>`: applies only if the key holds
    /// `expected`.
    PutIfMatch {
        /// The value the register must hold for the put to apply.
        expected: Value,
        /// The value the put writes.
        new: Value,
    },
    /// Read of the object.
    Get,
    /// Delete: the register becomes `None`; deleting a missing key succeeds.
    Delete,
    /// A listing projected onto this key: the key present with a value, or
    /// absent. Checked as a read of this key only.
    List,
}

/// The result of an operation that completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// A `Put` or `Delete` succeeded.
    Done,
    /// A conditional put applied (`true`) or reported a failed precondition
    /// (`false`).
    Applied(bool),
    /// A `Get` or `List` saw this value (`None`: no object).
    Read(Option<Value>),
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Completed with this result.
    Ok(Observed),
    /// Definitely had no effect.
    Fail,
    /// May or may not have taken effect, at any time after its invocation.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Which client ran it (only used in reports).
    pub client: usize,
    /// The key it concerns.
    pub key: String,
    /// What it did.
    pub op: Op,
    /// When it was invoked, since the start of the test.
    pub invoked: Duration,
    /// When the client saw its outcome. Required for [`Outcome::Ok`];
    /// ignored (treated as +infinity) for [`Outcome::Unknown`].
    pub completed: Option<Duration>,
    /// How it ended.
    pub outcome: Outcome,
}

/// A history shared by concurrent clients (wrap it in an `Arc`): each client
/// calls [`History::invoke`] right before sending a request and
/// [`History::complete`] right after seeing its outcome.
#[derive(Debug)]
pub struct History {
    /// Time zero of the test.
    start: Instant,
    /// The events so far, in invocation order.
    events: Mutex<Vec<Event>>,
}

/// An invoked operation waiting for its outcome; see [`History::complete`].
#[derive(Debug)]
#[must_use = "complete the call; a call never completed is recorded as Unknown"]
pub struct Call {
    /// Index of its event in the history.
    index: usize,
}

/// Bounds on the work the checker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Search steps (one step: trying one operation at one point of one
    /// order, roughly 100 ns) allowed per key for the search of the whole
    /// key, and again, shared, for the windows tried to explain a violation
    /// (or to find one when the whole search ran out).
    pub max_steps_per_key: u64,
}

/// What a successful check covered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Keys checked.
    pub keys: usize,
    /// Operations the search placed or could place (completed operations and
    /// unknown writes).
    pub ops_checked: usize,
    /// Of those, operations whose outcome is unknown.
    pub unknown: usize,
    /// Operations dropped because they constrain nothing: failed operations
    /// and unknown reads.
    pub dropped: usize,
    /// Search steps over all keys.
    pub steps: u64,
    /// Search steps of the hardest key (compare with
    /// [`Limits::max_steps_per_key`]).
    pub max_key_steps: u64,
}

/// A key whose history no order explains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// Index (in the checked slice) of the operation the search could not
    /// linearize (`usize::MAX` if it could not name one, which a failed
    /// search always can).
    pub culprit: usize,
    /// Indices (in the checked slice) of the operations of the smallest
    /// failing window found, in invocation order.
    pub window: Vec<usize>,
    /// A readable account: the window's operations with times and results.
    pub explanation: String,
}

/// Why a check did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckError {
    /// The history itself is inconsistent: a bug in the test.
    Malformed {
        /// Index of the offending event.
        event: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A key's search exceeded its step budget: the history is too
    /// concurrent to check (this is not a pass).
    TooConcurrent {
        /// The key.
        key: String,
        /// Steps spent before giving up.
        steps: u64,
        /// The budget.
        limit: u64,
    },
    /// The history is not linearizable.
    NotLinearizable(Violation),
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps_per_key: 5_000_000,
        }
    }
}

impl History {
    /// An empty history whose time zero is now.
    pub fn new() -> Self {
        History {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// Time since the history's start.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records that `client` is about to send `op` on `key`. Until completed,
    /// the event's outcome is [`Outcome::Unknown`].
    pub fn invoke(&self, client: usize, key: impl Into<String>, op: Op) -> Call {
        // Read the clock before taking the lock: an invocation time that is
        // early only widens the interval, which is safe.
        let invoked = self.now();
        let mut events = self.lock();
        events.push(Event {
            client,
            key: key.into(),
            op,
            invoked,
            completed: None,
            outcome: Outcome::Unknown,
        });
        Call {
            index: events.len() - 1,
        }
    }

    /// Records the outcome of `call`, completed now.
    pub fn complete(&self, call: Call, outcome: Outcome) {
        let mut events = self.lock();
        // Read the clock under the lock: a late completion time only widens
        // the interval.
        let completed = self.now();
        if let Some(event) = events.get_mut(call.index) {
            event.completed = Some(completed);
            event.outcome = outcome;
        }
    }

    /// Appends an event recorded elsewhere.
    pub fn push(&self, event: Event) {
        self.lock().push(event);
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// Checks the events so far with the default [`Limits`].
    pub fn check(&self) -> Result<Summary, CheckError> {
        check(&self.events())
    }

    /// The event list, even if a client panicked while holding the lock
    /// (the list itself is always consistent).
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

/// Checks that `history` is linearizable, key by key, with the default
/// [`Limits`].
pub fn check(history: &[Event]) -> Result<Summary, CheckError> {
    check_with(history, &Limits::default())
}

/// Checks that `history` is linearizable, key by key. A violation on any key
/// is reported before a key that was too concurrent to check.
pub fn check_with(history: &[Event], limits: &Limits) -> Result<Summary, CheckError> {
    for (index, event) in history.iter().enumerate() {
        validate(event).map_err(|reason| CheckError::Malformed {
            event: index,
            reason,
        })?;
    }

    let (by_key, dropped) = split_by_key(history);
    let mut summary = Summary {
        dropped,
        ..Summary::default()
    };
    let mut too_concurrent = None;
    for (key, ops) in &by_key {
        summary.keys += 1;
        match check_key(key, history, ops, limits) {
            Ok(stats) => {
                summary.ops_checked += stats.ops;
                summary.unknown += stats.unknown;
                summary.steps += stats.steps;
                summary.max_key_steps = summary.max_key_steps.max(stats.steps);
            }
            Err(KeyFailure::Violation(violation)) => {
                return Err(CheckError::NotLinearizable(violation))
            }
            Err(KeyFailure::OverBudget { steps }) => {
                // Keep going: a later key may hold a real violation, which
                // says more than "too concurrent".
                too_concurrent.get_or_insert(CheckError::TooConcurrent {
                    key: key.to_string(),
                    steps,
                    limit: limits.max_steps_per_key,
                });
            }
        }
    }
    match too_concurrent {
        Some(error) => Err(error),
        None => Ok(summary),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Put(v) => write!(f, "Put({v})"),
            Op::PutIfAbsent(v) => write!(f, "PutIfAbsent({v})"),
            Op::PutIfMatch { expected, new } => write!(f, "PutIfMatch({expected} -> {new})"),
            Op::Get => write!(f, "Get"),
            Op::Delete => write!(f, "Delete"),
            Op::List => write!(f, "List"),
        }
    }
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observed::Done => write!(f, "ok"),
            Observed::Applied(true) => write!(f, "applied"),
            Observed::Applied(false) => write!(f, "precondition failed"),
            Observed::Read(Some(v)) => write!(f, "read {v}"),
            Observed::Read(None) => write!(f, "read absent"),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.explanation)
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::Malformed { event, reason } => {
                write!(f, "malformed history, event {event}: {reason}")
            }
            CheckError::TooConcurrent { key, steps, limit } => write!(
                f,
                "key {key:?} is too concurrent to check: the search gave up after \
                 {steps} steps (limit {limit}); this is not a pass"
            ),
            CheckError::NotLinearizable(violation) => violation.fmt(f),
        }
    }
}

impl std::error::Error for CheckError {}

// ---------------------------------------------------------------------------
// Preparation
// ---------------------------------------------------------------------------

impl Op {
    /// Whether the operation only reads the register.
    fn is_read(&self) -> bool {
        matches!(self, Op::Get | Op::List)
    }
}

/// Rejects events a correct test cannot produce.
fn validate(event: &Event) -> Result<(), String> {
    if let Some(completed) = event.completed {
        if completed < event.invoked {
            return Err(format!(
                "{} by client {} completed at {} before its invocation at {}",
                event.op,
                event.client,
                fmt_time(completed),
                fmt_time(event.invoked)
            ));
        }
    }
    let Outcome::Ok(observed) = event.outcome else {
        return Ok(());
    };
    if event.completed.is_none() {
        return Err(format!(
            "{} by client {} is Ok but has no completion time",
            event.op, event.client
        ));
    }
    let fits = match event.op {
        Op::Put(_) | Op::Delete => matches!(observed, Observed::Done),
        Op::PutIfAbsent(_) | Op::PutIfMatch { .. } => matches!(observed, Observed::Applied(_)),
        Op::Get | Op::List => matches!(observed, Observed::Read(_)),
    };
    if fits {
        Ok(())
    } else {
        Err(format!(
            "{} by client {} cannot have the result {observed:?} (expected {})",
            event.op,
            event.client,
            match event.op {
                Op::Put(_) | Op::Delete => "Done",
                Op::PutIfAbsent(_) | Op::PutIfMatch { .. } => "Applied(_)",
                Op::Get | Op::List => "Read(_)",
            }
        ))
    }
}

/// The operations of each key that can constrain the search, and how many
/// events were dropped because they cannot (failed operations, unknown
/// reads). Expects validated events.
fn split_by_key(history: &[Event]) -> (BTreeMap<&str, Vec<KeyOp>>, usize) {
    let mut by_key: BTreeMap<&str, Vec<KeyOp>> = BTreeMap::new();
    let mut dropped = 0;
    for (index, event) in history.iter().enumerate() {
        let ops = by_key.entry(event.key.as_str()).or_default();
        match event.outcome {
            Outcome::Fail => dropped += 1,
            Outcome::Unknown if event.op.is_read() => dropped += 1,
            Outcome::Unknown => ops.push(KeyOp {
                event: index,
                op: event.op.clone(),
                invoked: event.invoked,
                returned: None,
                observed: None,
            }),
            Outcome::Ok(observed) => ops.push(KeyOp {
                event: index,
                op: event.op.clone(),
                invoked: event.invoked,
                // validate() made sure an Ok event has a completion time.
                returned: event.completed,
                observed: Some(observed),
            }),
        }
    }
    (by_key, dropped)
}

/// An operation of one key that can constrain the search.
#[derive(Clone, Debug)]
struct KeyOp {
    /// Index of its event in the history.
    event: usize,
    /// What it did.
    op: Op,
    /// When it was invoked.
    invoked: Duration,
    /// When it completed; `None` if its outcome is unknown.
    returned: Option<Duration>,
    /// Its result; `None` if its outcome is unknown.
    observed: Option<Observed>,
}

impl KeyOp {
    /// The value it may have written, if any.
    fn written(&self) -> Option<Value> {
        let applied = !matches!(self.observed, Some(Observed::Applied(false)));
        match self.op {
            Op::Put(v) => Some(v),
            Op::PutIfAbsent(v) if applied => Some(v),
            Op::PutIfMatch { new, .. } if applied => Some(new),
            _ => None,
        }
    }

    /// Whether it completed having certainly written a value.
    fn surely_wrote(&self) -> bool {
        matches!(
            (&self.op, self.observed),
            (Op::Put(_), Some(Observed::Done))
                | (Op::PutIfAbsent(_), Some(Observed::Applied(true)))
                | (Op::PutIfMatch { .. }, Some(Observed::Applied(true)))
        )
    }

    /// Whether, placed with its result, it could change the register. Only
    /// such operations are worth keeping as optional ones.
    fn may_change_state(&self) -> bool {
        !self.op.is_read() && !matches!(self.observed, Some(Observed::Applied(false)))
    }
}

/// How one key's check went.
struct KeyStats {
    /// Operations in the search.
    ops: usize,
    /// Of which unknown.
    unknown: usize,
    /// Steps spent.
    steps: u64,
}

/// Why one key's check did not pass.
enum KeyFailure {
    /// Not linearizable.
    Violation(Violation),
    /// The search hit its budget.
    OverBudget {
        /// Steps spent.
        steps: u64,
    },
}

/// Checks one key's operations.
fn check_key(
    key: &str,
    history: &[Event],
    ops: &[KeyOp],
    limits: &Limits,
) -> Result<KeyStats, KeyFailure> {
    let whole = Window::build(ops, None, None);
    let mut search = Search::new(&whole, limits.max_steps_per_key);
    match search.run_all() {
        Verdict::Linearizable => Ok(KeyStats {
            ops: whole.ops.len(),
            unknown: ops.iter().filter(|op| op.returned.is_none()).count(),
            steps: search.steps,
        }),
        Verdict::NotLinearizable => {
            let found = Failure::of(&whole, &search);
            let mut budget = limits.max_steps_per_key;
            let best = found
                .culprit
                .and_then(|culprit| smallest_window(ops, culprit, &mut budget))
                .unwrap_or(found);
            Err(KeyFailure::Violation(render(key, history, ops, &best)))
        }
        Verdict::OverBudget => {
            // Where the search got furthest is the likeliest place of a
            // violation, and a window there that fails on its own proves
            // one, however concurrent the rest of the history is.
            let mut budget = limits.max_steps_per_key;
            match Failure::of(&whole, &search)
                .culprit
                .and_then(|culprit| smallest_window(ops, culprit, &mut budget))
            {
                Some(failure) => Err(KeyFailure::Violation(render(key, history, ops, &failure))),
                None => Err(KeyFailure::OverBudget {
                    steps: search.steps,
                }),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Windows: the part of a key's history handed to the search
// ---------------------------------------------------------------------------

/// A register state: [`ABSENT`], [`UNREAD`] or a value some operation of the
/// window reads or expects (`2 + index` into [`Window::values`]).
type State = u32;
/// No object.
const ABSENT: State = 0;
/// Some value no operation of the window reads or expects: such values are
/// indistinguishable, so they share one state.
const UNREAD: State = 1;

/// An operation as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    /// `Put` or `Delete`: sets the state whatever it was.
    Write(State),
    /// `Get` or `List` that returned this state.
    Read(State),
    /// `PutIfAbsent`.
    IfAbsent {
        /// The state it writes if the key is absent.
        new: State,
        /// What it reported; `None` if unknown.
        applied: Option<bool>,
    },
    /// `PutIfMatch`.
    IfMatch {
        /// The state the key must hold.
        expected: State,
        /// The state it writes if so.
        new: State,
        /// What it reported; `None` if unknown.
        applied: Option<bool>,
    },
}

impl Step {
    /// The state after this step from `state`, or `None` if its result does
    /// not fit `state`.
    fn apply(self, state: State) -> Option<State> {
        match self {
            Step::Write(new) => Some(new),
            Step::Read(seen) => (seen == state).then_some(state),
            Step::IfAbsent { new, applied } => conditional(state == ABSENT, applied, new, state),
            Step::IfMatch {
                expected,
                new,
                applied,
            } => conditional(state == expected, applied, new, state),
        }
    }

    /// Whether it sets the state regardless of the state.
    fn is_blind(self) -> bool {
        matches!(self, Step::Write(_))
    }

    /// Whether it never changes the state.
    fn is_read_only(self) -> bool {
        matches!(
            self,
            Step::Read(_)
                | Step::IfAbsent {
                    applied: Some(false),
                    ..
                }
                | Step::IfMatch {
                    applied: Some(false),
                    ..
                }
        )
    }
}

/// A conditional put from `state`: whether its precondition `holds`, what it
/// reported, and what it writes.
fn conditional(holds: bool, applied: Option<bool>, new: State, state: State) -> Option<State> {
    match applied {
        Some(reported) if reported != holds => None,
        _ => Some(if holds { new } else { state }),
    }
}

/// An operation in a window.
#[derive(Clone, Debug)]
struct WindowOp {
    /// Index into the key's operations.
    source: usize,
    /// What it does to the model.
    step: Step,
    /// Whether it must be linearized (it completed inside the window);
    /// optional operations may be left out.
    required: bool,
    /// Bit index: among required operations if required, else among
    /// optional ones.
    slot: usize,
    /// For optional operations, the class of interchangeable ones.
    class: usize,
}

/// A call or return in a window's time-ordered list.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Index into [`Window::ops`].
    op: usize,
    /// Call (invocation) or return (completion).
    is_call: bool,
}

/// The operations of one key between two times, ready for the search.
///
/// An operation that completed inside the window is required; one that
/// straddles an edge, or whose outcome is unknown, is optional (whatever it
/// did before the start is part of the initial state, whatever it did after
/// the end does not matter). Operations that completed before the start or
/// were invoked after the end are left out. The search starts from each
/// state the register could hold at the start.
#[derive(Clone, Debug)]
struct Window {
    /// Start (`None`: the beginning of the test, when the key was absent).
    start: Option<Duration>,
    /// End (`None`: the end of the test).
    end: Option<Duration>,
    /// Its operations, in invocation order.
    ops: Vec<WindowOp>,
    /// Calls and returns, sorted by time.
    entries: Vec<Entry>,
    /// Index of each operation's call in `entries`.
    call_entry: Vec<usize>,
    /// Index of each operation's return in `entries` (`NIL` if optional).
    return_entry: Vec<usize>,
    /// Members of each class of interchangeable optional operations, in
    /// invocation order.
    classes: Vec<Vec<usize>>,
    /// Number of required operations.
    required: usize,
    /// States the register could hold at the start.
    initial: Vec<State>,
    /// The values behind states `2..`.
    values: Vec<Value>,
}

/// "No entry" in the linked list.
const NIL: usize = usize::MAX;

impl Window {
    /// The window of `ops` from `start` to `end`.
    fn build(ops: &[KeyOp], start: Option<Duration>, end: Option<Duration>) -> Window {
        let mut chosen: Vec<(usize, bool)> = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            let before_start = matches!((start, op.returned), (Some(t), Some(r)) if r < t);
            let after_end = end.is_some_and(|e| op.invoked > e);
            if before_start || after_end {
                continue;
            }
            let required = start.is_none_or(|t| op.invoked >= t)
                && match (op.returned, end) {
                    (Some(r), Some(e)) => r <= e,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
            if required || op.may_change_state() {
                chosen.push((index, required));
            }
        }
        chosen.sort_by_key(|&(index, _)| (ops[index].invoked, index));

        // Values that some operation of the window can tell apart.
        let mut values = Vec::new();
        let mut state_of: HashMap<Value, State> = HashMap::new();
        let mut distinguish = |v: Value| {
            state_of.entry(v).or_insert_with(|| {
                values.push(v);
                2 + (values.len() - 1) as State
            });
        };
        for &(index, required) in &chosen {
            match (&ops[index].op, ops[index].observed) {
                (Op::Get | Op::List, Some(Observed::Read(Some(v)))) if required => distinguish(v),
                (Op::PutIfMatch { expected, .. }, _) => distinguish(*expected),
                _ => {}
            }
        }
        let canon = |v: Value| state_of.get(&v).copied().unwrap_or(UNREAD);

        let mut window_ops = Vec::with_capacity(chosen.len());
        let mut class_of: HashMap<Step, usize> = HashMap::new();
        let mut classes: Vec<Vec<usize>> = Vec::new();
        let (mut required_count, mut optional_count) = (0, 0);
        for (position, &(index, required)) in chosen.iter().enumerate() {
            let op = &ops[index];
            // An optional operation may have any result (it was unknown, or
            // its result belongs outside the window); the search never
            // places one where it would change nothing.
            let applied = match op.observed {
                Some(Observed::Applied(applied)) if required => Some(applied),
                _ => None,
            };
            let step = match op.op {
                Op::Put(v) => Step::Write(canon(v)),
                Op::Delete => Step::Write(ABSENT),
                Op::Get | Op::List => Step::Read(match op.observed {
                    Some(Observed::Read(Some(v))) => canon(v),
                    _ => ABSENT,
                }),
                Op::PutIfAbsent(v) => Step::IfAbsent {
                    new: canon(v),
                    applied,
                },
                Op::PutIfMatch { expected, new } => Step::IfMatch {
                    expected: canon(expected),
                    new: canon(new),
                    applied,
                },
            };
            let (slot, class) = if required {
                required_count += 1;
                (required_count - 1, NIL)
            } else {
                optional_count += 1;
                let class = *class_of.entry(step).or_insert_with(|| {
                    classes.push(Vec::new());
                    classes.len() - 1
                });
                classes[class].push(position);
                (optional_count - 1, class)
            };
            window_ops.push(WindowOp {
                source: index,
                step,
                required,
                slot,
                class,
            });
        }

        // Calls and returns by time; calls first at equal times (touching
        // intervals are concurrent), then by invocation order.
        let mut timed: Vec<(Duration, bool, usize)> = Vec::new();
        for (position, window_op) in window_ops.iter().enumerate() {
            let op = &ops[window_op.source];
            timed.push((op.invoked, false, position));
            if window_op.required {
                if let Some(returned) = op.returned {
                    timed.push((returned, true, position));
                }
            }
        }
        timed.sort_unstable();
        let mut call_entry = vec![NIL; window_ops.len()];
        let mut return_entry = vec![NIL; window_ops.len()];
        let entries = timed
            .iter()
            .enumerate()
            .map(|(rank, &(_, is_return, op))| {
                if is_return {
                    return_entry[op] = rank;
                } else {
                    call_entry[op] = rank;
                }
                Entry {
                    op,
                    is_call: !is_return,
                }
            })
            .collect();

        let initial = match start {
            None => vec![ABSENT],
            Some(t) => initial_states(ops, t, canon),
        };
        Window {
            start,
            end,
            ops: window_ops,
            entries,
            call_entry,
            return_entry,
            classes,
            required: required_count,
            initial,
            values,
        }
    }

    /// A state in words.
    fn describe(&self, state: State) -> String {
        match state {
            ABSENT => "absent".to_string(),
            UNREAD => "a value no operation here reads".to_string(),
            _ => match self.values.get((state - 2) as usize) {
                Some(v) => v.to_string(),
                None => format!("state {state}"),
            },
        }
    }
}

/// The states the register could hold at time `t`, as an over-approximation
/// (which only makes the window easier to pass): absent unless some write
/// certainly took effect before `t` and no delete was invoked before `t`,
/// and every value written by an operation invoked before `t`.
fn initial_states(ops: &[KeyOp], t: Duration, canon: impl Fn(Value) -> State) -> Vec<State> {
    let mut states = BTreeSet::new();
    let mut deleted = false;
    let mut surely_written = false;
    for op in ops {
        if op.invoked < t {
            if let Some(v) = op.written() {
                states.insert(canon(v));
            }
            deleted |= op.op == Op::Delete;
        }
        surely_written |= op.returned.is_some_and(|r| r < t) && op.surely_wrote();
    }
    if deleted || !surely_written {
        states.insert(ABSENT);
    }
    states.into_iter().collect()
}

// ---------------------------------------------------------------------------
// The search
// ---------------------------------------------------------------------------

/// FxHash (rustc's hasher), finished with a mix: the cache keys are short
/// word slices, and SipHash would dominate the search's cost.
#[derive(Default)]
struct FxHasher {
    /// The running hash.
    hash: u64,
}

impl FxHasher {
    /// Folds one word in.
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        for &byte in chunks.remainder() {
            self.add(u64::from(byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.add(word);
    }

    fn write_usize(&mut self, word: usize) {
        self.add(word as u64);
    }

    fn finish(&self) -> u64 {
        // The table uses both the low and the high bits.
        let mut h = self.hash;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

/// Whether a visited configuration's row `seen` (flag, optional bits)
/// implies that a configuration with the same key and row `new` fails: `new`
/// has at least the flag and the optional operations of `seen`.
fn dominates(seen: &[u64], new: &[u64]) -> bool {
    seen.iter()
        .zip(new)
        .all(|(&seen_word, &new_word)| seen_word & !new_word == 0)
}

/// How a search ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Some order explains the window.
    Linearizable,
    /// No order does.
    NotLinearizable,
    /// The step budget ran out first.
    OverBudget,
}

/// A choice made at one level of the search, undone on backtracking.
struct Frame {
    /// The operation linearized.
    op: usize,
    /// The state before it.
    state_before: State,
    /// Whether the operation before it was an optional one.
    after_optional_before: bool,
    /// Whether it was a read linearized without alternatives.
    forced: bool,
}

/// The search over one window.
struct Search<'w> {
    /// What is searched.
    window: &'w Window,
    /// Linked list of remaining entries: successor, `NIL` at the end.
    next: Vec<usize>,
    /// Linked list: predecessor; the head sentinel is `entries.len()`.
    prev: Vec<usize>,
    /// Index of the head sentinel.
    head: usize,
    /// Linearized required operations.
    required_bits: Vec<u64>,
    /// Number of leading words of `required_bits` that are full.
    required_full: usize,
    /// Linearized optional operations.
    optional_bits: Vec<u64>,
    /// Per class, how many of its members are linearized (always the
    /// earliest ones).
    class_used: Vec<usize>,
    /// Required operations not linearized yet.
    required_left: usize,
    /// Visited configurations. The key is the state and the linearized
    /// required operations; the value holds rows of `row`'s width, each the
    /// after-optional flag and the linearized optional operations of one
    /// visited configuration with that key.
    cache: HashMap<Box<[u64]>, Vec<u64>, BuildHasherDefault<FxHasher>>,
    /// Buffer for the key of a configuration.
    scratch: Vec<u64>,
    /// Buffer for the row of a configuration.
    row: Vec<u64>,
    /// Steps spent.
    steps: u64,
    /// Step budget.
    limit: u64,
    /// Rank of the furthest return the search could not get past.
    frontier: Option<usize>,
    /// States the register held when stuck at the frontier.
    frontier_states: BTreeSet<State>,
}

/// A choice the search can make at one level.
struct Pick {
    /// The operation.
    op: usize,
    /// The state after it.
    state_after: State,
    /// Whether it was a read linearized without alternatives.
    forced: bool,
}

/// The step budget ran out.
struct OutOfSteps;

/// Which operations a scan of the pending calls considers. Required ones go
/// first, so that configurations with fewer optional operations are visited
/// first and the ones with more are pruned as dominated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Required operations.
    Required,
    /// Optional operations.
    Optional,
}

impl<'w> Search<'w> {
    /// A search over `window` with a budget of `limit` steps.
    fn new(window: &'w Window, limit: u64) -> Self {
        // The list links the calls and returns of required operations only;
        // optional ones are reached through their classes.
        let head = window.entries.len();
        let mut next = vec![NIL; head + 1];
        let mut prev = vec![NIL; head + 1];
        let mut last = head;
        for (rank, entry) in window.entries.iter().enumerate() {
            if window.ops[entry.op].required {
                next[last] = rank;
                prev[rank] = last;
                last = rank;
            }
        }
        Search {
            window,
            next,
            prev,
            head,
            required_bits: vec![0; window.required.div_ceil(64)],
            required_full: 0,
            optional_bits: vec![0; (window.ops.len() - window.required).div_ceil(64)],
            class_used: vec![0; window.classes.len()],
            required_left: window.required,
            cache: HashMap::default(),
            scratch: Vec::new(),
            row: Vec::new(),
            steps: 0,
            limit,
            frontier: None,
            frontier_states: BTreeSet::new(),
        }
    }

    /// Searches from each possible initial state; the cache is shared, since
    /// a configuration that failed fails whatever led to it.
    fn run_all(&mut self) -> Verdict {
        for &initial in &self.window.initial {
            match self.run(initial) {
                Verdict::NotLinearizable => continue,
                verdict => return verdict,
            }
        }
        Verdict::NotLinearizable
    }

    /// Depth-first search from `initial`. On `NotLinearizable` every choice
    /// has been undone, so the structures are ready for another run.
    fn run(&mut self, initial: State) -> Verdict {
        let mut state = initial;
        // Whether the last operation linearized was an optional one, which
        // must then be followed by an operation that reads the state.
        let mut after_optional = false;
        let mut frames: Vec<Frame> = Vec::new();
        // Where to continue scanning at the current level after
        // backtracking into it; `None` for a fresh level.
        let mut resume: Option<(Pass, usize)> = None;
        loop {
            if self.required_left == 0 {
                return Verdict::Linearizable;
            }
            let pick = match resume.take() {
                Some((pass, from)) => self.candidate(pass, from, state, after_optional),
                None => match self.forced_read(state) {
                    Ok(Some(op)) => Ok(self.visit(op, state, false).then_some(Pick {
                        op,
                        state_after: state,
                        forced: true,
                    })),
                    Ok(None) => {
                        let first = self.next[self.head];
                        self.candidate(Pass::Required, first, state, after_optional)
                    }
                    Err(OutOfSteps) => Err(OutOfSteps),
                },
            };
            let pick = match pick {
                Ok(pick) => pick,
                Err(OutOfSteps) => return Verdict::OverBudget,
            };
            if let Some(pick) = pick {
                self.linearize(pick.op);
                frames.push(Frame {
                    op: pick.op,
                    state_before: state,
                    after_optional_before: after_optional,
                    forced: pick.forced,
                });
                state = pick.state_after;
                after_optional = !self.window.ops[pick.op].required;
                continue;
            }
            self.note_dead_end(state);
            loop {
                let Some(frame) = frames.pop() else {
                    return Verdict::NotLinearizable;
                };
                self.unlinearize(frame.op);
                state = frame.state_before;
                after_optional = frame.after_optional_before;
                // A forced read had no alternatives: keep backtracking.
                if !frame.forced {
                    let window_op = &self.window.ops[frame.op];
                    resume = Some(if window_op.required {
                        (Pass::Required, self.next[self.window.call_entry[frame.op]])
                    } else {
                        (Pass::Optional, window_op.class + 1)
                    });
                    break;
                }
            }
        }
    }

    /// A pending required read (or failed conditional put) that fits
    /// `state`. Linearizing it at once is never worse than later: it changes
    /// nothing, and every operation that had to precede it already has.
    fn forced_read(&mut self, state: State) -> Result<Option<usize>, OutOfSteps> {
        let mut entry = self.next[self.head];
        while let Some(&Entry { op, is_call: true }) = self.window.entries.get(entry) {
            self.spend()?;
            let step = self.window.ops[op].step;
            if step.is_read_only() && step.apply(state) == Some(state) {
                return Ok(Some(op));
            }
            entry = self.next[entry];
        }
        Ok(None)
    }

    /// The next choice at this level that can be linearized in `state` and
    /// leads to an unvisited configuration: in the required pass, the
    /// pending calls from entry `from`; then, in the optional pass, the
    /// classes from `from` (or 0 after a required pass).
    fn candidate(
        &mut self,
        pass: Pass,
        from: usize,
        state: State,
        after_optional: bool,
    ) -> Result<Option<Pick>, OutOfSteps> {
        if pass == Pass::Required {
            let mut entry = from;
            while let Some(&Entry { op, is_call: true }) = self.window.entries.get(entry) {
                entry = self.next[entry];
                self.spend()?;
                let step = self.window.ops[op].step;
                // An optional write followed by a blind write is the same
                // as the blind write alone, which is tried too.
                if after_optional && step.is_blind() {
                    continue;
                }
                let Some(state_after) = step.apply(state) else {
                    continue;
                };
                if self.visit(op, state_after, false) {
                    return Ok(Some(Pick {
                        op,
                        state_after,
                        forced: false,
                    }));
                }
            }
        }
        // Members of a class are interchangeable, so only the earliest
        // unused one is tried, if it was invoked before the first pending
        // return.
        let horizon = self.first_return();
        let first_class = if pass == Pass::Optional { from } else { 0 };
        for class in first_class..self.window.classes.len() {
            let Some(&op) = self.window.classes[class].get(self.class_used[class]) else {
                continue;
            };
            if self.window.call_entry[op] > horizon {
                continue;
            }
            self.spend()?;
            let step = self.window.ops[op].step;
            if after_optional && step.is_blind() {
                continue;
            }
            // An optional operation that changes nothing is the same as
            // leaving it out.
            let Some(state_after) = step.apply(state).filter(|&after| after != state) else {
                continue;
            };
            if self.visit(op, state_after, true) {
                return Ok(Some(Pick {
                    op,
                    state_after,
                    forced: false,
                }));
            }
        }
        Ok(None)
    }

    /// The first pending return (`NIL` if none): every operation invoked
    /// after it must wait until its operation is linearized.
    fn first_return(&self) -> usize {
        let mut entry = self.next[self.head];
        while let Some(e) = self.window.entries.get(entry) {
            if !e.is_call {
                return entry;
            }
            entry = self.next[entry];
        }
        NIL
    }

    /// Counts a step against the budget.
    fn spend(&mut self) -> Result<(), OutOfSteps> {
        self.steps += 1;
        if self.steps > self.limit {
            Err(OutOfSteps)
        } else {
            Ok(())
        }
    }

    /// Records the configuration reached by linearizing `op` into
    /// `state_after`; `false` if it is dominated by one visited before (and
    /// so fails): same state and required operations, a subset of its
    /// optional operations and no stricter flag. Using fewer optional
    /// operations only leaves more choices (interchangeable ones are always
    /// used earliest first, so a subset stays a subset after substitution).
    fn visit(&mut self, op: usize, state_after: State, after_optional: bool) -> bool {
        self.set_bit(op, true);
        self.encode(state_after, after_optional);
        self.set_bit(op, false);
        let (row, width) = (&self.row, self.row.len());
        match self.cache.get_mut(self.scratch.as_slice()) {
            Some(rows) => {
                if rows.chunks_exact(width).any(|seen| dominates(seen, row)) {
                    return false;
                }
                // Rows the new one dominates will never prune anything more.
                let mut kept = 0;
                for start in (0..rows.len()).step_by(width) {
                    if !dominates(row, &rows[start..start + width]) {
                        rows.copy_within(start..start + width, kept);
                        kept += width;
                    }
                }
                rows.truncate(kept);
                rows.extend_from_slice(row);
            }
            None => {
                self.cache
                    .insert(self.scratch.clone().into_boxed_slice(), row.clone());
            }
        }
        true
    }

    /// Encodes the current configuration: into `scratch` the state, then
    /// the required bits without their full leading words and zero trailing
    /// words; into `row` the flag and the optional bits.
    fn encode(&mut self, state: State, after_optional: bool) {
        self.row.clear();
        self.row.push(u64::from(after_optional));
        self.row.extend_from_slice(&self.optional_bits);
        self.scratch.clear();
        self.scratch.push(u64::from(state));
        let mut end = self.required_bits.len();
        while end > self.required_full && self.required_bits[end - 1] == 0 {
            end -= 1;
        }
        let words = &self.required_bits[self.required_full..end];
        self.scratch
            .push(self.required_full as u64 | ((words.len() as u64) << 32));
        self.scratch.extend_from_slice(words);
    }

    /// Sets or clears the bit of `op`, keeping `required_full` up to date.
    fn set_bit(&mut self, op: usize, on: bool) {
        let window_op = &self.window.ops[op];
        let (word, bit) = (window_op.slot / 64, 1u64 << (window_op.slot % 64));
        if !window_op.required {
            if on {
                self.optional_bits[word] |= bit;
            } else {
                self.optional_bits[word] &= !bit;
            }
            return;
        }
        if on {
            self.required_bits[word] |= bit;
            while self.required_full < self.required_bits.len()
                && self.required_bits[self.required_full] == self.full_word(self.required_full)
            {
                self.required_full += 1;
            }
        } else {
            self.required_bits[word] &= !bit;
            self.required_full = self.required_full.min(word);
        }
    }

    /// The value of required word `word` when all its operations are
    /// linearized.
    fn full_word(&self, word: usize) -> u64 {
        let bits = self.window.required - word * 64;
        if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    /// Linearizes `op`: takes a required operation's entries out of the
    /// list, counts an optional one as used.
    fn linearize(&mut self, op: usize) {
        let window_op = &self.window.ops[op];
        if window_op.required {
            self.unlink(self.window.call_entry[op]);
            self.unlink(self.window.return_entry[op]);
        }
        self.set_bit(op, true);
        let window_op = &self.window.ops[op];
        if window_op.required {
            self.required_left -= 1;
        } else if let Some(used) = self.class_used.get_mut(window_op.class) {
            *used += 1;
        }
    }

    /// Undoes [`Search::linearize`] (in reverse order, as dancing links
    /// require).
    fn unlinearize(&mut self, op: usize) {
        if self.window.ops[op].required {
            self.relink(self.window.return_entry[op]);
            self.relink(self.window.call_entry[op]);
        }
        self.set_bit(op, false);
        let window_op = &self.window.ops[op];
        if window_op.required {
            self.required_left += 1;
        } else if let Some(used) = self.class_used.get_mut(window_op.class) {
            *used -= 1;
        }
    }

    /// Removes `entry` from the list; it keeps its own links for `relink`.
    fn unlink(&mut self, entry: usize) {
        let (prev, next) = (self.prev[entry], self.next[entry]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    /// Puts back an entry removed by `unlink`.
    fn relink(&mut self, entry: usize) {
        let (prev, next) = (self.prev[entry], self.next[entry]);
        self.next[prev] = entry;
        if next != NIL {
            self.prev[next] = entry;
        }
    }

    /// Records where the search got stuck: the first remaining return,
    /// which no remaining choice lets it get past.
    fn note_dead_end(&mut self, state: State) {
        let entry = self.first_return();
        if entry == NIL {
            return;
        }
        if self.frontier.is_none_or(|f| entry > f) {
            self.frontier = Some(entry);
            self.frontier_states.clear();
        }
        if self.frontier == Some(entry) && self.frontier_states.len() < 8 {
            self.frontier_states.insert(state);
        }
    }
}

// ---------------------------------------------------------------------------
// Explanations
// ---------------------------------------------------------------------------

/// What a failed search over a window found.
#[derive(Clone, Debug)]
struct Failure {
    /// The window.
    window: Window,
    /// Index into the key's operations of the operation the search could not
    /// get past, if known.
    culprit: Option<usize>,
    /// States the register held when the search got stuck there.
    states: Vec<State>,
}

impl Failure {
    /// The failure found by `search` over `window`.
    fn of(window: &Window, search: &Search<'_>) -> Failure {
        let culprit = search
            .frontier
            .and_then(|rank| window.entries.get(rank))
            .and_then(|entry| window.ops.get(entry.op))
            .map(|op| op.source);
        Failure {
            window: window.clone(),
            culprit,
            states: search.frontier_states.iter().copied().collect(),
        }
    }
}

/// Searches the window of `ops` from `start` to `end`, spending steps from
/// `budget`; the failure if no order explains it.
fn window_failure(
    ops: &[KeyOp],
    start: Option<Duration>,
    end: Option<Duration>,
    budget: &mut u64,
) -> Option<Failure> {
    let window = Window::build(ops, start, end);
    let mut search = Search::new(&window, *budget);
    let verdict = search.run_all();
    *budget = budget.saturating_sub(search.steps);
    match verdict {
        Verdict::NotLinearizable => Some(Failure::of(&window, &search)),
        Verdict::Linearizable | Verdict::OverBudget => None,
    }
}

/// The failing window ending at the completion of `ops[culprit]` that
/// starts latest, found within `budget` steps.
///
/// Candidate starts are the invocation times up to the culprit's, latest
/// first, then the beginning of the test. Failing is not quite monotonic in
/// the start, so this gallops then bisects, keeping only windows verified to
/// fail.
fn smallest_window(ops: &[KeyOp], culprit: usize, budget: &mut u64) -> Option<Failure> {
    let culprit = ops.get(culprit)?;
    let end = culprit.returned;
    let mut starts: Vec<Duration> = ops
        .iter()
        .map(|op| op.invoked)
        .filter(|&t| t <= culprit.invoked)
        .collect();
    starts.sort_unstable_by(|a, b| b.cmp(a));
    starts.dedup();
    // Index `starts.len()` stands for the beginning of the test.
    let start_at = |i: usize| starts.get(i).copied();
    let last = starts.len();

    let mut passing: Option<usize> = None;
    let mut probe = 0;
    let (mut failing, mut failure) = loop {
        if let Some(failure) = window_failure(ops, start_at(probe), end, budget) {
            break (probe, failure);
        }
        if probe == last {
            return None;
        }
        passing = Some(probe);
        probe = (probe * 2 + 1).min(last);
    };
    if let Some(mut low) = passing {
        while failing - low > 1 {
            let mid = low + (failing - low) / 2;
            match window_failure(ops, start_at(mid), end, budget) {
                Some(found) => (failing, failure) = (mid, found),
                None => low = mid,
            }
        }
    }
    Some(failure)
}

/// Formats a time since the start of the test.
fn fmt_time(t: Duration) -> String {
    format!("{}.{:06}s", t.as_secs(), t.subsec_micros())
}

/// How many unknown operations from before the window's start to list.
const SHOWN_EARLIER_UNKNOWN: usize = 10;

/// Marks an operation whose outcome is unknown.
const UNKNOWN_NOTE: &str = " (may or may not have taken effect)";

/// Writes the violation's explanation.
fn render(key: &str, history: &[Event], ops: &[KeyOp], failure: &Failure) -> Violation {
    use fmt::Write as _;
    let window = &failure.window;
    let culprit_event = failure.culprit.and_then(|c| ops.get(c)).map(|op| op.event);
    let mut text = String::new();
    let _ = writeln!(text, "key {key:?} is not linearizable.");

    if let Some(event) = culprit_event.and_then(|e| history.get(e)) {
        let _ = writeln!(
            text,
            "No order of the operations below that respects their real-time intervals \
             explains the result of client {}'s {} ({} .. {}, {}){}.",
            event.client,
            event.op,
            fmt_time(event.invoked),
            event.completed.map_or_else(|| "?".to_string(), fmt_time),
            outcome_text(event.outcome),
            match window.start {
                None => " starting from an absent object".to_string(),
                Some(t) => format!(
                    ", whatever the key held at {} (it could have been: {})",
                    fmt_time(t),
                    window
                        .initial
                        .iter()
                        .map(|&s| window.describe(s))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        );
    }

    let mut lines: Vec<(Duration, usize, String)> = Vec::new();
    // Unknown writes invoked before the window: all are part of the proof,
    // but those writing values no operation of the window reads only say
    // "the key may have held something else", so they are just counted.
    let mut earlier_unknown = Vec::new();
    let mut earlier_unread = 0;
    for window_op in &window.ops {
        let Some(op) = ops.get(window_op.source) else {
            continue;
        };
        let Some(event) = history.get(op.event) else {
            continue;
        };
        let before_start = window.start.is_some_and(|t| op.invoked < t);
        if before_start && op.returned.is_none() {
            match window_op.step {
                Step::Write(UNREAD)
                | Step::IfAbsent { new: UNREAD, .. }
                | Step::IfMatch { new: UNREAD, .. } => earlier_unread += 1,
                _ => earlier_unknown.push(op.event),
            }
            continue;
        }
        let note = if op.returned.is_none() {
            UNKNOWN_NOTE
        } else if window_op.required {
            ""
        } else if before_start {
            " (in flight at the window's start: may have taken effect before it)"
        } else {
            " (still in flight at the window's end: may take effect after it)"
        };
        let marker = if Some(op.event) == culprit_event {
            "  <-- cannot be linearized"
        } else {
            ""
        };
        lines.push((op.invoked, op.event, format_line(event, note, marker)));
    }
    let shown_from = earlier_unknown.len().saturating_sub(SHOWN_EARLIER_UNKNOWN);
    for &event_index in &earlier_unknown[shown_from..] {
        if let Some(event) = history.get(event_index) {
            lines.push((
                event.invoked,
                event_index,
                format_line(event, UNKNOWN_NOTE, ""),
            ));
        }
    }
    lines.sort();

    let _ = writeln!(
        text,
        "Smallest failing window found ({} operation{}{}):",
        window.ops.len(),
        if window.ops.len() == 1 { "" } else { "s" },
        match (window.start, window.end) {
            (Some(s), Some(e)) => format!(", {} .. {}", fmt_time(s), fmt_time(e)),
            (None, Some(e)) => format!(", start of the test .. {}", fmt_time(e)),
            (Some(s), None) => format!(", {} .. end of the test", fmt_time(s)),
            (None, None) => ", the whole history".to_string(),
        }
    );
    if shown_from + earlier_unread > 0 {
        let _ = writeln!(
            text,
            "  ... and {} earlier writes with unknown outcome{}",
            shown_from + earlier_unread,
            if shown_from == 0 {
                " of values no operation here reads"
            } else {
                ""
            }
        );
    }
    for (_, _, line) in &lines {
        let _ = writeln!(text, "{line}");
    }
    if !failure.states.is_empty() {
        let _ = writeln!(
            text,
            "Where the search got stuck, the key held: {}.",
            failure
                .states
                .iter()
                .map(|&s| window.describe(s))
                .collect::<Vec<_>>()
                .join(" or ")
        );
    }
    for note in unwritten_reads(key, history, ops, window) {
        let _ = writeln!(text, "Note: {note}");
    }

    let mut window_events: Vec<(Duration, usize)> = window
        .ops
        .iter()
        .filter_map(|w| ops.get(w.source))
        .map(|op| (op.invoked, op.event))
        .collect();
    window_events.sort();
    Violation {
        key: key.to_string(),
        culprit: culprit_event.unwrap_or(NIL),
        window: window_events.into_iter().map(|(_, e)| e).collect(),
        explanation: text,
    }
}

/// One operation as a line of the explanation.
fn format_line(event: &Event, note: &str, marker: &str) -> String {
    format!(
        "  client {:<3} {:<26} {:>12} .. {:<12} {}{note}{marker}",
        event.client,
        event.op.to_string(),
        fmt_time(event.invoked),
        match (event.outcome, event.completed) {
            (Outcome::Unknown, _) | (_, None) => "?".to_string(),
            (_, Some(t)) => fmt_time(t),
        },
        outcome_text(event.outcome),
    )
}

/// An outcome in words.
fn outcome_text(outcome: Outcome) -> String {
    match outcome {
        Outcome::Ok(observed) => observed.to_string(),
        Outcome::Fail => "failed (no effect)".to_string(),
        Outcome::Unknown => "unknown".to_string(),
    }
}

/// Notes on reads in `window` of values no operation that may have taken
/// effect wrote.
fn unwritten_reads(key: &str, history: &[Event], ops: &[KeyOp], window: &Window) -> Vec<String> {
    let written: HashSet<Value> = ops.iter().filter_map(KeyOp::written).collect();
    let mut notes = BTreeSet::new();
    for window_op in &window.ops {
        let Some(Observed::Read(Some(v))) = ops.get(window_op.source).and_then(|op| op.observed)
        else {
            continue;
        };
        if written.contains(&v) {
            continue;
        }
        let failed_writer = history.iter().any(|e| {
            e.key == key
                && e.outcome == Outcome::Fail
                && matches!(e.op, Op::Put(w) | Op::PutIfAbsent(w) | Op::PutIfMatch { new: w, .. } if w == v)
        });
        notes.insert(if failed_writer {
            format!(
                "value {v} was written only by operations that failed, \
                 and a failed operation must not take effect"
            )
        } else {
            format!("value {v} was never written to this key")
        });
    }
    notes.into_iter().collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Time `ms` milliseconds into the test.
    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// An operation on key "k" by `client` from `from` to `to` ms.
    fn op(client: usize, op: Op, from: u64, to: u64, outcome: Outcome) -> Event {
        Event {
            client,
            key: "k".to_string(),
            op,
            invoked: at(from),
            completed: Some(at(to)),
            outcome,
        }
    }

    /// A completed unconditional put.
    fn put(client: usize, v: Value, from: u64, to: u64) -> Event {
        op(client, Op::Put(v), from, to, Outcome::Ok(Observed::Done))
    }

    /// A completed get that saw `seen`.
    fn get(client: usize, seen: Option<Value>, from: u64, to: u64) -> Event {
        op(client, Op::Get, from, to, Outcome::Ok(Observed::Read(seen)))
    }

    /// A completed delete.
    fn delete(client: usize, from: u64, to: u64) -> Event {
        op(client, Op::Delete, from, to, Outcome::Ok(Observed::Done))
    }

    /// A put whose outcome is unknown.
    fn unknown_put(client: usize, v: Value, from: u64) -> Event {
        Event {
            completed: None,
            ..op(client, Op::Put(v), from, from, Outcome::Unknown)
        }
    }

    /// The violation, or a panic saying the history passed.
    fn violation(history: &[Event]) -> Violation {
        match check(history) {
            Err(CheckError::NotLinearizable(violation)) => violation,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    /// A pass, or a panic with the checker's explanation.
    fn passes(history: &[Event]) -> Summary {
        check(history).unwrap_or_else(|e| panic!("expected a pass:\n{e}"))
    }

    #[test]
    fn one_client_writing_reading_and_deleting_in_turn_passes() {
        let history = [
            get(1, None, 0, 1),
            put(1, 1, 2, 3),
            get(1, Some(1), 4, 5),
            op(
                1,
                Op::PutIfAbsent(2),
                6,
                7,
                Outcome::Ok(Observed::Applied(false)),
            ),
            op(
                1,
                Op::PutIfMatch {
                    expected: 1,
                    new: 3,
                },
                8,
                9,
                Outcome::Ok(Observed::Applied(true)),
            ),
            op(1, Op::List, 10, 11, Outcome::Ok(Observed::Read(Some(3)))),
            delete(1, 12, 13),
            op(
                1,
                Op::PutIfAbsent(4),
                14,
                15,
                Outcome::Ok(Observed::Applied(true)),
            ),
            op(
                1,
                Op::PutIfMatch {
                    expected: 3,
                    new: 5,
                },
                16,
                17,
                Outcome::Ok(Observed::Applied(false)),
            ),
            get(1, Some(4), 18, 19),
        ];
        let summary = passes(&history);
        assert_eq!(summary.keys, 1);
        assert_eq!(summary.ops_checked, history.len());
    }

    #[test]
    fn a_read_after_an_acknowledged_write_that_returns_the_previous_value_fails() {
        let history = [put(1, 1, 0, 10), put(1, 2, 20, 30), get(2, Some(1), 40, 50)];
        let v = violation(&history);
        assert_eq!(v.key, "k");
        assert_eq!(v.culprit, 2, "{v}");
        assert!(v.explanation.contains("cannot be linearized"), "{v}");
    }

    #[test]
    fn a_read_of_a_value_nobody_wrote_fails_with_a_note_saying_so() {
        let history = [put(1, 1, 0, 10), get(2, Some(7), 20, 30)];
        let v = violation(&history);
        assert_eq!(v.culprit, 1);
        assert_eq!(
            v.window,
            vec![1],
            "a lone read of 7 fails whatever came before\n{v}"
        );
        assert!(v.explanation.contains("value 7 was never written"), "{v}");
    }

    #[test]
    fn a_read_overlapping_two_concurrent_writes_may_see_either() {
        for seen in [1, 2] {
            let history = [
                put(1, 1, 0, 100),
                put(2, 2, 10, 90),
                get(3, Some(seen), 50, 60),
                get(3, Some(seen), 110, 120),
            ];
            passes(&history);
        }
    }

    #[test]
    fn two_reads_of_concurrent_writes_may_disagree_while_the_writes_are_in_flight() {
        // Put(1) then Put(2) linearized, reader A sees 1 then reader B sees 2,
        // or the other way round: both fine while both puts are in flight.
        let history = [
            put(1, 1, 0, 100),
            put(2, 2, 0, 100),
            get(3, Some(1), 10, 20),
            get(4, Some(2), 30, 40),
        ];
        passes(&history);
    }

    #[test]
    fn a_later_read_going_back_to_an_older_value_fails() {
        // Put(2) is in flight, so reading 1 or 2 is fine, but once a read has
        // seen 2, a read that starts after it cannot see 1 again.
        let history = [
            put(1, 1, 0, 10),
            put(2, 2, 20, 200),
            get(3, Some(2), 30, 40),
            get(4, Some(1), 50, 60),
        ];
        let v = violation(&history);
        assert_eq!(v.culprit, 3, "{v}");
    }

    #[test]
    fn an_acknowledged_put_lost_when_a_later_get_finds_nothing_fails() {
        let history = [
            put(1, 1, 0, 10),
            get(2, Some(1), 20, 30),
            get(2, None, 40, 50),
        ];
        let v = violation(&history);
        assert_eq!(v.culprit, 2, "{v}");
    }

    #[test]
    fn a_concurrent_delete_explains_a_get_that_finds_nothing() {
        let history = [put(1, 1, 0, 10), delete(3, 15, 100), get(2, None, 40, 50)];
        passes(&history);
    }

    #[test]
    fn an_unknown_put_that_a_later_read_observes_passes() {
        let history = [
            put(1, 1, 0, 10),
            unknown_put(2, 2, 20),
            get(1, Some(1), 30, 40),
            get(1, Some(2), 5_000, 5_010),
            get(3, Some(2), 6_000, 6_010),
        ];
        let summary = passes(&history);
        assert_eq!(summary.unknown, 1);
    }

    #[test]
    fn an_unknown_put_that_nobody_observes_passes() {
        let history = [
            put(1, 1, 0, 10),
            unknown_put(2, 2, 20),
            get(1, Some(1), 30, 40),
            get(3, Some(1), 6_000, 6_010),
        ];
        passes(&history);
    }

    #[test]
    fn an_unknown_put_observed_before_it_was_invoked_fails() {
        let history = [get(1, Some(2), 0, 10), unknown_put(2, 2, 20)];
        violation(&history);
    }

    #[test]
    fn an_unknown_put_cannot_come_back_after_being_overwritten() {
        // Once 2 was seen and then overwritten by 3, nothing can bring 2 back.
        let history = [
            unknown_put(2, 2, 0),
            get(1, Some(2), 10, 20),
            put(1, 3, 30, 40),
            get(1, Some(2), 50, 60),
        ];
        violation(&history);
    }

    #[test]
    fn put_if_absent_succeeding_twice_without_a_delete_in_between_fails() {
        let history = [
            op(
                1,
                Op::PutIfAbsent(1),
                0,
                10,
                Outcome::Ok(Observed::Applied(true)),
            ),
            op(
                2,
                Op::PutIfAbsent(2),
                20,
                30,
                Outcome::Ok(Observed::Applied(true)),
            ),
        ];
        violation(&history);
    }

    #[test]
    fn put_if_absent_succeeding_twice_with_a_delete_in_between_passes() {
        let history = [
            op(
                1,
                Op::PutIfAbsent(1),
                0,
                10,
                Outcome::Ok(Observed::Applied(true)),
            ),
            delete(3, 12, 18),
            op(
                2,
                Op::PutIfAbsent(2),
                20,
                30,
                Outcome::Ok(Observed::Applied(true)),
            ),
        ];
        passes(&history);
    }

    #[test]
    fn put_if_absent_failing_on_an_empty_key_is_explained_by_an_unknown_put() {
        let history = [
            unknown_put(2, 9, 0),
            op(
                1,
                Op::PutIfAbsent(1),
                10,
                20,
                Outcome::Ok(Observed::Applied(false)),
            ),
        ];
        passes(&history);
        let without_the_unknown_put = [history[1].clone()];
        violation(&without_the_unknown_put);
    }

    #[test]
    fn put_if_match_applied_while_the_key_held_another_value_fails() {
        let history = [
            put(1, 1, 0, 10),
            put(1, 2, 20, 30),
            op(
                2,
                Op::PutIfMatch {
                    expected: 1,
                    new: 3,
                },
                40,
                50,
                Outcome::Ok(Observed::Applied(true)),
            ),
        ];
        let v = violation(&history);
        assert_eq!(v.culprit, 2, "{v}");
    }

    #[test]
    fn put_if_match_reporting_a_failed_precondition_on_the_expected_value_fails() {
        let history = [
            put(1, 1, 0, 10),
            op(
                2,
                Op::PutIfMatch {
                    expected: 1,
                    new: 3,
                },
                20,
                30,
                Outcome::Ok(Observed::Applied(false)),
            ),
        ];
        violation(&history);
    }

    #[test]
    fn a_failed_put_whose_value_is_read_fails() {
        let history = [
            put(1, 1, 0, 10),
            op(2, Op::Put(2), 20, 30, Outcome::Fail),
            get(3, Some(2), 40, 50),
        ];
        let v = violation(&history);
        assert!(
            v.explanation
                .contains("written only by operations that failed"),
            "{v}"
        );
    }

    #[test]
    fn a_failed_delete_that_took_effect_fails() {
        let history = [
            put(1, 1, 0, 10),
            op(2, Op::Delete, 20, 30, Outcome::Fail),
            get(3, None, 40, 50),
        ];
        violation(&history);
    }

    #[test]
    fn a_listing_that_misses_an_acknowledged_put_fails() {
        let history = [
            put(1, 1, 0, 10),
            op(2, Op::List, 20, 30, Outcome::Ok(Observed::Read(None))),
        ];
        violation(&history);
    }

    #[test]
    fn keys_are_checked_independently_and_the_failing_key_is_named() {
        let mut history = vec![put(1, 1, 0, 10), get(2, Some(1), 20, 30)];
        let mut other = vec![put(1, 5, 0, 10), get(2, None, 20, 30)];
        for e in &mut other {
            e.key = "other".to_string();
        }
        history.extend(other);
        let v = violation(&history);
        assert_eq!(v.key, "other");
        assert_eq!(v.culprit, 3);
    }

    #[test]
    fn a_result_that_does_not_fit_its_operation_is_rejected_as_malformed() {
        let history = [
            put(1, 1, 0, 10),
            op(2, Op::Get, 20, 30, Outcome::Ok(Observed::Done)),
        ];
        match check(&history) {
            Err(CheckError::Malformed { event: 1, reason }) => {
                assert!(reason.contains("Get"), "{reason}")
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
        let applied_put = [op(
            1,
            Op::Put(1),
            0,
            1,
            Outcome::Ok(Observed::Applied(true)),
        )];
        assert!(matches!(
            check(&applied_put),
            Err(CheckError::Malformed { event: 0, .. })
        ));
    }

    #[test]
    fn an_ok_without_completion_or_completing_before_invocation_is_malformed() {
        let no_completion = [Event {
            completed: None,
            ..put(1, 1, 0, 10)
        }];
        assert!(matches!(
            check(&no_completion),
            Err(CheckError::Malformed { event: 0, .. })
        ));
        let backwards = [put(1, 1, 10, 5)];
        assert!(matches!(
            check(&backwards),
            Err(CheckError::Malformed { event: 0, .. })
        ));
    }

    #[test]
    fn a_linearizable_history_too_concurrent_for_the_budget_is_reported_not_passed() {
        // 30 puts all in flight together, then a get that sees the first
        // one: the search tries that put first and must go through the
        // subsets of the others before finding it has to come last.
        let mut history: Vec<Event> = (0..30).map(|i| put(i, i as Value, 0, 1_000)).collect();
        history.push(get(99, Some(0), 2_000, 2_001));
        let limits = Limits {
            max_steps_per_key: 20_000,
        };
        match check_with(&history, &limits) {
            Err(CheckError::TooConcurrent { key, steps, limit }) => {
                assert_eq!(key, "k");
                assert_eq!(limit, 20_000);
                assert!(steps > limit);
            }
            other => panic!("expected TooConcurrent, got {other:?}"),
        }
    }

    #[test]
    fn a_violation_in_a_history_too_concurrent_to_search_whole_is_found_by_a_window() {
        // 30 puts all in flight together, then a get that finds nothing. The
        // whole search would try every subset of the puts, but the get alone
        // fails whatever the key held once a put was acknowledged.
        let mut history: Vec<Event> = (0..30).map(|i| put(i, i as Value, 0, 1_000)).collect();
        history.push(get(99, None, 2_000, 2_001));
        let limits = Limits {
            max_steps_per_key: 20_000,
        };
        match check_with(&history, &limits) {
            Err(CheckError::NotLinearizable(v)) => {
                assert_eq!(v.culprit, 30, "{v}");
                assert_eq!(v.window, vec![30], "{v}");
            }
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn the_recorder_times_calls_and_leaves_uncompleted_calls_unknown() {
        let history = History::new();
        let first = history.invoke(1, "k", Op::Put(1));
        history.complete(first, Outcome::Ok(Observed::Done));
        let read = history.invoke(2, "k", Op::Get);
        history.complete(read, Outcome::Ok(Observed::Read(Some(1))));
        let _never_completed = history.invoke(3, "k", Op::Put(2));
        let events = history.events();
        assert_eq!(events.len(), 3);
        assert!(events[0].completed.is_some_and(|c| c >= events[0].invoked));
        assert!(events[1].invoked >= events[0].completed.unwrap_or_default());
        assert_eq!(events[2].outcome, Outcome::Unknown);
        let summary = history.check().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(summary.unknown, 1);
    }

    // -- Against brute force -----------------------------------------------

    /// `n` in release builds, a tenth in debug ones (these tests also run in
    /// every test binary that includes this module).
    fn rounds(n: usize) -> usize {
        if cfg!(debug_assertions) {
            n / 10
        } else {
            n
        }
    }

    /// Whether some order of `history` (one key) explains it, by trying
    /// every order: an operation may go next if every operation that
    /// completed before its invocation has gone; unknown ones may be left
    /// out; failed ones are left out.
    fn brute_force(history: &[Event]) -> bool {
        fn search(ops: &[&Event], placed: &mut Vec<bool>, state: Option<Value>) -> bool {
            let done = |e: &Event| !matches!(e.outcome, Outcome::Ok(_));
            if ops.iter().zip(placed.iter()).all(|(e, &p)| p || done(e)) {
                return true;
            }
            for i in 0..ops.len() {
                let must_wait = ops.iter().zip(placed.iter()).any(|(p, &placed)| {
                    !placed
                        && matches!(p.outcome, Outcome::Ok(_))
                        && p.completed.is_some_and(|c| c < ops[i].invoked)
                });
                if placed[i] || must_wait {
                    continue;
                }
                let (holds, next) = match ops[i].op {
                    Op::Put(v) => (true, Some(v)),
                    Op::Delete => (true, None),
                    Op::Get | Op::List => (true, state),
                    Op::PutIfAbsent(v) => (state.is_none(), Some(v)),
                    Op::PutIfMatch { expected, new } => (state == Some(expected), Some(new)),
                };
                let after = if holds && !ops[i].op.is_read() {
                    next
                } else {
                    state
                };
                let fits = match ops[i].outcome {
                    Outcome::Ok(Observed::Read(seen)) => seen == state,
                    Outcome::Ok(Observed::Applied(applied)) => applied == holds,
                    _ => true,
                };
                if fits {
                    placed[i] = true;
                    let found = search(ops, placed, after);
                    placed[i] = false;
                    if found {
                        return true;
                    }
                }
            }
            false
        }
        let ops: Vec<&Event> = history
            .iter()
            .filter(|e| e.outcome != Outcome::Fail)
            .collect();
        search(&ops, &mut vec![false; ops.len()], None)
    }

    /// A small history with random results, values from a pool of three
    /// (so not unique) and coarse times (so many ties).
    fn random_small_history(rng: &mut Rng) -> Vec<Event> {
        let n = 2 + rng.below(6) as usize;
        (0..n)
            .map(|_| {
                let value = 1 + rng.below(3);
                let (op, result) = match rng.below(6) {
                    0 => (Op::Put(value), Observed::Done),
                    1 => (Op::Delete, Observed::Done),
                    2 => (Op::PutIfAbsent(value), Observed::Applied(rng.chance(0.5))),
                    3 => (
                        Op::PutIfMatch {
                            expected: 1 + rng.below(3),
                            new: value,
                        },
                        Observed::Applied(rng.chance(0.5)),
                    ),
                    4 => (
                        Op::Get,
                        Observed::Read(Some(value).filter(|_| rng.chance(0.7))),
                    ),
                    _ => (
                        Op::List,
                        Observed::Read(Some(value).filter(|_| rng.chance(0.7))),
                    ),
                };
                let from = rng.below(12);
                let outcome = match rng.below(10) {
                    0 => Outcome::Unknown,
                    1 => Outcome::Fail,
                    _ => Outcome::Ok(result),
                };
                Event {
                    client: rng.below(3) as usize,
                    key: "k".to_string(),
                    op,
                    invoked: at(from),
                    completed: Some(at(from + rng.below(8))),
                    outcome,
                }
            })
            .collect()
    }

    #[test]
    fn small_random_histories_get_the_same_verdict_as_trying_every_order() {
        let mut rng = Rng(2024);
        let (mut passed, mut failed) = (0, 0);
        for round in 0..rounds(20_000) {
            let history = random_small_history(&mut rng);
            let expected = brute_force(&history);
            match check(&history) {
                Ok(_) if expected => passed += 1,
                Err(CheckError::NotLinearizable(_)) if !expected => failed += 1,
                other => panic!(
                    "round {round}: brute force says {expected}, checker says {other:?}\n{history:#?}"
                ),
            }
        }
        assert!(
            passed > rounds(2_000) && failed > rounds(2_000),
            "{passed} passed, {failed} failed"
        );
    }

    #[test]
    fn with_a_tiny_budget_a_window_only_reports_real_violations() {
        // The whole search runs out of steps at once, so any violation
        // reported comes from a window, which must be a sound proof.
        let limits = Limits {
            max_steps_per_key: 3,
        };
        let mut rng = Rng(77);
        let mut found_by_windows = 0;
        for round in 0..rounds(20_000) {
            let history = random_small_history(&mut rng);
            match check_with(&history, &limits) {
                Ok(_) | Err(CheckError::TooConcurrent { .. }) => {}
                Err(CheckError::NotLinearizable(v)) => {
                    assert!(
                        !brute_force(&history),
                        "round {round}: window reported a violation in a linearizable history:\n{v}\n{history:#?}"
                    );
                    found_by_windows += 1;
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert!(found_by_windows > rounds(1_000), "{found_by_windows}");
    }

    #[test]
    fn every_window_that_fails_on_its_own_belongs_to_a_non_linearizable_history() {
        // The explanation (and the fallback when the budget runs out) relies
        // on this: a window fails only if the whole history does, for any
        // start and end.
        let mut rng = Rng(99);
        let mut failing_windows = 0;
        for round in 0..rounds(5_000) {
            let history = random_small_history(&mut rng);
            let (by_key, _) = split_by_key(&history);
            let Some(ops) = by_key.get("k") else {
                continue;
            };
            let linearizable = brute_force(&history);
            let starts = history.iter().map(|e| Some(e.invoked));
            let ends = history.iter().map(|e| e.completed);
            for start in starts.chain([None]) {
                for end in ends.clone().chain([None]) {
                    let mut budget = 1_000_000;
                    if window_failure(ops, start, end, &mut budget).is_some() {
                        assert!(
                            !linearizable,
                            "round {round}: window {start:?}..{end:?} fails on its own \
                             but the history is linearizable:\n{history:#?}"
                        );
                        failing_windows += 1;
                    }
                }
            }
        }
        assert!(failing_windows > rounds(10_000), "{failing_windows}");
    }

    // -- Random histories --------------------------------------------------

    /// SplitMix64: a small, seedable generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in `0..n` (n > 0).
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// True with probability `p`.
        fn chance(&mut self, p: f64) -> bool {
            ((self.next() >> 11) as f64) / ((1u64 << 53) as f64) < p
        }
    }

    /// The shape of a simulated workload on one key.
    #[derive(Clone, Copy)]
    struct Workload {
        clients: usize,
        ops: usize,
        unknown_writes: f64,
        failed_writes: f64,
        unknown_reads: f64,
    }

    /// Simulates clients on one linearizable register: each operation takes
    /// effect at a random point inside its interval (an unknown write at a
    /// random later point, or never) and its result is what the register
    /// held there. Values come from `next_value`, so they are unique.
    fn simulate(
        rng: &mut Rng,
        key: &str,
        w: Workload,
        first_client: usize,
        next_value: &mut Value,
    ) -> Vec<Event> {
        const US: u64 = 1_000; // nanoseconds
        let mut free_at = vec![0u64; w.clients];
        let mut events = Vec::with_capacity(w.ops);
        let mut effect_at: Vec<Option<u64>> = Vec::with_capacity(w.ops);
        let mut recent: Vec<Value> = Vec::new();
        for _ in 0..w.ops {
            let client = (0..w.clients).min_by_key(|&c| (free_at[c], c)).unwrap_or(0);
            let invoked = free_at[client] + rng.below(50 * US);
            let mut fresh = || {
                *next_value += 1;
                *next_value
            };
            let op = match rng.below(100) {
                0..=24 => Op::Put(fresh()),
                25..=44 => Op::Get,
                45..=54 => Op::List,
                55..=64 => Op::Delete,
                65..=77 => Op::PutIfAbsent(fresh()),
                _ => match recent.len() {
                    0 => Op::PutIfAbsent(fresh()),
                    n => Op::PutIfMatch {
                        expected: recent[n - 1 - rng.below(n.min(4) as u64) as usize],
                        new: fresh(),
                    },
                },
            };
            if let Op::Put(v) | Op::PutIfAbsent(v) | Op::PutIfMatch { new: v, .. } = op {
                recent.push(v);
            }
            let write = !op.is_read();
            let (effect, completed, outcome);
            if write && rng.chance(w.unknown_writes) {
                // Times out after 1 ms; took effect up to 3 ms later, or never.
                effect = rng.chance(0.5).then(|| invoked + 1 + rng.below(3_000 * US));
                completed = invoked + 1_000 * US;
                outcome = Outcome::Unknown;
            } else if write && rng.chance(w.failed_writes) {
                effect = None;
                completed = invoked + 1 + rng.below(400 * US);
                outcome = Outcome::Fail;
            } else if !write && rng.chance(w.unknown_reads) {
                effect = None;
                completed = invoked + 1_000 * US;
                outcome = Outcome::Unknown;
            } else {
                let point = invoked + 1 + rng.below(400 * US);
                effect = Some(point);
                completed = point + 1 + rng.below(400 * US);
                outcome = Outcome::Ok(Observed::Done); // result filled in below
            }
            free_at[client] = completed;
            effect_at.push(effect);
            events.push(Event {
                client: first_client + client,
                key: key.to_string(),
                op,
                invoked: Duration::from_nanos(invoked),
                completed: Some(Duration::from_nanos(completed)),
                outcome,
            });
        }
        // Run the register in the order of the linearization points.
        let mut order: Vec<(u64, usize)> = effect_at
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.map(|t| (t, i)))
            .collect();
        order.sort_unstable();
        let mut register: Option<Value> = None;
        for (_, i) in order {
            let observed = match events[i].op {
                Op::Put(v) => {
                    register = Some(v);
                    Observed::Done
                }
                Op::Delete => {
                    register = None;
                    Observed::Done
                }
                Op::PutIfAbsent(v) => {
                    let applies = register.is_none();
                    if applies {
                        register = Some(v);
                    }
                    Observed::Applied(applies)
                }
                Op::PutIfMatch { expected, new } => {
                    let applies = register == Some(expected);
                    if applies {
                        register = Some(new);
                    }
                    Observed::Applied(applies)
                }
                Op::Get | Op::List => Observed::Read(register),
            };
            if let Outcome::Ok(_) = events[i].outcome {
                events[i].outcome = Outcome::Ok(observed);
            }
        }
        events
    }

    /// A history over `keys` keys, each with its own clients.
    fn random_history(seed: u64, keys: usize, w: Workload) -> Vec<Event> {
        let mut rng = Rng(seed);
        let mut next_value = 0;
        let mut history = Vec::new();
        for k in 0..keys {
            history.extend(simulate(
                &mut rng,
                &format!("key-{k}"),
                w,
                k * w.clients,
                &mut next_value,
            ));
        }
        history
    }

    /// Makes one completed read return a value that was certainly
    /// overwritten before the read began: written by an operation that
    /// completed before some blind write (`Put` or `Delete`) that itself
    /// completed before the read was invoked. Returns the read's index.
    fn inject_stale_read(rng: &mut Rng, history: &mut [Event]) -> Option<usize> {
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| history[i].op.is_read() && matches!(history[i].outcome, Outcome::Ok(_)))
            .collect();
        let offset = rng.below(reads.len().max(1) as u64) as usize;
        for n in 0..reads.len() {
            let read = reads[(offset + n) % reads.len()];
            let (key, invoked) = (history[read].key.clone(), history[read].invoked);
            let completed_before = |e: &Event, t: Duration| {
                e.key == key
                    && matches!(e.outcome, Outcome::Ok(_))
                    && e.completed.is_some_and(|c| c < t)
            };
            let Some(blind) = history
                .iter()
                .filter(|e| matches!(e.op, Op::Put(_) | Op::Delete) && completed_before(e, invoked))
                .max_by_key(|e| e.invoked)
            else {
                continue;
            };
            let blind_invoked = blind.invoked;
            let stale = history
                .iter()
                .filter(|e| completed_before(e, blind_invoked))
                .filter_map(|e| match (&e.op, e.outcome) {
                    (Op::Put(v), Outcome::Ok(Observed::Done))
                    | (Op::PutIfAbsent(v), Outcome::Ok(Observed::Applied(true)))
                    | (Op::PutIfMatch { new: v, .. }, Outcome::Ok(Observed::Applied(true))) => {
                        Some(*v)
                    }
                    _ => None,
                })
                .rfind(|&v| history[read].outcome != Outcome::Ok(Observed::Read(Some(v))));
            if let Some(v) = stale {
                history[read].outcome = Outcome::Ok(Observed::Read(Some(v)));
                return Some(read);
            }
        }
        None
    }

    /// The workload of the performance requirement.
    const NEMESIS: Workload = Workload {
        clients: 8,
        ops: 1_500,
        unknown_writes: 0.02,
        failed_writes: 0.01,
        unknown_reads: 0.01,
    };

    #[test]
    fn simulated_linearizable_registers_always_pass() {
        for seed in 0..150 {
            let w = Workload {
                clients: 2 + (seed as usize % 7),
                ops: 300,
                unknown_writes: [0.0, 0.02, 0.1][seed as usize % 3],
                ..NEMESIS
            };
            let history = random_history(seed, 2, w);
            if let Err(e) = check(&history) {
                panic!("seed {seed}: a linearizable history failed:\n{e}");
            }
        }
    }

    #[test]
    fn a_single_stale_read_injected_into_a_simulated_history_is_caught() {
        let mut injected = 0;
        for seed in 0..150 {
            let w = Workload {
                clients: 2 + (seed as usize % 7),
                ops: 300,
                unknown_writes: [0.0, 0.02, 0.1][seed as usize % 3],
                ..NEMESIS
            };
            let mut history = random_history(seed, 2, w);
            let mut rng = Rng(seed ^ 0xdead_beef);
            let Some(read) = inject_stale_read(&mut rng, &mut history) else {
                continue;
            };
            injected += 1;
            match check(&history) {
                Err(CheckError::NotLinearizable(v)) => {
                    assert_eq!(v.key, history[read].key, "seed {seed}");
                    assert!(
                        v.window.contains(&read),
                        "seed {seed}: the window should contain the stale read {read}:\n{v}"
                    );
                }
                other => panic!("seed {seed}: stale read {read} not caught: {other:?}"),
            }
        }
        assert!(
            injected > 100,
            "only {injected} histories could be corrupted"
        );
    }

    #[test]
    fn eight_keys_of_1500_operations_by_8_clients_check_in_well_under_a_second() {
        let history = random_history(42, 8, NEMESIS);
        let started = Instant::now();
        let summary = check(&history).unwrap_or_else(|e| panic!("{e}"));
        let elapsed = started.elapsed();
        println!(
            "checked {} events in {elapsed:?}: {summary:?}",
            history.len()
        );
        assert_eq!(summary.keys, 8);
        assert!(summary.unknown > 0);
        // Debug builds are far slower; the requirement is for release.
        if !cfg!(debug_assertions) {
            assert!(elapsed < Duration::from_millis(500), "took {elapsed:?}");
        }
    }

    #[test]
    fn a_stale_read_in_a_large_history_is_caught_quickly_with_a_small_window() {
        let mut history = random_history(7, 8, NEMESIS);
        let mut rng = Rng(7);
        let read = inject_stale_read(&mut rng, &mut history)
            .unwrap_or_else(|| panic!("no read to corrupt"));
        let started = Instant::now();
        let v = violation(&history);
        let elapsed = started.elapsed();
        println!("caught in {elapsed:?}:\n{v}");
        assert!(v.window.contains(&read), "{v}");
        assert!(
            v.window.len() < 100,
            "window of {} operations:\n{v}",
            v.window.len()
        );
        if !cfg!(debug_assertions) {
            assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
        }
    }
}
