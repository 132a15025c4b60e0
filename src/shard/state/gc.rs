//! The records garbage collection reads and writes: chunk records with the
//! time they were last touched, the shard's collection floor, and the
//! garbage each bucket made that no collection has settled yet.
//!
//! The floor fences a collection against writes racing it (see the "Chunk
//! garbage collection" section of docs/design.md): once a collection has
//! raised a shard's floor to F, the shard refuses a manifest naming a chunk
//! touched before F and a touch stamped before F, while the collection
//! drops only unreferenced chunks touched before F. Its second mark, a
//! grace below F, fences the orphan sweep: a chunk record stamped before it
//! is refused, and a file older than it with no record is swept.

use super::{bucket_prefix, chunk_key, chunk_of_key, decode, encode, tag, usage_key, Io, State};
use crate::shard::command::{
    ChunkRecord, Floor, Manifest, Part, ShardError, StaleUpload, Upload, Usage, Value,
};
use crate::store::Batch;
use crate::types::ChunkId;
use std::collections::BTreeMap;

/// The key of a shard's [`Floor`].
const FLOOR: &[u8] = &[tag::FLOOR];

/// Reads a chunk record, new or old (a bare length, touched at 0).
pub fn chunk_record(v: &[u8]) -> Io<ChunkRecord> {
    decode::<ChunkRecord>(v).or_else(|_| {
        Ok(ChunkRecord {
            len: decode(v)?,
            touched_ms: 0,
        })
    })
}

/// Garbage is dated by the 10 s window it was made in: a busy bucket has
/// at most (grace + interval) / 10 s garbage records (450 by default).
const WINDOW_MS: i64 = 10_000;

/// `Y tenant 0 bucket 0 window_start(u64 BE)`: the garbage the bucket
/// made in that window, until a collection settles it.
fn garbage_key(tenant: &str, bucket: &str, at_ms: i64) -> Vec<u8> {
    let window = (at_ms.max(0) / WINDOW_MS * WINDOW_MS) as u64;
    let mut k = bucket_prefix(tag::GARBAGE, tenant, bucket);
    k.extend_from_slice(&window.to_be_bytes());
    k
}

/// The bucket's usage key and the window of a garbage key.
fn parse_garbage_key(k: &[u8]) -> Option<(Vec<u8>, i64)> {
    let (names, window) = k.get(1..)?.split_at_checked(k.len().checked_sub(9)?)?;
    let names = names.strip_suffix(&[0])?;
    let split = names.iter().position(|b| *b == 0)?;
    let (tenant, bucket) = (&names[..split], &names[split + 1..]);
    let usage = usage_key(
        std::str::from_utf8(tenant).ok()?,
        std::str::from_utf8(bucket).ok()?,
    );
    Some((usage, u64::from_be_bytes(window.try_into().ok()?) as i64))
}

/// The chunk ids an object (`tag::OBJECT`) or part record names.
fn referenced_by(tag: u8, v: &[u8]) -> Io<Vec<ChunkId>> {
    let ids = |spans: &[crate::shard::command::ChunkSpan]| spans.iter().map(|s| s.id).collect();
    Ok(match tag {
        tag::OBJECT => ids(decode::<Manifest>(v)?.body.chunks()),
        _ => ids(&decode::<Part>(v)?.chunks),
    })
}

