//! The deterministic heart of a shard: how a command changes its state and
//! how a query reads it.
//!
//! Every key starts with a one-byte tag naming the record type; the parts
//! after it are separated by a zero byte, which no tenant, bucket or upload
//! id may contain. Keys sort so that one bucket's objects are one range and
//! a listing is one ordered scan.

use super::command::*;
use crate::placement::Layout;
use crate::store::{Batch, Reader, StoreError};
use crate::types::{ChunkId, WriteId};
use md5::{Digest, Md5};

mod gc;

pub use gc::chunk_record;

/// S3's smallest part, except for the last one.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

mod tag {
    pub const TENANT: u8 = b'T';
    pub const ACCESS_KEY: u8 = b'K';
    pub const BUCKET: u8 = b'B';
    pub const INDEX: u8 = b'I';
    pub const OBJECT: u8 = b'O';
    pub const UPLOAD: u8 = b'U';
    pub const PART: u8 = b'P';
    pub const CHUNK: u8 = b'C';
    pub const USAGE: u8 = b'Z';
    pub const TOMBSTONE: u8 = b'D';
    pub const LAYOUT: u8 = b'L';
    pub const REBALANCE: u8 = b'R';
    /// The shard's garbage-collection floor (see `gc`).
    pub const FLOOR: u8 = b'G';
    /// Garbage a bucket made in one minute, until collected (see `gc`).
    pub const GARBAGE: u8 = b'Y';
    /// A request's write id -> the reply its first application gave.
    pub const WRITE: u8 = b'W';
    /// When a write id was recorded (ms, big-endian) then the id: the
    /// order in which old records are forgotten.
    pub const WRITE_AGE: u8 = b'w';
}

/// How long a request's write id is remembered after it was applied. A
/// proposal sent again after an unknown outcome (a timeout, a leader that
/// stepped down, a lost answer) may commit beside the first one; both are
/// appended within the proposer's deadline (`ROUTE_DEADLINE`) and commit
/// within an election or two of it, so minutes are plenty. Write times come
/// from the nodes' clocks, assumed within minutes of each other (NTP).
const REMEMBER_WRITES_MS: i64 = 10 * 60 * 1000;

/// At most this many expired write ids are forgotten per application, so
/// that forgetting keeps pace with writing without a long apply.
const FORGET_PER_WRITE: usize = 4;

fn write_key(id: WriteId) -> Vec<u8> {
    key(tag::WRITE, &[&id.0.to_be_bytes()])
}

fn write_age_key(at_ms: i64, id: Option<WriteId>) -> Vec<u8> {
    let at = (at_ms.max(0) as u64).to_be_bytes();
    match id {
        Some(id) => key(tag::WRITE_AGE, &[&at, &id.0.to_be_bytes()]),
        None => key(tag::WRITE_AGE, &[&at]),
    }
}

/// Builds `tag part0 \0 part1 \0 ... partN` (no zero after the last part).
fn key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![tag];
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

/// The prefix under which all of one bucket's records of `tag` live.
fn bucket_prefix(tag: u8, tenant: &str, bucket: &str) -> Vec<u8> {
    let mut k = key(tag, &[tenant.as_bytes(), bucket.as_bytes()]);
    k.push(0);
    k
}

fn usage_key(tenant: &str, bucket: &str) -> Vec<u8> {
    key(tag::USAGE, &[tenant.as_bytes(), bucket.as_bytes()])
}

fn object_key(tenant: &str, bucket: &str, object: &str) -> Vec<u8> {
    let mut k = bucket_prefix(tag::OBJECT, tenant, bucket);
    k.extend_from_slice(object.as_bytes());
    k
}

fn upload_key(tenant: &str, bucket: &str, object: &str, upload_id: &str) -> Vec<u8> {
    let mut k = bucket_prefix(tag::UPLOAD, tenant, bucket);
    k.extend_from_slice(object.as_bytes());
    k.push(0);
    k.extend_from_slice(upload_id.as_bytes());
    k
}

fn parts_prefix(tenant: &str, bucket: &str, upload_id: &str) -> Vec<u8> {
    let mut k = bucket_prefix(tag::PART, tenant, bucket);
    k.extend_from_slice(upload_id.as_bytes());
    k.push(0);
    k
}

fn part_key(tenant: &str, bucket: &str, upload_id: &str, part: u32) -> Vec<u8> {
    let mut k = parts_prefix(tenant, bucket, upload_id);
    k.extend_from_slice(&part.to_be_bytes());
    k
}

pub fn chunk_key(id: &ChunkId) -> Vec<u8> {
    key(tag::CHUNK, &[&id.0])
}

/// True if `k` is a chunk record; returns its id.
pub fn chunk_of_key(k: &[u8]) -> Option<ChunkId> {
    (k.first() == Some(&tag::CHUNK))
        .then(|| ChunkId::from_slice(&k[1..]))
        .flatten()
}

/// The smallest key greater than every key starting with `prefix`: keys are
/// UTF-8 or fixed-width integers, and UTF-8 never contains 0xFF.
fn after_prefix(prefix: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.push(0xFF);
    k
}

/// Refuses a write that grows a bucket past what `limit` leaves it.
/// Shrinking is always allowed, so deleting frees room even when a tenant
/// is over its quota (after the quota was lowered, say). Bytes count with
/// the garbage not collected yet: an overwrite holds the old bytes too
/// until then.
fn check_limit(limit: &Option<Limit>, before: Usage, after: Usage) -> Io<()> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let garbage = limit.elsewhere.garbage + after.garbage;
    let over = |quota: Option<u64>, elsewhere: u64, before: u64, after: u64, unit: &str| match quota
    {
        Some(q) if after > before && elsewhere + after > q => {
            let of_which = match unit {
                "bytes" if garbage > 0 => {
                    format!(" ({garbage} of them freed and awaiting garbage collection)")
                }
                _ => String::new(),
            };
            Err(ShardError::QuotaExceeded(format!(
                    "the tenant's quota of {q} {unit} would be exceeded: {} {unit} stored{of_which}, this request adds {}",
                    elsewhere + before,
                    after - before
                )))
        }
        _ => Ok(()),
    };
    over(
        limit.quota.bytes,
        limit.elsewhere.stored(),
        before.stored(),
        after.stored(),
        "bytes",
    )?;
    over(
        limit.quota.objects,
        limit.elsewhere.objects,
        before.objects,
        after.objects,
        "objects",
    )
}

/// True when `stored` was written by the request `write_id` names: the
/// write being applied is that request again (a retry) and is done already.
fn written_by(stored: Option<&Manifest>, write_id: Option<WriteId>) -> bool {
    write_id.is_some() && stored.and_then(|m| m.write_id) == write_id
}

/// Reads a catalogue record, old (a bare `created_ms`) or new.
fn bucket_record(v: &[u8]) -> Io<BucketRecord> {
    decode::<BucketRecord>(v).or_else(|_| {
        Ok(BucketRecord {
            created_ms: decode(v)?,
            creation: None,
        })
    })
}

/// Reads an index record; old ones are empty.
fn index_record(v: &[u8]) -> Io<IndexRecord> {
    if v.is_empty() {
        return Ok(IndexRecord::default());
    }
    decode(v)
}

