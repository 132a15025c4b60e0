//! The nemesis's clients: a few concurrent S3 clients (the AWS SDK for
//! Rust, over TLS, retries off, so every outcome is recorded as it
//! happened) on a small set of keys, recording each call in the
//! linearizability checker's history.
//!
//! Every write carries a body that names its value (unique per write), the
//! client and the client's op number, so a read names exactly the write it
//! saw. A listing only shows ETags, so the ETag (MD5) of every body sent is
//! remembered before it is sent.

use crate::linearizable::{Call, Event, History, Observed, Op, Outcome, Value};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use md5::{Digest, Md5};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many keys the clients share: few, so that they collide often.
pub const KEYS: usize = 6;

/// A value that no write has: what a listing's unknown ETag or an
/// unparseable body is recorded as, so the checker flags it.
const NOT_WRITTEN: Value = u64::MAX;

/// The name of key `i`.
pub fn key_name(i: usize) -> String {
    format!("nemesis/key{i}")
}

/// What the clients share: the history, the tallies, the stop flag.
pub struct Workload {
    /// Every call, for the checker.
    pub history: History,
    /// Counts of outcomes, answers and times of success.
    pub tally: Mutex<Tally>,
    /// Set to make every client finish its call and return.
    pub stop: AtomicBool,
    bucket: String,
    /// Conditional puts (`If-None-Match: *`, `If-Match`) in the mix.
    conditional: bool,
    /// The value of every body sent, by its ETag (hex MD5).
    etags: Mutex<HashMap<String, Value>>,
}

/// What the clients saw, op by op.
#[derive(Default)]
pub struct Tally {
    /// Calls with a definite result (2xx, a 404 read, a 412).
    pub ok: u64,
    /// Calls that certainly had no effect (other 4xx, 507).
    pub fail: u64,
    /// Calls whose effect is unknown (timeouts, transport errors, 5xx).
    pub unknown: u64,
    /// The same three counts by kind of call.
    pub by_op: BTreeMap<&'static str, [u64; 3]>,
    /// Every answer other than a 2xx, 404-on-GET or 412, counted.
    pub answers: BTreeMap<Answer, u64>,
    /// Calls that got no answer within the client's timeout.
    pub timeouts: u64,
    /// Calls that failed in transport, by the first words of the error.
    pub transport: BTreeMap<String, u64>,
    /// When calls with a definite result completed (history clock): what
    /// unavailability is measured on.
    pub successes: Vec<Duration>,
    /// The slowest call and what it was.
    pub slowest: (Duration, String),
    /// Anything a correct store cannot produce that the history cannot hold
    /// as is (a listing's unknown ETag, a body not written by a client).
    pub oddities: Vec<String>,
}

/// An error answer to one kind of call.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Answer {
    pub status: u16,
    pub code: String,
    pub op: &'static str,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} on {}", self.status, self.code, self.op)
    }
}

impl Answer {
    /// Whether the issue ("never 5xx") allows it: a 503 for a write whose
    /// outcome is unknown, or a 507 refusing a write on a full disk.
    pub fn allowed(&self) -> bool {
        let write = self.op.starts_with("PUT") || self.op == "DELETE";
        self.status < 500 || (write && matches!(self.status, 503 | 507))
    }
}

impl Tally {
    /// 5xx answers and their counts.
    pub fn five_xx(&self) -> impl Iterator<Item = (&Answer, &u64)> {
        self.answers.iter().filter(|(a, _)| a.status >= 500)
    }

    /// 5xx answers the issue does not allow, and their counts.
    pub fn disallowed_5xx(&self) -> impl Iterator<Item = (&Answer, &u64)> {
        self.five_xx().filter(|(a, _)| !a.allowed())
    }
}

/// Why a call did not succeed.
#[derive(Debug)]
enum Failure {
    /// The service answered with this status and S3 code.
    Answered { status: u16, code: String },
    /// No answer within the client's timeout.
    Timeout,
    /// The connection failed or broke, or the answer could not be read.
    Transport(String),
    /// The SDK did not send the request at all.
    NotSent(String),
}