impl State<'_> {
    /// The shard's collection floor; zero before any collection.
    pub fn floor(&self) -> Io<Floor> {
        Ok(self.get(FLOOR)?.unwrap_or_default())
    }

    /// Refuses a write naming chunks touched before the floor: a
    /// collection that started since may not have seen it (`oldest` is the
    /// oldest touch among them, `None` when the write names no chunk).
    pub fn check_touched(&self, oldest: Option<i64>) -> Io<()> {
        match oldest {
            Some(t) if t < self.floor()?.touched_ms => Err(ShardError::ChunksStale),
            _ => Ok(()),
        }
    }

    /// Counts `bytes` a write to `tenant`/`bucket` at `at_ms` left to
    /// garbage collection, in `usage` (the caller writes it) and in the
    /// window's garbage record.
    pub fn add_garbage(
        &self,
        tenant: &str,
        bucket: &str,
        at_ms: i64,
        bytes: u64,
        usage: &mut Usage,
        batch: &mut Batch,
    ) -> Io<()> {
        if bytes == 0 {
            return Ok(());
        }
        usage.garbage += bytes;
        let k = garbage_key(tenant, bucket, at_ms);
        let before: u64 = self.get(&k)?.unwrap_or(0);
        batch.insert(k, encode(&(before + bytes)));
        Ok(())
    }

    /// Drops a closed bucket's garbage records (its usage goes with it).
    pub fn forget_garbage(&self, tenant: &str, bucket: &str, batch: &mut Batch) -> Io<()> {
        for kv in self
            .r
            .prefix(&bucket_prefix(tag::GARBAGE, tenant, bucket))?
        {
            batch.remove(kv?.0);
        }
        Ok(())
    }

    /// Stops counting garbage made in windows that ended by `before_ms`: a
    /// collection whose floor is `before_ms` has freed it.
    pub fn settle_garbage(&self, before_ms: i64, batch: &mut Batch) -> Io<Value> {
        let mut settled: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for kv in self.r.prefix(&[tag::GARBAGE])? {
            let (k, v) = kv?;
            let Some((usage, window)) = parse_garbage_key(&k) else {
                continue;
            };
            if window + WINDOW_MS <= before_ms {
                *settled.entry(usage).or_default() += decode::<u64>(&v)?;
                batch.remove(k);
            }
        }
        for (k, bytes) in settled {
            if let Some(mut usage) = self.get::<Usage>(&k)? {
                usage.garbage = usage.garbage.saturating_sub(bytes);
                batch.insert(k, encode(&usage));
            }
        }
        Ok(Value::Done)
    }

    /// Raises both marks of the floor to at least `to`'s.
    pub fn raise_floor(&self, to: Floor, batch: &mut Batch) -> Io<Value> {
        let old = self.floor()?;
        let new = Floor {
            touched_ms: old.touched_ms.max(to.touched_ms),
            recorded_ms: old.recorded_ms.max(to.recorded_ms),
        };
        if new != old {
            batch.insert(FLOOR, encode(&new));
        }
        Ok(Value::Done)
    }

    /// Records chunks stored at `stamp_ms`; refused below the floor's
    /// record mark, where the sweep may have taken their files as orphans.
    pub fn add_chunks(
        &self,
        chunks: &[(ChunkId, u64)],
        stamp_ms: i64,
        batch: &mut Batch,
    ) -> Io<Value> {
        if stamp_ms < self.floor()?.recorded_ms {
            return Err(ShardError::ChunksStale);
        }
        for (id, len) in chunks {
            let k = chunk_key(id);
            let touched_ms = match self.r.get(&k)? {
                Some(v) => chunk_record(&v)?.touched_ms.max(stamp_ms),
                None => stamp_ms,
            };
            batch.insert(
                k,
                encode(&ChunkRecord {
                    len: *len,
                    touched_ms,
                }),
            );
        }
        Ok(Value::Done)
    }

    /// Marks chunks as in use at `stamp_ms`; refused, changing nothing, if
    /// one of them was collected already or the stamp is below the floor.
    pub fn touch_chunks(&self, ids: &[ChunkId], stamp_ms: i64, batch: &mut Batch) -> Io<Value> {
        if stamp_ms < self.floor()?.touched_ms {
            return Err(ShardError::ChunksStale);
        }
        for id in ids {
            let k = chunk_key(id);
            let Some(v) = self.r.get(&k)? else {
                return Err(ShardError::ChunksStale);
            };
            let mut record = chunk_record(&v)?;
            if stamp_ms > record.touched_ms {
                record.touched_ms = stamp_ms;
                batch.insert(k, encode(&record));
            }
        }
        Ok(Value::Done)
    }

    /// Removes the records of `ids` still untouched since `below_ms`, which
    /// the floor must have reached; answers what it removed, the replicas
    /// deleting those files once applied.
    pub fn drop_chunks(&self, ids: &[ChunkId], below_ms: i64, batch: &mut Batch) -> Io<Value> {
        if below_ms > self.floor()?.touched_ms {
            return Err(ShardError::InvalidArgument(format!(
                "chunks untouched since {below_ms} cannot be dropped before the floor reaches it"
            )));
        }
        let mut dropped = Vec::new();
        for id in ids {
            let k = chunk_key(id);
            let Some(v) = self.r.get(&k)? else { continue };
            let record = chunk_record(&v)?;
            if record.touched_ms < below_ms {
                batch.remove(k);
                dropped.push((*id, record.len));
            }
        }
        Ok(Value::Dropped(dropped))
    }

    /// One page of the chunk ids named by objects and upload parts: those
    /// of up to `max` records after the record key `after` (empty: from the
    /// start), and the key to go on after, if there may be more.
    pub fn chunk_refs(&self, after: &[u8], max: u32) -> Io<Value> {
        let mut ids = Vec::new();
        let mut records = 0;
        let mut next = after.to_vec();
        next.push(0);
        for t in [tag::OBJECT, tag::PART] {
            let start = next.clone().max(vec![t]);
            for kv in self.r.range(&start, Some(&[t + 1]))? {
                let (k, v) = kv?;
                ids.extend(referenced_by(t, &v)?);
                records += 1;
                if records >= max {
                    return Ok(Value::ChunkIds { ids, next: Some(k) });
                }
            }
        }
        Ok(Value::ChunkIds { ids, next: None })
    }

    /// One page of chunk records, after the chunk `after`.
    pub fn chunk_records(&self, after: Option<ChunkId>, max: u32) -> Io<Value> {
        let start = match after {
            Some(id) => {
                let mut k = chunk_key(&id);
                k.push(0);
                k
            }
            None => vec![tag::CHUNK],
        };
        let mut page = Vec::new();
        for kv in self
            .r
            .range(&start, Some(&[tag::CHUNK + 1]))?
            .take(max as usize)
        {
            let (k, v) = kv?;
            if let Some(id) = chunk_of_key(&k) {
                page.push((id, chunk_record(&v)?));
            }
        }
        Ok(Value::ChunkRecords(page))
    }

    /// Which of `ids` this shard has a record of, and its floor.
    pub fn recorded_among(&self, ids: &[ChunkId]) -> Io<Value> {
        let mut recorded = Vec::new();
        for id in ids {
            if self.r.contains(&chunk_key(id))? {
                recorded.push(*id);
            }
        }
        Ok(Value::Recorded {
            ids: recorded,
            floor: self.floor()?,
        })
    }

    /// Up to `max` uploads begun before `before_ms`, for collection to abort.
    pub fn stale_uploads(&self, before_ms: i64, max: u32) -> Io<Value> {
        let mut stale = Vec::new();
        for kv in self.r.prefix(&[tag::UPLOAD])? {
            let (k, v) = kv?;
            let upload: Upload = decode(&v)?;
            if upload.initiated_ms >= before_ms {
                continue;
            }
            let mut parts = k[1..].split(|b| *b == 0);
            let (Some(tenant), Some(bucket)) = (parts.next(), parts.next()) else {
                continue;
            };
            stale.push(StaleUpload {
                tenant: String::from_utf8_lossy(tenant).into_owned(),
                bucket: String::from_utf8_lossy(bucket).into_owned(),
                key: upload.key,
                upload_id: upload.upload_id,
            });
            if stale.len() >= max as usize {
                break;
            }
        }
        Ok(Value::StaleUploads(stale))
    }
}