/// Refuses a creation unless the record it finds was made by the same
/// request (`creation`), which then succeeds again changing nothing.
fn same_creation(stored: Option<WriteId>, creation: Option<WriteId>) -> Io<()> {
    if creation.is_some() && stored == creation {
        Ok(())
    } else {
        Err(ShardError::BucketExists)
    }
}

/// Takes the object being replaced, if any, out of `usage`; returns the
/// bytes it leaves to garbage collection (none for an inline body).
fn forget_object(old: Option<&Manifest>, usage: &mut Usage) -> u64 {
    let Some(old) = old else { return 0 };
    usage.bytes = usage.bytes.saturating_sub(old.size);
    usage.objects = usage.objects.saturating_sub(1);
    match old.body {
        Body::Chunks(_) => old.size,
        Body::Inline(_) => 0,
    }
}

/// Reads one shard's state, to answer a query or to work out what a
/// command changes.
pub struct State<'a> {
    r: &'a dyn Reader,
}

type Io<T> = Result<T, ShardError>;

impl From<StoreError> for ShardError {
    fn from(e: StoreError) -> ShardError {
        ShardError::Internal(e.to_string())
    }
}

/// Every chunk a shard's state records, with its stored size.
pub fn chunks_with_sizes(r: &dyn Reader) -> Io<Vec<(ChunkId, u64)>> {
    let mut out = Vec::new();
    for kv in r.prefix(&[tag::CHUNK])? {
        let (k, v) = kv?;
        if let Some(id) = chunk_of_key(&k) {
            out.push((id, chunk_record(&v)?.len));
        }
    }
    Ok(out)
}