impl Failure {
    fn of<E: ProvideErrorMetadata + std::fmt::Debug>(e: &SdkError<E, HttpResponse>) -> Failure {
        match e {
            SdkError::ServiceError(s) => Failure::Answered {
                status: s.raw().status().as_u16(),
                code: s.err().code().unwrap_or("(no code)").to_string(),
            },
            SdkError::TimeoutError(_) => Failure::Timeout,
            SdkError::DispatchFailure(d) if d.is_timeout() => Failure::Timeout,
            SdkError::DispatchFailure(d) => Failure::Transport(format!("dispatch: {d:?}")),
            SdkError::ResponseError(r) => Failure::Transport(format!(
                "unreadable answer, status {}",
                r.raw().status().as_u16()
            )),
            SdkError::ConstructionFailure(c) => Failure::NotSent(format!("{c:?}")),
            other => Failure::Transport(format!("{other:?}")),
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Failure::Answered { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What a failed write did: a 4xx (or 507, refused before writing)
    /// guarantees no effect; anything else may have taken effect.
    fn write_outcome(&self) -> Outcome {
        match self {
            Failure::Answered { status, .. } if (400..500).contains(status) || *status == 507 => {
                Outcome::Fail
            }
            Failure::NotSent(_) => Outcome::Fail,
            _ => Outcome::Unknown,
        }
    }

    /// What a failed read did: nothing, but an unknown read is not a
    /// failure of the store to be counted as definite.
    fn read_outcome(&self) -> Outcome {
        match self {
            Failure::Answered { status, .. } if (400..500).contains(status) => Outcome::Fail,
            Failure::NotSent(_) => Outcome::Fail,
            _ => Outcome::Unknown,
        }
    }
}

impl Workload {
    pub fn new(bucket: &str, conditional: bool) -> Workload {
        Workload {
            history: History::new(),
            tally: Mutex::new(Tally::default()),
            stop: AtomicBool::new(false),
            bucket: bucket.to_string(),
            conditional,
            etags: Mutex::new(HashMap::new()),
        }
    }

    /// The body of write `value`, and remembers its ETag.
    fn body_of(&self, value: Value, client: usize, n: u64) -> Vec<u8> {
        let body = format!("nemesis value {value} written by client {client} as its op {n}\n");
        let etag = hex::encode(Md5::digest(body.as_bytes()));
        self.etags.lock().unwrap().insert(etag, value);
        body.into_bytes()
    }

    fn value_of_etag(&self, etag: &str) -> Option<Value> {
        let etag = etag.trim_matches('"');
        self.etags.lock().unwrap().get(etag).copied()
    }

    /// Completes `call` and counts it.
    fn finish(
        &self,
        call: Call,
        op: &'static str,
        started: Instant,
        outcome: Outcome,
        failure: Option<&Failure>,
    ) {
        self.history.complete(call, outcome);
        self.count(op, started, outcome, failure);
    }

    fn count(
        &self,
        op: &'static str,
        started: Instant,
        outcome: Outcome,
        failure: Option<&Failure>,
    ) {
        let took = started.elapsed();
        let mut t = self.tally.lock().unwrap();
        let slot = match outcome {
            Outcome::Ok(_) => {
                t.ok += 1;
                let now = self.history.now();
                t.successes.push(now);
                0
            }
            Outcome::Fail => {
                t.fail += 1;
                1
            }
            Outcome::Unknown => {
                t.unknown += 1;
                2
            }
        };
        t.by_op.entry(op).or_default()[slot] += 1;
        if took > t.slowest.0 {
            t.slowest = (took, format!("{op} ({outcome:?})"));
        }
        match failure {
            Some(Failure::Answered { status, code }) => {
                let answer = Answer {
                    status: *status,
                    code: code.clone(),
                    op,
                };
                *t.answers.entry(answer).or_default() += 1;
            }
            Some(Failure::Timeout) => t.timeouts += 1,
            Some(Failure::Transport(e) | Failure::NotSent(e)) => {
                let head: String = e.chars().take(60).collect();
                *t.transport.entry(head).or_default() += 1;
            }
            None => {}
        }
    }

    fn odd(&self, what: String) {
        self.tally.lock().unwrap().oddities.push(what);
    }
}

/// One client: its own SDK client (and connections), its own random mix.
pub struct Client {
    id: usize,
    s3: aws_sdk_s3::Client,
    w: Arc<Workload>,
    rng: StdRng,
    /// Writes made so far (numbers this client's values).
    writes: u64,
    /// Per key, the last value this client read and its ETag, for If-Match.
    seen: HashMap<usize, (Value, String)>,
}

/// How a call ended, as the history and the tally want it.
type Ending = (Outcome, Option<Failure>);

impl Client {
    /// Client `id` (1 and up; its values are `id * 1_000_000 + n`).
    pub fn new(id: usize, s3: aws_sdk_s3::Client, w: Arc<Workload>, seed: u64) -> Client {
        Client {
            id,
            s3,
            w,
            rng: StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            writes: 0,
            seen: HashMap::new(),
        }
    }

    /// Calls until the workload's stop flag is set.
    pub async fn run(mut self) {
        while !self.w.stop.load(Ordering::Relaxed) {
            let key = self.rng.gen_range(0..KEYS);
            let roll = self.rng.gen_range(0..100);
            match (roll, self.w.conditional) {
                (0..=29, _) => self.put(key).await,
                (30..=54, _) => {
                    self.get(key).await;
                }
                (55..=64, _) => self.delete(key).await,
                (65..=79, _) => self.list().await,
                (80..=89, true) => self.put_if_absent(key).await,
                (_, true) => self.put_if_match(key).await,
                (_, false) => self.put(key).await,
            }
            let pause = self.rng.gen_range(5..25);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// A new value and its body.
    fn next_write(&mut self) -> (Value, Vec<u8>) {
        self.writes += 1;
        let value = self.id as u64 * 1_000_000 + self.writes;
        (value, self.w.body_of(value, self.id, self.writes))
    }

    fn put_request(
        &self,
        key: usize,
        body: Vec<u8>,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        self.s3
            .put_object()
            .bucket(&self.w.bucket)
            .key(key_name(key))
            .body(ByteStream::from(body))
    }

    async fn put(&mut self, key: usize) {
        let (value, body) = self.next_write();
        let request = self.put_request(key, body);
        let call = self
            .w
            .history
            .invoke(self.id, key_name(key), Op::Put(value));
        let started = Instant::now();
        let (outcome, failure) = write_ending(request.send().await);
        self.w
            .finish(call, "PUT", started, outcome, failure.as_ref());
    }

    async fn put_if_absent(&mut self, key: usize) {
        let (value, body) = self.next_write();
        let request = self.put_request(key, body).if_none_match("*");
        let call = self
            .w
            .history
            .invoke(self.id, key_name(key), Op::PutIfAbsent(value));
        let started = Instant::now();
        let (outcome, failure) = conditional_ending(request.send().await);
        self.w.finish(
            call,
            "PUT If-None-Match",
            started,
            outcome,
            failure.as_ref(),
        );
    }

    /// A put conditional on the value this client last read; a plain read
    /// first when it has read none.
    async fn put_if_match(&mut self, key: usize) {
        let Some((expected, etag)) = self.seen.get(&key).cloned() else {
            self.get(key).await;
            return;
        };
        let (new, body) = self.next_write();
        let request = self.put_request(key, body).if_match(etag);
        let op = Op::PutIfMatch { expected, new };
        let call = self.w.history.invoke(self.id, key_name(key), op);
        let started = Instant::now();
        let (outcome, failure) = conditional_ending(request.send().await);
        self.w
            .finish(call, "PUT If-Match", started, outcome, failure.as_ref());
    }

    async fn delete(&mut self, key: usize) {
        let request = self
            .s3
            .delete_object()
            .bucket(&self.w.bucket)
            .key(key_name(key));
        let call = self.w.history.invoke(self.id, key_name(key), Op::Delete);
        let started = Instant::now();
        let (outcome, failure) = write_ending(request.send().await);
        self.w
            .finish(call, "DELETE", started, outcome, failure.as_ref());
    }

    /// Reads `key`, records the read, and returns what it saw when it
    /// saw something definite.
    pub async fn get(&mut self, key: usize) -> Outcome {
        let request = self
            .s3
            .get_object()
            .bucket(&self.w.bucket)
            .key(key_name(key));
        let call = self.w.history.invoke(self.id, key_name(key), Op::Get);
        let started = Instant::now();
        let (outcome, failure) = self.read_object(request).await;
        if let Outcome::Ok(Observed::Read(None)) = outcome {
            self.seen.remove(&key);
        }
        self.w
            .finish(call, "GET", started, outcome, failure.as_ref());
        outcome
    }

    async fn read_object(
        &mut self,
        request: aws_sdk_s3::operation::get_object::builders::GetObjectFluentBuilder,
    ) -> Ending {
        let key = request.get_key().clone().unwrap_or_default();
        let got = match request.send().await {
            Ok(got) => got,
            Err(e) => {
                let f = Failure::of(&e);
                return match &f {
                    Failure::Answered { status: 404, code } if code == "NoSuchKey" => {
                        (Outcome::Ok(Observed::Read(None)), None)
                    }
                    _ => (f.read_outcome(), Some(f)),
                };
            }
        };
        let etag = got.e_tag.clone().unwrap_or_default();
        let body = match got.body.collect().await {
            Ok(b) => b.into_bytes(),
            Err(e) => {
                let f = Failure::Transport(format!("body: {e}"));
                return (Outcome::Unknown, Some(f));
            }
        };
        let text = String::from_utf8_lossy(&body);
        let value = match text.split_whitespace().nth(2).and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => {
                self.w.odd(format!(
                    "GET {key} returned a body no client wrote: {text:?}"
                ));
                NOT_WRITTEN
            }
        };
        if let Some(i) = (0..KEYS).find(|i| key_name(*i) == key) {
            self.seen.insert(i, (value, etag));
        }
        (Outcome::Ok(Observed::Read(Some(value))), None)
    }

    /// Lists every key; the listing is recorded as one read per key, all
    /// with the listing's times.
    async fn list(&mut self) {
        let request = self
            .s3
            .list_objects_v2()
            .bucket(&self.w.bucket)
            .prefix("nemesis/");
        let invoked = self.w.history.now();
        let started = Instant::now();
        let answer = request.send().await;
        let completed = self.w.history.now();
        let (reads, failure): (Vec<Outcome>, Option<Failure>) = match answer {
            Ok(listing) => {
                if listing.is_truncated == Some(true) {
                    self.w.odd("a listing of 6 keys came back truncated".into());
                }
                let shown: HashMap<String, String> = listing
                    .contents()
                    .iter()
                    .map(|o| {
                        (
                            o.key().unwrap_or("").to_string(),
                            o.e_tag().unwrap_or("").to_string(),
                        )
                    })
                    .collect();
                let reads = (0..KEYS)
                    .map(|i| {
                        let seen = shown.get(&key_name(i)).map(|etag| {
                            self.w.value_of_etag(etag).unwrap_or_else(|| {
                                self.w.odd(format!(
                                    "LIST showed {} with ETag {etag}, which no client sent",
                                    key_name(i)
                                ));
                                NOT_WRITTEN
                            })
                        });
                        Outcome::Ok(Observed::Read(seen))
                    })
                    .collect();
                (reads, None)
            }
            Err(e) => {
                let f = Failure::of(&e);
                (vec![f.read_outcome(); KEYS], Some(f))
            }
        };
        for (i, outcome) in reads.iter().enumerate() {
            self.w.history.push(Event {
                client: self.id,
                key: key_name(i),
                op: Op::List,
                invoked,
                completed: Some(completed),
                outcome: *outcome,
            });
        }
        self.w.count("LIST", started, reads[0], failure.as_ref());
    }
}

/// How a plain write (PUT, DELETE) ended, for the history.
fn write_ending<T, E: ProvideErrorMetadata + std::fmt::Debug>(
    answer: Result<T, SdkError<E, HttpResponse>>,
) -> Ending {
    match answer {
        Ok(_) => (Outcome::Ok(Observed::Done), None),
        Err(e) => {
            let f = Failure::of(&e);
            (f.write_outcome(), Some(f))
        }
    }
}

/// A conditional put's ending: 412 (and 404 for If-Match on a missing
/// key, as S3 answers) is a definite "precondition failed".
fn conditional_ending<T, E: ProvideErrorMetadata + std::fmt::Debug>(
    answer: Result<T, SdkError<E, HttpResponse>>,
) -> Ending {
    match answer {
        Ok(_) => (Outcome::Ok(Observed::Applied(true)), None),
        Err(e) => {
            let f = Failure::of(&e);
            match f.status() {
                Some(412 | 404) => (Outcome::Ok(Observed::Applied(false)), None),
                _ => (f.write_outcome(), Some(f)),
            }
        }
    }
}