impl<'a> State<'a> {
    pub fn new(r: &'a dyn Reader) -> State<'a> {
        State { r }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> Io<Option<T>> {
        match self.r.get(k)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    fn exists(&self, k: &[u8]) -> Io<bool> {
        Ok(self.r.contains(k)?)
    }

    fn require_index(&self, tenant: &str, bucket: &str) -> Io<()> {
        if self.exists(&key(tag::INDEX, &[tenant.as_bytes(), bucket.as_bytes()]))? {
            Ok(())
        } else {
            Err(ShardError::NoSuchBucket)
        }
    }

    fn has_prefix(&self, prefix: &[u8]) -> Io<bool> {
        Ok(self.r.prefix(prefix)?.next().transpose()?.is_some())
    }

    /// Applies `cmd` once per request: a command whose write id was applied
    /// before (the same request proposed again, see [`REMEMBER_WRITES_MS`])
    /// answers what its first application answered and changes nothing.
    /// A deterministic refusal changes nothing but that record.
    pub fn apply_once(&self, cmd: &Command, batch: &mut Batch) -> Reply {
        let Some((id, at_ms)) = cmd.write_id() else {
            return self.refusal_writes_nothing(self.apply(cmd, batch), batch);
        };
        if let Some(first) = self.get::<Reply>(&write_key(id))? {
            return first;
        }
        let reply = self.refusal_writes_nothing(self.apply(cmd, batch), batch);
        // Stale chunks are touched and the same request proposed again:
        // that refusal is not its answer.
        if matches!(&reply, Err(e) if !e.is_deterministic() || *e == ShardError::ChunksStale) {
            return reply;
        }
        self.forget_writes_before(at_ms - REMEMBER_WRITES_MS, batch)?;
        batch.insert(write_key(id), encode(&reply));
        batch.insert(write_age_key(at_ms, Some(id)), Vec::new());
        reply
    }

    fn refusal_writes_nothing(&self, reply: Reply, batch: &mut Batch) -> Reply {
        if matches!(&reply, Err(e) if e.is_deterministic()) {
            *batch = Batch::default();
        }
        reply
    }

    /// Drops a few of the write-id records older than `cutoff_ms`.
    fn forget_writes_before(&self, cutoff_ms: i64, batch: &mut Batch) -> Io<()> {
        let cutoff = write_age_key(cutoff_ms, None);
        let old = self.r.range(&[tag::WRITE_AGE], Some(&cutoff))?;
        for kv in old.take(FORGET_PER_WRITE) {
            let (k, _) = kv?;
            let id = WriteId::from_slice(&k[k.len() - 16..])
                .ok_or_else(|| ShardError::Internal("a short write-age key".into()))?;
            batch.remove(write_key(id));
            batch.remove(k);
        }
        Ok(())
    }

    /// Applies `cmd`, putting its writes into `batch`. An `Err` that is
    /// deterministic leaves the batch empty.
    pub fn apply(&self, cmd: &Command, batch: &mut Batch) -> Reply {
        match cmd {
            Command::PutTenant {
                tenant,
                created_ms,
                dek,
            } => {
                let k = key(tag::TENANT, &[tenant.as_bytes()]);
                let tombstone = key(tag::TOMBSTONE, &[tenant.as_bytes()]);
                if !self.exists(&k)? && !self.exists(&tombstone)? {
                    let record = TenantRecord {
                        created_ms: *created_ms,
                        quota: Quota::default(),
                        deks: vec![dek.clone()],
                    };
                    batch.insert(k, encode(&record));
                }
            }
            Command::CreateTenant {
                tenant,
                created_ms,
                quota,
                dek,
            } => {
                let k = key(tag::TENANT, &[tenant.as_bytes()]);
                if self.exists(&k)? {
                    return Err(ShardError::TenantExists);
                }
                if self.exists(&key(tag::TOMBSTONE, &[tenant.as_bytes()]))? {
                    return Err(ShardError::TenantBeingDeleted);
                }
                let record = TenantRecord {
                    created_ms: *created_ms,
                    quota: *quota,
                    deks: vec![dek.clone()],
                };
                batch.insert(k, encode(&record));
            }
            Command::SetQuota { tenant, quota } => {
                let k = key(tag::TENANT, &[tenant.as_bytes()]);
                let mut record: TenantRecord = self.get(&k)?.ok_or(ShardError::NoSuchTenant)?;
                record.quota = *quota;
                batch.insert(k, encode(&record));
            }
            Command::AddDek { tenant, dek } => {
                let k = key(tag::TENANT, &[tenant.as_bytes()]);
                let mut record: TenantRecord = self.get(&k)?.ok_or(ShardError::NoSuchTenant)?;
                let next = record.deks.last().map_or(1, |d| d.generation + 1);
                if dek.generation != next {
                    return Err(ShardError::InvalidArgument(format!(
                        "key generation {} is not the next one ({next}): another rotation ran meanwhile",
                        dek.generation
                    )));
                }
                record.deks.push(dek.clone());
                batch.insert(k, encode(&record));
            }
            Command::RewrapDek { tenant, old, new } => {
                let k = key(tag::TENANT, &[tenant.as_bytes()]);
                if let Some(mut record) = self.get::<TenantRecord>(&k)? {
                    if let Some(d) = record.deks.iter_mut().find(|d| *d == old) {
                        *d = new.clone();
                        batch.insert(k, encode(&record));
                    }
                }
            }
            Command::DeleteTenant { tenant } => {
                let k = key(tag::TENANT, &[tenant.as_bytes()]);
                if !self.exists(&k)? {
                    return Err(ShardError::NoSuchTenant);
                }
                batch.remove(k);
                for kv in self.r.prefix(&[tag::ACCESS_KEY])? {
                    let (k, v) = kv?;
                    if decode::<AccessKey>(&v)?.tenant == *tenant {
                        batch.remove(k);
                    }
                }
                let mut prefix = key(tag::BUCKET, &[tenant.as_bytes()]);
                prefix.push(0);
                let mut buckets = Vec::new();
                for kv in self.r.prefix(&prefix)? {
                    let (k, v) = kv?;
                    buckets.push((
                        String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                        bucket_record(&v)?.created_ms,
                    ));
                    batch.remove(k);
                }
                let names: Vec<&String> = buckets.iter().map(|(b, _)| b).collect();
                batch.insert(key(tag::TOMBSTONE, &[tenant.as_bytes()]), encode(&names));
                return Ok(Value::Buckets(buckets));
            }
            Command::ForgetTenant { tenant } => {
                batch.remove(key(tag::TOMBSTONE, &[tenant.as_bytes()]));
            }
            Command::PurgeIndex {
                tenant,
                bucket,
                max,
            } => {
                let mut left = *max;
                for t in [tag::OBJECT, tag::UPLOAD, tag::PART, tag::GARBAGE] {
                    for kv in self.r.prefix(&bucket_prefix(t, tenant, bucket))? {
                        if left == 0 {
                            return Ok(Value::Exists(true));
                        }
                        batch.remove(kv?.0);
                        left -= 1;
                    }
                }
                batch.remove(usage_key(tenant, bucket));
                batch.remove(key(tag::INDEX, &[tenant.as_bytes(), bucket.as_bytes()]));
                return Ok(Value::Exists(false));
            }
            Command::RevokeAccessKey { access_key } => {
                let k = key(tag::ACCESS_KEY, &[access_key.as_bytes()]);
                if !self.exists(&k)? {
                    return Err(ShardError::NoSuchAccessKey);
                }
                batch.remove(k);
            }
            Command::PutAccessKey {
                access_key,
                key: ak,
            } => {
                batch.insert(key(tag::ACCESS_KEY, &[access_key.as_bytes()]), encode(ak));
            }
            Command::AddBucket {
                tenant,
                bucket,
                created_ms,
                creation,
            } => {
                let k = key(tag::BUCKET, &[tenant.as_bytes(), bucket.as_bytes()]);
                if let Some(v) = self.r.get(&k)? {
                    return same_creation(bucket_record(&v)?.creation, *creation)
                        .map(|()| Value::Done);
                }
                let record = BucketRecord {
                    created_ms: *created_ms,
                    creation: *creation,
                };
                batch.insert(k, encode(&record));
            }
            Command::RemoveBucket { tenant, bucket } => {
                batch.remove(key(tag::BUCKET, &[tenant.as_bytes(), bucket.as_bytes()]));
            }
            Command::OpenIndex {
                tenant,
                bucket,
                creation,
            } => {
                let k = key(tag::INDEX, &[tenant.as_bytes(), bucket.as_bytes()]);
                if let Some(v) = self.r.get(&k)? {
                    return same_creation(index_record(&v)?.creation, *creation)
                        .map(|()| Value::Done);
                }
                let record = IndexRecord {
                    creation: *creation,
                };
                batch.insert(k, encode(&record));
            }
            Command::CloseIndex { tenant, bucket } => {
                self.require_index(tenant, bucket)?;
                if self.has_prefix(&bucket_prefix(tag::OBJECT, tenant, bucket))?
                    || self.has_prefix(&bucket_prefix(tag::UPLOAD, tenant, bucket))?
                {
                    return Err(ShardError::BucketNotEmpty);
                }
                batch.remove(key(tag::INDEX, &[tenant.as_bytes(), bucket.as_bytes()]));
                batch.remove(usage_key(tenant, bucket));
                self.forget_garbage(tenant, bucket, batch)?;
            }
            Command::PutObject {
                tenant,
                bucket,
                key: object,
                manifest,
                limit,
                precondition,
                touched_ms,
            } => {
                self.require_index(tenant, bucket)?;
                let k = object_key(tenant, bucket, object);
                let stored: Option<Manifest> = self.get(&k)?;
                if written_by(stored.as_ref(), manifest.write_id) {
                    return Ok(Value::Done);
                }
                precondition.check(stored.as_ref())?;
                self.check_touched(*touched_ms)?;
                let before = self.usage(tenant, bucket)?;
                let mut after = before;
                let freed = forget_object(stored.as_ref(), &mut after);
                self.add_garbage(
                    tenant,
                    bucket,
                    manifest.modified_ms,
                    freed,
                    &mut after,
                    batch,
                )?;
                after.bytes += manifest.size;
                after.objects += 1;
                check_limit(limit, before, after)?;
                batch.insert(k, encode(manifest));
                batch.insert(usage_key(tenant, bucket), encode(&after));
            }
            Command::DeleteObject {
                tenant,
                bucket,
                key: object,
                requested_ms,
                ..
            } => {
                self.require_index(tenant, bucket)?;
                let k = object_key(tenant, bucket, object);
                let mut usage = self.usage(tenant, bucket)?;
                let freed = forget_object(self.get(&k)?.as_ref(), &mut usage);
                self.add_garbage(tenant, bucket, *requested_ms, freed, &mut usage, batch)?;
                batch.remove(k);
                batch.insert(usage_key(tenant, bucket), encode(&usage));
            }
            Command::CreateUpload {
                tenant,
                bucket,
                upload,
            } => {
                self.require_index(tenant, bucket)?;
                batch.insert(
                    upload_key(tenant, bucket, &upload.key, &upload.upload_id),
                    encode(upload),
                );
            }
            Command::PutPart {
                tenant,
                bucket,
                key: object,
                upload_id,
                part_number,
                part,
                limit,
                touched_ms,
            } => {
                self.require_index(tenant, bucket)?;
                if !self.exists(&upload_key(tenant, bucket, object, upload_id))? {
                    return Err(ShardError::NoSuchUpload);
                }
                self.check_touched(*touched_ms)?;
                let k = part_key(tenant, bucket, upload_id, *part_number);
                let before = self.usage(tenant, bucket)?;
                let mut after = before;
                if let Some(old) = self.get::<Part>(&k)? {
                    after.bytes = after.bytes.saturating_sub(old.size);
                    self.add_garbage(
                        tenant,
                        bucket,
                        part.modified_ms,
                        old.size,
                        &mut after,
                        batch,
                    )?;
                }
                after.bytes += part.size;
                check_limit(limit, before, after)?;
                batch.insert(k, encode(part));
                batch.insert(usage_key(tenant, bucket), encode(&after));
            }
            Command::CompleteUpload {
                tenant,
                bucket,
                key: object,
                upload_id,
                parts,
                modified_ms,
                limit,
                write_id,
                precondition,
            } => {
                self.require_index(tenant, bucket)?;
                let k = object_key(tenant, bucket, object);
                let stored: Option<Manifest> = self.get(&k)?;
                if written_by(stored.as_ref(), *write_id) {
                    return Ok(Value::Object(stored));
                }
                let mut manifest =
                    self.complete_upload(tenant, bucket, object, upload_id, parts, *modified_ms)?;
                manifest.write_id = *write_id;
                precondition.check(stored.as_ref())?;
                let before = self.usage(tenant, bucket)?;
                let mut after = before;
                // The parts' bytes become the object's; unused parts go.
                let parts_bytes = self.remove_upload(tenant, bucket, object, upload_id, batch)?;
                after.bytes = after.bytes.saturating_sub(parts_bytes);
                let unused = parts_bytes.saturating_sub(manifest.size);
                let freed = forget_object(stored.as_ref(), &mut after) + unused;
                self.add_garbage(tenant, bucket, *modified_ms, freed, &mut after, batch)?;
                after.bytes += manifest.size;
                after.objects += 1;
                if let Err(e) = check_limit(limit, before, after) {
                    *batch = Batch::default();
                    return Err(e);
                }
                batch.insert(k, encode(&manifest));
                batch.insert(usage_key(tenant, bucket), encode(&after));
                return Ok(Value::Object(Some(manifest)));
            }
            Command::AbortUpload {
                tenant,
                bucket,
                key: object,
                upload_id,
                requested_ms,
            } => {
                self.require_index(tenant, bucket)?;
                if !self.exists(&upload_key(tenant, bucket, object, upload_id))? {
                    return Err(ShardError::NoSuchUpload);
                }
                let mut usage = self.usage(tenant, bucket)?;
                let parts_bytes = self.remove_upload(tenant, bucket, object, upload_id, batch)?;
                usage.bytes = usage.bytes.saturating_sub(parts_bytes);
                self.add_garbage(
                    tenant,
                    bucket,
                    *requested_ms,
                    parts_bytes,
                    &mut usage,
                    batch,
                )?;
                batch.insert(usage_key(tenant, bucket), encode(&usage));
            }
            Command::SetLayout {
                expected_epoch,
                layout,
            } => {
                let k = [tag::LAYOUT];
                let stored = self.get::<Layout>(&k)?.map_or(0, |l| l.epoch);
                if stored != *expected_epoch || layout.epoch != expected_epoch + 1 {
                    return Err(ShardError::LayoutChanged { now: stored });
                }
                batch.insert(k, encode(layout));
            }
            Command::StartRebalance { rebalance } => {
                if let Some(r) = self.get::<Rebalance>(&[tag::REBALANCE])? {
                    if r.running() {
                        return Err(ShardError::InvalidArgument(format!(
                            "a rebalance is already running ({} of {} moves done); wait for it, or stop it with `rebalance --cancel`",
                            r.done,
                            r.moves.len()
                        )));
                    }
                }
                batch.insert([tag::REBALANCE], encode(rebalance));
            }
            Command::UpdateRebalance {
                rebalance,
                expected_done,
            } => {
                let stored: Option<Rebalance> = self.get(&[tag::REBALANCE])?;
                let current = |r: &Rebalance| r.id == rebalance.id && r.done == *expected_done;
                let Some(stored) = stored.filter(current) else {
                    return Err(ShardError::InvalidArgument(
                        "that rebalance is no longer the current one".into(),
                    ));
                };
                let mut next = rebalance.clone();
                next.cancel |= stored.cancel;
                batch.insert([tag::REBALANCE], encode(&next));
            }
            Command::CancelRebalance => {
                let stored: Option<Rebalance> = self.get(&[tag::REBALANCE])?;
                let Some(mut r) = stored.filter(Rebalance::running) else {
                    return Err(ShardError::InvalidArgument(
                        "no rebalance is running".into(),
                    ));
                };
                r.cancel = true;
                batch.insert([tag::REBALANCE], encode(&r));
            }
            Command::AddChunks { chunks, stamp_ms } => {
                return self.add_chunks(chunks, *stamp_ms, batch);
            }
            Command::TouchChunks { ids, stamp_ms } => {
                return self.touch_chunks(ids, *stamp_ms, batch);
            }
            Command::RaiseFloor { floor } => return self.raise_floor(*floor, batch),
            Command::SettleGarbage { before_ms } => return self.settle_garbage(*before_ms, batch),
            Command::DropChunks { ids, below_ms } => {
                return self.drop_chunks(ids, *below_ms, batch);
            }
        }
        Ok(Value::Done)
    }

    fn remove_upload(
        &self,
        tenant: &str,
        bucket: &str,
        object: &str,
        upload_id: &str,
        batch: &mut Batch,
    ) -> Io<u64> {
        batch.remove(upload_key(tenant, bucket, object, upload_id));
        let mut bytes = 0;
        for kv in self.r.prefix(&parts_prefix(tenant, bucket, upload_id))? {
            let (k, v) = kv?;
            bytes += decode::<Part>(&v)?.size;
            batch.remove(k);
        }
        Ok(bytes)
    }

    /// What a bucket holds now.
    fn usage(&self, tenant: &str, bucket: &str) -> Io<Usage> {
        Ok(self.get(&usage_key(tenant, bucket))?.unwrap_or_default())
    }

    /// Checks the client's part list against the stored parts and builds the
    /// object's manifest, with the ETag S3 computes: the MD5 of the parts'
    /// binary MD5s, a dash, and the number of parts.
    fn complete_upload(
        &self,
        tenant: &str,
        bucket: &str,
        object: &str,
        upload_id: &str,
        wanted: &[(u32, String)],
        modified_ms: i64,
    ) -> Io<Manifest> {
        let upload: Upload = self
            .get(&upload_key(tenant, bucket, object, upload_id))?
            .ok_or(ShardError::NoSuchUpload)?;
        if wanted.is_empty() {
            return Err(ShardError::InvalidPart(
                "you must specify at least one part".into(),
            ));
        }
        if wanted.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(ShardError::InvalidPartOrder);
        }
        // Every named part must exist with its ETag before sizes matter.
        let mut parts = Vec::with_capacity(wanted.len());
        for (number, etag) in wanted {
            let part: Part = self
                .get(&part_key(tenant, bucket, upload_id, *number))?
                .ok_or_else(|| {
                    ShardError::InvalidPart(format!("part {number} was not uploaded"))
                })?;
            if part.etag != etag.trim_matches('"') {
                return Err(ShardError::InvalidPart(format!(
                    "part {number} has ETag \"{}\", not {etag}",
                    part.etag
                )));
            }
            parts.push((*number, part));
        }
        let mut md5s = Md5::new();
        let mut chunks = Vec::new();
        let mut size = 0;
        let last = parts.len() - 1;
        for (i, (number, part)) in parts.into_iter().enumerate() {
            if i < last && part.size < MIN_PART_SIZE {
                return Err(ShardError::EntityTooSmall(format!(
                    "part {number} is {} bytes; every part but the last must be at least {MIN_PART_SIZE}",
                    part.size
                )));
            }
            let raw = hex::decode(&part.etag).map_err(|_| {
                ShardError::Internal(format!("stored ETag of part {number} is not hex"))
            })?;
            md5s.update(&raw);
            size += part.size;
            chunks.extend(part.chunks);
        }
        Ok(Manifest {
            size,
            etag: format!("{}-{}", hex::encode(md5s.finalize()), wanted.len()),
            meta: upload.meta,
            modified_ms,
            body: Body::Chunks(chunks),
            write_id: None,
        })
    }

    /// Answers `q` from this replica's state.
    pub fn query(&self, q: &Query) -> Reply {
        match q {
            Query::AccessKey { access_key } => Ok(Value::AccessKey(
                self.get(&key(tag::ACCESS_KEY, &[access_key.as_bytes()]))?,
            )),
            Query::Tenants => {
                let mut out = Vec::new();
                for kv in self.r.prefix(&[tag::TENANT])? {
                    let (k, v) = kv?;
                    out.push((String::from_utf8_lossy(&k[1..]).into_owned(), decode(&v)?));
                }
                Ok(Value::Tenants(out))
            }
            Query::Layout => Ok(Value::Layout(self.get(&[tag::LAYOUT])?)),
            Query::Rebalance => Ok(Value::Rebalance(self.get(&[tag::REBALANCE])?)),
            Query::Tombstones => {
                let mut out = Vec::new();
                for kv in self.r.prefix(&[tag::TOMBSTONE])? {
                    let (k, v) = kv?;
                    out.push((String::from_utf8_lossy(&k[1..]).into_owned(), decode(&v)?));
                }
                Ok(Value::Tombstones(out))
            }
            Query::Tenant { tenant } => Ok(Value::Tenant(
                self.get(&key(tag::TENANT, &[tenant.as_bytes()]))?,
            )),
            Query::Usage { tenant, bucket } => {
                self.require_index(tenant, bucket)?;
                Ok(Value::Usage(self.usage(tenant, bucket)?))
            }
            Query::AccessKeys { tenant } => {
                let mut out = Vec::new();
                for kv in self.r.prefix(&[tag::ACCESS_KEY])? {
                    let (k, v) = kv?;
                    let ak: AccessKey = decode(&v)?;
                    if ak.tenant == *tenant {
                        out.push(String::from_utf8_lossy(&k[1..]).into_owned());
                    }
                }
                Ok(Value::AccessKeys(out))
            }
            Query::Buckets { tenant } => {
                let mut prefix = key(tag::BUCKET, &[tenant.as_bytes()]);
                prefix.push(0);
                let mut out = Vec::new();
                for kv in self.r.prefix(&prefix)? {
                    let (k, v) = kv?;
                    let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                    out.push((name, bucket_record(&v)?.created_ms));
                }
                Ok(Value::Buckets(out))
            }
            Query::IndexExists { tenant, bucket } => Ok(Value::Exists(
                self.exists(&key(tag::INDEX, &[tenant.as_bytes(), bucket.as_bytes()]))?,
            )),
            Query::Object {
                tenant,
                bucket,
                key: object,
            } => {
                self.require_index(tenant, bucket)?;
                Ok(Value::Object(
                    self.get(&object_key(tenant, bucket, object))?,
                ))
            }
            Query::List {
                tenant,
                bucket,
                prefix,
                delimiter,
                start_after,
                max_keys,
            } => {
                self.require_index(tenant, bucket)?;
                self.list(tenant, bucket, prefix, delimiter, start_after, *max_keys)
                    .map(Value::List)
            }
            Query::Upload {
                tenant,
                bucket,
                key: object,
                upload_id,
            } => {
                self.require_index(tenant, bucket)?;
                Ok(Value::Upload(
                    self.get(&upload_key(tenant, bucket, object, upload_id))?,
                ))
            }
            Query::Parts {
                tenant,
                bucket,
                upload_id,
                after,
                max,
            } => {
                let prefix = parts_prefix(tenant, bucket, upload_id);
                let start = part_key(tenant, bucket, upload_id, after.saturating_add(1));
                let mut parts = Vec::new();
                let mut truncated = false;
                for kv in self.r.range(&start, Some(&after_prefix(&prefix)))? {
                    let (k, v) = kv?;
                    if parts.len() as u32 >= *max {
                        truncated = true;
                        break;
                    }
                    let n = u32::from_be_bytes(k[prefix.len()..].try_into().unwrap_or_default());
                    parts.push((n, decode(&v)?));
                }
                Ok(Value::Parts { parts, truncated })
            }
            Query::Uploads {
                tenant,
                bucket,
                prefix,
                key_marker,
                upload_id_marker,
                max,
            } => {
                self.require_index(tenant, bucket)?;
                let base = bucket_prefix(tag::UPLOAD, tenant, bucket);
                let mut scan_prefix = base.clone();
                scan_prefix.extend_from_slice(prefix.as_bytes());
                let mut start = scan_prefix.clone();
                if !key_marker.is_empty() {
                    let marker = if upload_id_marker.is_empty() {
                        after_prefix(&upload_key(tenant, bucket, key_marker, ""))
                    } else {
                        let mut k = upload_key(tenant, bucket, key_marker, upload_id_marker);
                        k.push(0);
                        k
                    };
                    start = start.max(marker);
                }
                let mut uploads = Vec::new();
                let mut truncated = false;
                for kv in self.r.range(&start, Some(&after_prefix(&scan_prefix)))? {
                    let (_, v) = kv?;
                    if uploads.len() as u32 >= *max {
                        truncated = true;
                        break;
                    }
                    uploads.push(decode(&v)?);
                }
                Ok(Value::Uploads { uploads, truncated })
            }
            Query::ChunkRefs { after, max } => self.chunk_refs(after, *max),
            Query::ChunkRecords { after, max } => self.chunk_records(*after, *max),
            Query::Recorded { ids } => self.recorded_among(ids),
            Query::StaleUploads { before_ms, max } => self.stale_uploads(*before_ms, *max),
        }
    }

    /// One page of keys under `prefix`, rolling keys that contain
    /// `delimiter` after the prefix into common prefixes.
    fn list(
        &self,
        tenant: &str,
        bucket: &str,
        prefix: &str,
        delimiter: &str,
        start_after: &str,
        max_keys: u32,
    ) -> Io<ListPage> {
        let base = bucket_prefix(tag::OBJECT, tenant, bucket);
        let scan_prefix = object_key(tenant, bucket, prefix);
        let end = after_prefix(&scan_prefix);
        let mut start = scan_prefix.clone();
        if !start_after.is_empty() {
            let mut marker = object_key(tenant, bucket, start_after);
            // After a common prefix, skip everything it rolled up.
            if !delimiter.is_empty() && start_after.ends_with(delimiter) {
                marker = after_prefix(&marker);
            } else {
                marker.push(0);
            }
            start = start.max(marker);
        }
        let mut page = ListPage::default();
        let mut count = 0u32;
        while start < end {
            let Some(kv) = self.r.range(&start, Some(&end))?.next() else {
                break;
            };
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[base.len()..]).into_owned();
            if count >= max_keys {
                page.truncated = true;
                break;
            }
            count += 1;
            let rolled = (!delimiter.is_empty())
                .then(|| name[prefix.len()..].find(delimiter))
                .flatten();
            match rolled {
                Some(at) => {
                    let common = name[..prefix.len() + at + delimiter.len()].to_string();
                    start = after_prefix(&object_key(tenant, bucket, &common));
                    page.next_marker = common.clone();
                    page.common_prefixes.push(common);
                }
                None => {
                    start = k.to_vec();
                    start.push(0);
                    page.next_marker = name.clone();
                    page.objects.push((name, decode(&v)?));
                }
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Pair, Result as StoreResult};
    use serde::Serialize;
    use std::collections::BTreeMap;
    use std::ops::Bound;

    /// One shard's space in memory.
    #[derive(Clone, Debug, Default)]
    struct Space(BTreeMap<Vec<u8>, Vec<u8>>);

    impl Space {
        /// The records a client can see: all but the write-id records.
        fn visible(&self) -> impl Iterator<Item = (&Vec<u8>, &Vec<u8>)> {
            self.0
                .iter()
                .filter(|(k, _)| ![tag::WRITE, tag::WRITE_AGE].contains(&k[0]))
        }
    }

    /// Equal when clients see the same: a refusal may record its write id.
    impl PartialEq for Space {
        fn eq(&self, other: &Space) -> bool {
            self.visible().eq(other.visible())
        }
    }

    impl Reader for Space {
        fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
            Ok(self.0.get(key).cloned())
        }

        fn range<'a>(
            &'a self,
            from: &[u8],
            to: Option<&[u8]>,
        ) -> StoreResult<Box<dyn Iterator<Item = StoreResult<Pair>> + 'a>> {
            let to = to.map_or(Bound::Unbounded, |t| Bound::Excluded(t.to_vec()));
            let pairs = self.0.range((Bound::Included(from.to_vec()), to));
            Ok(Box::new(pairs.map(|(k, v)| Ok((k.clone(), v.clone())))))
        }
    }

    impl Space {
        /// Applies `cmd` as the state machine does, and checks that a
        /// refusal wrote nothing but its write id's record.
        fn apply(&mut self, cmd: &Command) -> Reply {
            let mut batch = Batch::default();
            let reply = State::new(&*self).apply_once(cmd, &mut batch);
            if reply.is_err() {
                let written: Vec<_> = batch.ops.iter().map(|(k, _)| k[0]).collect();
                let records = [tag::WRITE, tag::WRITE_AGE];
                assert!(
                    written.iter().all(|t| records.contains(t)),
                    "a refused {cmd:?} wrote {batch:?}"
                );
            }
            for (k, v) in batch.ops {
                match v {
                    Some(v) => self.0.insert(k, v),
                    None => self.0.remove(&k),
                };
            }
            reply
        }

        /// Applies `cmd` twice, as a retried proposal would be, and checks
        /// that the second time answers the same and changes nothing.
        fn apply_twice(&mut self, cmd: &Command) -> Reply {
            let first = self.apply(cmd);
            let after_first = self.clone();
            let second = self.apply(cmd);
            assert_eq!(format!("{first:?}"), format!("{second:?}"), "{cmd:?}");
            assert_eq!(*self, after_first, "the retry of {cmd:?} changed the state");
            second
        }

        fn object(&self, key: &str) -> Option<Manifest> {
            match State::new(self).query(&Query::Object {
                tenant: "t".into(),
                bucket: "b".into(),
                key: key.into(),
            }) {
                Ok(Value::Object(m)) => m,
                other => panic!("{other:?}"),
            }
        }
    }

    fn id(n: u128) -> Option<WriteId> {
        Some(WriteId(n))
    }

    fn manifest(etag: &str, write_id: Option<WriteId>) -> Manifest {
        Manifest {
            size: 3,
            etag: etag.into(),
            meta: vec![],
            modified_ms: 1,
            body: Body::Inline(b"abc".to_vec()),
            write_id,
        }
    }

    fn put(key: &str, manifest: Manifest, precondition: Precondition) -> Command {
        Command::PutObject {
            tenant: "t".into(),
            bucket: "b".into(),
            key: key.into(),
            manifest,
            limit: None,
            precondition,
            touched_ms: None,
        }
    }

    fn if_none_match_any() -> Precondition {
        Precondition {
            if_none_match: Some(ETagMatch::Any),
            ..Default::default()
        }
    }

    fn if_match(etag: &str) -> Precondition {
        Precondition {
            if_match: Some(ETagMatch::ETag(etag.into())),
            ..Default::default()
        }
    }

    fn complete(upload_id: &str, write_id: Option<WriteId>, precondition: Precondition) -> Command {
        Command::CompleteUpload {
            tenant: "t".into(),
            bucket: "b".into(),
            key: "big".into(),
            upload_id: upload_id.into(),
            parts: vec![(1, "0cc175b9c0f1b6a831c399e269772661".into())],
            modified_ms: 5,
            limit: None,
            write_id,
            precondition,
        }
    }

    /// A space with bucket `b` of tenant `t` and one upload of `big`
    /// holding one part.
    fn bucket_with_upload(upload_id: &str) -> Space {
        let mut s = Space::default();
        s.apply(&Command::OpenIndex {
            tenant: "t".into(),
            bucket: "b".into(),
            creation: id(1),
        })
        .unwrap();
        s.apply(&Command::CreateUpload {
            tenant: "t".into(),
            bucket: "b".into(),
            upload: Upload {
                key: "big".into(),
                upload_id: upload_id.into(),
                meta: vec![],
                initiated_ms: 1,
            },
        })
        .unwrap();
        s.apply(&Command::PutPart {
            tenant: "t".into(),
            bucket: "b".into(),
            key: "big".into(),
            upload_id: upload_id.into(),
            part_number: 1,
            part: Part {
                etag: "0cc175b9c0f1b6a831c399e269772661".into(),
                size: 1,
                modified_ms: 2,
                chunks: vec![],
            },
            limit: None,
            touched_ms: None,
        })
        .unwrap();
        s
    }

    #[test]
    fn a_conditional_put_retried_after_it_committed_succeeds_again_changing_nothing() {
        let mut s = bucket_with_upload("u1");
        let first = put("k", manifest("e1", id(10)), if_none_match_any());
        assert!(matches!(s.apply_twice(&first), Ok(Value::Done)));
        assert_eq!(s.object("k"), Some(manifest("e1", id(10))));
    }

    #[test]
    fn a_conditional_put_from_another_request_is_refused_changing_nothing() {
        let mut s = bucket_with_upload("u1");
        s.apply(&put("k", manifest("e1", id(10)), if_none_match_any()))
            .unwrap();
        let before = s.clone();

        let create_again = put("k", manifest("e2", id(11)), if_none_match_any());
        assert_eq!(
            s.apply(&create_again).unwrap_err(),
            ShardError::PreconditionFailed
        );
        let stale = put("k", manifest("e2", id(12)), if_match("e0"));
        assert_eq!(s.apply(&stale).unwrap_err(), ShardError::PreconditionFailed);
        let missing = put("nope", manifest("e2", id(13)), if_match("e1"));
        assert_eq!(s.apply(&missing).unwrap_err(), ShardError::NoSuchKey);
        assert_eq!(s, before);

        let current = put("k", manifest("e2", id(14)), if_match("e1"));
        s.apply_twice(&current).unwrap();
        assert_eq!(s.object("k"), Some(manifest("e2", id(14))));
    }

    #[test]
    fn a_delete_retried_after_a_later_put_leaves_that_put() {
        let mut s = bucket_with_upload("u1");
        s.apply(&put("k", manifest("e1", id(10)), Precondition::default()))
            .unwrap();
        let delete = Command::DeleteObject {
            tenant: "t".into(),
            bucket: "b".into(),
            key: "k".into(),
            write_id: id(11),
            requested_ms: 3,
        };
        s.apply_twice(&delete).unwrap();
        assert_eq!(s.object("k"), None);
        s.apply(&put("k", manifest("e2", id(12)), Precondition::default()))
            .unwrap();
        s.apply(&delete).unwrap();
        assert_eq!(s.object("k"), Some(manifest("e2", id(12))));
    }

    #[test]
    fn an_unconditional_put_of_another_request_replaces_the_object() {
        let mut s = bucket_with_upload("u1");
        s.apply(&put("k", manifest("e1", id(10)), Precondition::default()))
            .unwrap();
        s.apply(&put("k", manifest("e2", id(11)), Precondition::default()))
            .unwrap();
        assert_eq!(s.object("k"), Some(manifest("e2", id(11))));
    }

    #[test]
    fn a_complete_retried_after_it_committed_answers_the_same_object() {
        let mut s = bucket_with_upload("u1");
        let done = s
            .apply_twice(&complete("u1", id(20), Precondition::default()))
            .unwrap();
        let Value::Object(Some(m)) = done else {
            panic!("{done:?}");
        };
        assert_eq!(m.write_id, id(20));
        assert_eq!(
            m.etag,
            format!(
                "{}-1",
                hex::encode(Md5::digest(
                    hex::decode("0cc175b9c0f1b6a831c399e269772661").unwrap()
                ))
            )
        );
        assert_eq!(s.object("big"), Some(m));

        let other = s.apply(&complete("u1", id(21), Precondition::default()));
        assert_eq!(other.unwrap_err(), ShardError::NoSuchUpload);
    }

    #[test]
    fn a_complete_whose_precondition_fails_keeps_the_upload() {
        let mut s = bucket_with_upload("u1");
        s.apply(&put("big", manifest("e1", id(10)), Precondition::default()))
            .unwrap();
        let before = s.clone();
        let refused = s.apply(&complete("u1", id(20), if_none_match_any()));
        assert_eq!(refused.unwrap_err(), ShardError::PreconditionFailed);
        assert_eq!(s, before);
        let missing = bucket_with_upload("u2").apply(&complete("u2", id(22), if_match("e1")));
        assert_eq!(missing.unwrap_err(), ShardError::NoSuchKey);

        let replaced = s.apply_twice(&complete("u1", id(21), if_match("e1")));
        assert!(matches!(replaced, Ok(Value::Object(Some(_)))));
    }

    #[test]
    fn a_put_committed_twice_applies_once_even_after_a_later_write() {
        let mut s = bucket_with_upload("u1");
        let first = put("k", manifest("e1", id(10)), Precondition::default());
        s.apply(&first).unwrap();
        s.apply(&put("k", manifest("e2", id(11)), Precondition::default()))
            .unwrap();
        let after_second = s.clone();
        // The first request's proposal, sent again after a timeout, commits
        // once more: it answers as the first time and the later write stays.
        assert!(matches!(s.apply(&first), Ok(Value::Done)));
        assert_eq!(s, after_second);
        assert_eq!(s.object("k"), Some(manifest("e2", id(11))));
    }

    #[test]
    fn a_refused_put_committed_twice_is_refused_again_though_it_would_now_hold() {
        let mut s = bucket_with_upload("u1");
        let refused = put("k", manifest("e2", id(12)), if_match("e1"));
        assert_eq!(s.apply(&refused).unwrap_err(), ShardError::NoSuchKey);
        s.apply(&put("k", manifest("e1", id(13)), Precondition::default()))
            .unwrap();
        assert_eq!(s.apply(&refused).unwrap_err(), ShardError::NoSuchKey);
        assert_eq!(s.object("k"), Some(manifest("e1", id(13))));
    }

    #[test]
    fn a_complete_committed_twice_answers_its_object_after_a_later_write() {
        let mut s = bucket_with_upload("u1");
        let complete = complete("u1", id(20), Precondition::default());
        let first = s.apply(&complete);
        s.apply(&put("big", manifest("e2", id(21)), Precondition::default()))
            .unwrap();
        let again = s.apply(&complete);
        assert!(matches!(&again, Ok(Value::Object(Some(m))) if m.write_id == id(20)));
        assert_eq!(format!("{again:?}"), format!("{first:?}"));
        assert_eq!(s.object("big"), Some(manifest("e2", id(21))));
    }

    #[test]
    fn write_ids_are_forgotten_a_while_after_their_write() {
        let mut s = bucket_with_upload("u1");
        let at = |ms: i64, n: u128| {
            let mut m = manifest("e", id(n));
            m.modified_ms = ms;
            put("k", m, Precondition::default())
        };
        s.apply(&at(1_000, 1)).unwrap();
        s.apply(&at(2_000, 2)).unwrap();
        let remembered = |s: &Space| s.0.keys().filter(|k| k[0] == tag::WRITE).count();
        assert_eq!(remembered(&s), 2);
        s.apply(&at(2_000 + REMEMBER_WRITES_MS, 3)).unwrap();
        assert_eq!(remembered(&s), 2, "the id of 1,000 ms went, 2,000's stays");
        assert!(!s.0.contains_key(&write_key(WriteId(1))));
        assert_eq!(s.0.keys().filter(|k| k[0] == tag::WRITE_AGE).count(), 2);
    }

    #[test]
    fn a_bucket_creation_retried_succeeds_and_another_is_told_it_exists() {
        let mut s = Space::default();
        let add = |creation| Command::AddBucket {
            tenant: "t".into(),
            bucket: "b".into(),
            created_ms: 7,
            creation,
        };
        let open = |creation| Command::OpenIndex {
            tenant: "t".into(),
            bucket: "b".into(),
            creation,
        };
        for make in [add, open] {
            assert!(matches!(s.apply_twice(&make(id(1))), Ok(Value::Done)));
            assert_eq!(s.apply(&make(id(2))).unwrap_err(), ShardError::BucketExists);
            assert_eq!(s.apply(&make(None)).unwrap_err(), ShardError::BucketExists);
        }
        let listed = State::new(&s).query(&Query::Buckets { tenant: "t".into() });
        assert!(matches!(listed, Ok(Value::Buckets(b)) if b == [("b".to_string(), 7)]));
    }

    /// The fields of a manifest before write ids existed.
    #[derive(Serialize)]
    struct OldManifest {
        size: u64,
        etag: String,
        #[serde(with = "serde_bytes")]
        meta: Vec<u8>,
        modified_ms: i64,
        body: Body,
    }

    /// The commands as they were logged before ids and preconditions.
    #[derive(Serialize)]
    enum OldCommand {
        PutObject {
            tenant: String,
            bucket: String,
            key: String,
            manifest: OldManifest,
            limit: Option<Limit>,
        },
        AddBucket {
            tenant: String,
            bucket: String,
            created_ms: i64,
        },
        OpenIndex {
            tenant: String,
            bucket: String,
        },
    }

    #[test]
    fn records_and_commands_written_before_ids_still_decode_and_apply() {
        let old = OldManifest {
            size: 3,
            etag: "e0".into(),
            meta: vec![],
            modified_ms: 1,
            body: Body::Inline(b"abc".to_vec()),
        };
        let m: Manifest = decode(&encode(&old)).unwrap();
        assert_eq!(m, manifest("e0", None));

        let open: Command = decode(&encode(&OldCommand::OpenIndex {
            tenant: "t".into(),
            bucket: "b".into(),
        }))
        .unwrap();
        let add: Command = decode(&encode(&OldCommand::AddBucket {
            tenant: "t".into(),
            bucket: "b".into(),
            created_ms: 7,
        }))
        .unwrap();
        let put_old: Command = decode(&encode(&OldCommand::PutObject {
            tenant: "t".into(),
            bucket: "b".into(),
            key: "k".into(),
            manifest: old,
            limit: None,
        }))
        .unwrap();

        // Records as the old code stored them: an empty index record, a
        // bare creation time in the catalogue.
        let mut s = Space::default();
        s.0.insert(key(tag::INDEX, &[b"t", b"b"]), vec![]);
        s.0.insert(key(tag::BUCKET, &[b"t", b"b"]), encode(&7i64));
        assert_eq!(s.apply(&open).unwrap_err(), ShardError::BucketExists);
        assert_eq!(s.apply(&add).unwrap_err(), ShardError::BucketExists);
        let listed = State::new(&s).query(&Query::Buckets { tenant: "t".into() });
        assert!(matches!(listed, Ok(Value::Buckets(b)) if b == [("b".to_string(), 7)]));
        // Old writes carry no id, so they are never taken for a retry.
        s.apply(&put_old).unwrap();
        s.apply(&put_old).unwrap();
        assert_eq!(s.object("k"), Some(manifest("e0", None)));
        let usage = State::new(&s).query(&Query::Usage {
            tenant: "t".into(),
            bucket: "b".into(),
        });
        assert!(matches!(
            usage,
            Ok(Value::Usage(Usage {
                bytes: 3,
                objects: 1,
                garbage: 0
            }))
        ));
    }

    /// A space with the empty bucket `b` of tenant `t`.
    fn empty_bucket() -> Space {
        let mut s = Space::default();
        s.apply(&Command::OpenIndex {
            tenant: "t".into(),
            bucket: "b".into(),
            creation: id(1),
        })
        .unwrap();
        s
    }

    fn chunk(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn chunked(key: &str, ids: &[ChunkId], touched_ms: i64, write: u128) -> Command {
        let mut m = manifest("e", id(write));
        m.body = Body::Chunks(ids.iter().map(|id| ChunkSpan { id: *id, len: 3 }).collect());
        Command::PutObject {
            tenant: "t".into(),
            bucket: "b".into(),
            key: key.into(),
            manifest: m,
            limit: None,
            precondition: Precondition::default(),
            touched_ms: Some(touched_ms),
        }
    }

    #[test]
    fn a_collection_drops_only_unnamed_chunks_untouched_since_its_floor_and_fences_late_writes() {
        let mut s = empty_bucket();
        let (named, unnamed, fresh) = (chunk(1), chunk(2), chunk(3));
        let add = |ids: &[ChunkId], stamp_ms| Command::AddChunks {
            chunks: ids.iter().map(|id| (*id, 3)).collect(),
            stamp_ms,
        };
        s.apply(&add(&[named, unnamed], 100)).unwrap();
        s.apply(&add(&[fresh], 500)).unwrap();
        s.apply(&chunked("k", &[named], 100, 10)).unwrap();

        let floor = Floor {
            touched_ms: 200,
            recorded_ms: 100,
        };
        s.apply(&Command::RaiseFloor { floor }).unwrap();
        let refs = State::new(&s).query(&Query::ChunkRefs {
            after: vec![],
            max: 10,
        });
        assert!(matches!(refs, Ok(Value::ChunkIds { ids, next: None }) if ids == [named]));
        let dropped = s.apply(&Command::DropChunks {
            ids: vec![unnamed, fresh],
            below_ms: 200,
        });
        assert!(matches!(dropped, Ok(Value::Dropped(d)) if d == [(unnamed, 3)]));

        // Writes racing the collection are refused, changing nothing; a
        // manifest refused for stale chunks commits once they are touched.
        let stale = ShardError::ChunksStale;
        assert_eq!(
            s.apply(&chunked("k2", &[named], 100, 11)).unwrap_err(),
            stale
        );
        let touch = |ids: &[ChunkId], stamp_ms| Command::TouchChunks {
            ids: ids.to_vec(),
            stamp_ms,
        };
        assert_eq!(
            s.apply(&touch(&[named], 150)).unwrap_err(),
            stale,
            "touch below the floor"
        );
        assert_eq!(
            s.apply(&touch(&[named, unnamed], 300)).unwrap_err(),
            stale,
            "touch of a dropped chunk"
        );
        s.apply(&touch(&[named], 300)).unwrap();
        s.apply(&chunked("k2", &[named], 300, 11)).unwrap();
        assert_eq!(
            s.apply(&add(&[chunk(4)], 99)).unwrap_err(),
            stale,
            "record below the mark"
        );
        assert!(matches!(
            s.apply(&Command::DropChunks {
                ids: vec![named],
                below_ms: 300,
            }),
            Err(ShardError::InvalidArgument(_))
        ));

        // Records written before touch times read as touched at 0.
        s.0.insert(chunk_key(&chunk(5)), encode(&7u64));
        assert_eq!(
            chunk_record(&s.0[&chunk_key(&chunk(5))]).unwrap(),
            ChunkRecord {
                len: 7,
                touched_ms: 0
            }
        );
    }

    #[test]
    fn a_listing_of_huge_objects_carries_no_chunk_lists() {
        let mut s = empty_bucket();
        // 100 GiB each: 25,600 chunks of 4 MiB.
        let spans: Vec<ChunkId> = (0..25_600u32)
            .map(|i| ChunkId(*blake3::hash(&i.to_be_bytes()).as_bytes()))
            .collect();
        for (n, key) in ["a", "b", "c"].iter().enumerate() {
            let mut put = chunked(key, &spans, 1, 100 + n as u128);
            if let Command::PutObject { manifest, .. } = &mut put {
                manifest.size = 100 << 30;
            }
            s.apply(&put).unwrap();
        }
        let page = match State::new(&s).query(&Query::List {
            tenant: "t".into(),
            bucket: "b".into(),
            prefix: String::new(),
            delimiter: String::new(),
            start_after: String::new(),
            max_keys: 1000,
        }) {
            Ok(Value::List(page)) => page,
            other => panic!("{other:?}"),
        };
        assert_eq!(page.objects.len(), 3);
        assert_eq!(page.objects[0].1.size, 100 << 30);
        let sent = encode(&Value::List(page)).len();
        assert!(sent < 500, "a page of 3 names took {sent} bytes");
    }
}
