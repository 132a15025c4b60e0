//! Garbage collection: chunks no object or upload part names any more go
//! from every replica, a grace period after the last write that touched
//! them, and multipart uploads left incomplete are aborted.
//!
//! A collection, run by the node leading the meta shard:
//!   1. picks the floor F = now - grace and raises every shard's floor to
//!      it, so from then on a shard refuses a manifest naming a chunk
//!      touched before F (the writer touches its chunks and tries again);
//!   2. reads every chunk id that objects and parts name, shard by shard;
//!   3. asks each chunk shard to drop the records it holds that were not
//!      named and are untouched since F; its replicas delete the files as
//!      they apply that;
//!   4. settles the garbage buckets made before F, which no longer counts
//!      toward their tenants' quotas;
//!   5. aborts uploads begun more than `abort_uploads_after_days` ago.
//!
//! Each node also sweeps orphans on its own: chunk files with no record at
//! all (a coordinator that died between writing a chunk and recording it,
//! a crash before a collected file was unlinked), once older than the
//! floor less another grace. docs/design.md states why neither can take a
//! chunk whose manifest may still commit.

use super::chunks::Chunks;
use crate::chunk::OldFile;
use crate::config::GcConfig;
use crate::shard::command::{ChunkRecord, Floor, StaleUpload};
use crate::shard::{Command, Query, ShardError, ShardHost, Value};
use crate::types::{now_ms, ChunkId, ShardId};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records read or chunks dropped per shard call.
const PAGE: u32 = 1000;
const DAY_MS: i64 = 24 * 3600 * 1000;

type Result<T> = std::result::Result<T, ShardError>;

/// What one collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Collected {
    pub started_ms: i64,
    pub finished_ms: i64,
    /// Chunks dropped, the object content they held, and the disk their
    /// files took on all replicas.
    pub chunks: u64,
    pub bytes: u64,
    pub disk_bytes: u64,
    /// Chunk ids named by objects and parts when it looked.
    pub referenced: u64,
    pub uploads_aborted: u64,
}

/// What one orphan sweep on one node did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Swept {
    pub files: u64,
    pub bytes: u64,
}

/// A node's collector: its settings, the last collection it ran and its
/// last sweep (for `admin`).
pub struct Gc {
    pub cfg: GcConfig,
    /// The node's data folder, whose bytes `disk_bytes` counts.
    data_dir: PathBuf,
    pub last_collection: Mutex<Option<Collected>>,
    pub last_sweep: Mutex<Option<Swept>>,
    /// One collection at a time on this node (the timer's or an admin's).
    running: tokio::sync::Mutex<()>,
}

impl Gc {
    pub fn new(cfg: GcConfig, data_dir: &Path) -> Gc {
        Gc {
            cfg,
            data_dir: data_dir.to_path_buf(),
            last_collection: Mutex::default(),
            last_sweep: Mutex::default(),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs one collection now and remembers what it did.
    pub async fn collect(&self, host: &ShardHost) -> Result<Collected> {
        let _one = self.running.lock().await;
        let c = collect(host, &self.cfg).await?;
        tracing::info!(
            chunks = c.chunks,
            bytes = c.bytes,
            uploads_aborted = c.uploads_aborted,
            "garbage collected"
        );
        *self.last_collection.lock().unwrap() = Some(c.clone());
        Ok(c)
    }

    /// Bytes on disk besides the chunks: the Raft log, the state and meta
    /// stores, snapshot files.
    pub fn disk_bytes(&self) -> DiskBytes {
        let size = |sub: &str| folder_bytes(&self.data_dir.join(sub));
        DiskBytes {
            raft_log: size("raftlog"),
            state: size("state"),
            snapshots: size("snapshots"),
        }
    }

    /// Sweeps this node's orphan files now and remembers what it did.
    pub async fn sweep(&self, chunks: &Chunks) -> Result<Swept> {
        let s = sweep_orphans(chunks, &self.cfg).await?;
        if s.files > 0 {
            tracing::info!(files = s.files, bytes = s.bytes, "orphan chunk files swept");
        }
        *self.last_sweep.lock().unwrap() = Some(s.clone());
        Ok(s)
    }
}

/// What `Gc::disk_bytes` counts.
pub struct DiskBytes {
    pub raft_log: u64,
    pub state: u64,
    pub snapshots: u64,
}

/// The bytes of the files directly in `dir` (0 if it cannot be read).
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn unexpected(v: Value) -> ShardError {
    ShardError::Internal(format!("unexpected reply {v:?}"))
}

/// Runs a collection every `interval_secs` while this node leads the meta
/// shard, and an orphan sweep of its own files as often.
pub async fn run(chunks: Chunks, gc: Arc<Gc>) {
    let mut every = tokio::time::interval(Duration::from_secs(gc.cfg.interval_secs.max(1)));
    every.tick().await;
    loop {
        every.tick().await;
        if super::rebalance::leads_meta(&chunks.host) {
            if let Err(e) = gc.collect(&chunks.host).await {
                tracing::warn!("garbage collection stopped: {e}");
            }
        }
        if let Err(e) = gc.sweep(&chunks).await {
            tracing::warn!("orphan sweep stopped: {e}");
        }
    }
}

/// One collection over every shard (see the module comment).
pub async fn collect(host: &ShardHost, cfg: &GcConfig) -> Result<Collected> {
    let started_ms = now_ms();
    let floor_ms = started_ms - cfg.grace_ms();
    let floor = Floor {
        touched_ms: floor_ms,
        recorded_ms: floor_ms - cfg.grace_ms(),
    };
    let shards: Vec<ShardId> = (0..host.layout().shards).map(ShardId).collect();
    let mut referenced = HashSet::new();
    for shard in &shards {
        host.propose(*shard, &Command::RaiseFloor { floor }).await?;
        referenced.extend(named_in(host, *shard).await?);
    }
    let mut out = Collected {
        started_ms,
        referenced: referenced.len() as u64,
        ..Default::default()
    };
    for shard in &shards {
        let dropped = drop_unnamed(host, *shard, &referenced, floor_ms).await?;
        let copies = host.layout().replicas(*shard).len() as u64;
        out.chunks += dropped.len() as u64;
        for (_, len) in dropped {
            out.bytes += len;
            out.disk_bytes += (len + crate::crypto::OVERHEAD as u64) * copies;
        }
    }
    // What buckets freed before the floor is gone now: it no longer
    // counts toward their tenants' quotas.
    for shard in &shards {
        let cmd = Command::SettleGarbage {
            before_ms: floor_ms,
        };
        host.propose(*shard, &cmd).await?;
    }
    let before_ms = started_ms - cfg.abort_uploads_after_days as i64 * DAY_MS;
    for shard in &shards {
        out.uploads_aborted += abort_stale_uploads(host, *shard, before_ms).await?;
    }
    out.finished_ms = now_ms();
    Ok(out)
}

/// Every chunk id the objects and upload parts of `shard` name.
async fn named_in(host: &ShardHost, shard: ShardId) -> Result<Vec<ChunkId>> {
    let mut named = Vec::new();
    let mut after = Vec::new();
    loop {
        let q = Query::ChunkRefs { after, max: PAGE };
        match host.query(shard, &q).await? {
            Value::ChunkIds { ids, next } => {
                named.extend(ids);
                match next {
                    Some(n) => after = n,
                    None => return Ok(named),
                }
            }
            v => return Err(unexpected(v)),
        }
    }
}

/// Drops the chunk records of `shard` not in `referenced` and untouched
/// since `floor_ms`; returns the chunks dropped with their content length.
async fn drop_unnamed(
    host: &ShardHost,
    shard: ShardId,
    referenced: &HashSet<ChunkId>,
    floor_ms: i64,
) -> Result<Vec<(ChunkId, u64)>> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page: Vec<(ChunkId, ChunkRecord)> = match host
            .query(shard, &Query::ChunkRecords { after, max: PAGE })
            .await?
        {
            Value::ChunkRecords(page) => page,
            v => return Err(unexpected(v)),
        };
        let Some((last, _)) = page.last() else {
            return Ok(all);
        };
        after = Some(*last);
        let ids: Vec<ChunkId> = page
            .iter()
            .filter(|(id, r)| r.touched_ms < floor_ms && !referenced.contains(id))
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        let cmd = Command::DropChunks {
            ids,
            below_ms: floor_ms,
        };
        match host.propose(shard, &cmd).await? {
            Value::Dropped(dropped) => all.extend(dropped),
            v => return Err(unexpected(v)),
        }
    }
}

/// Aborts the uploads in `shard` begun before `before_ms`.
async fn abort_stale_uploads(host: &ShardHost, shard: ShardId, before_ms: i64) -> Result<u64> {
    let mut aborted = 0;
    loop {
        let q = Query::StaleUploads {
            before_ms,
            max: PAGE,
        };
        let stale: Vec<StaleUpload> = match host.query(shard, &q).await? {
            Value::StaleUploads(s) => s,
            v => return Err(unexpected(v)),
        };
        if stale.is_empty() {
            return Ok(aborted);
        }
        for u in stale {
            tracing::info!(tenant = %u.tenant, bucket = %u.bucket, key = %u.key, upload_id = %u.upload_id, "aborting an abandoned multipart upload");
            let cmd = Command::AbortUpload {
                tenant: u.tenant,
                bucket: u.bucket,
                key: u.key,
                upload_id: u.upload_id,
                requested_ms: now_ms(),
            };
            match host.propose(shard, &cmd).await {
                Ok(_) | Err(ShardError::NoSuchUpload) => aborted += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Deletes this node's chunk files that no record names: those of shards
/// it holds once older than their shard's record mark (no record stamped
/// before it is accepted any more, see docs/design.md), and those of
/// shards it does not hold once older than twice the grace.
pub async fn sweep_orphans(chunks: &Chunks, cfg: &GcConfig) -> Result<Swept> {
    let cutoff_ms = now_ms() - 2 * cfg.grace_ms();
    let store = chunks.store.clone();
    let old = tokio::task::spawn_blocking(move || store.files_older_than(cutoff_ms))
        .await
        .map_err(|e| ShardError::Internal(e.to_string()))?
        .map_err(|e| ShardError::Internal(format!("listing chunk files: {e}")))?;
    let layout = chunks.host.layout();
    let me = chunks.host.id;
    let mut by_shard: BTreeMap<ShardId, Vec<OldFile>> = BTreeMap::new();
    for file in old {
        by_shard
            .entry(layout.shard_for_chunk(&file.id))
            .or_default()
            .push(file);
    }
    let mut swept = Swept::default();
    for (shard, files) in by_shard {
        let holder = layout.holders(shard).contains(&me);
        let orphans = match holder {
            true => unrecorded(&chunks.host, shard, files).await?,
            false => files,
        };
        for file in orphans {
            // A shard this node does not hold may have begun moving in.
            let host = &chunks.host;
            let unwanted = || holder || !host.layout().holders(shard).contains(&me);
            let removed = chunks
                .store
                .remove_if(&file.id, unwanted)
                .map_err(|e| ShardError::Internal(format!("deleting an orphan chunk: {e}")))?;
            if removed {
                swept.files += 1;
                swept.bytes += file.len;
            }
        }
    }
    Ok(swept)
}

/// The files among `files`, of a shard this node holds, that its leader
/// has no record of and that are older than its record mark.
async fn unrecorded(host: &ShardHost, shard: ShardId, files: Vec<OldFile>) -> Result<Vec<OldFile>> {
    let mut orphans = Vec::new();
    for page in files.chunks(PAGE as usize) {
        let q = Query::Recorded {
            ids: page.iter().map(|f| f.id).collect(),
        };
        let (recorded, floor) = match host.query(shard, &q).await? {
            Value::Recorded { ids, floor } => (ids.into_iter().collect::<HashSet<_>>(), floor),
            v => return Err(unexpected(v)),
        };
        // A younger file may still get its record: the floor refuses only
        // records stamped before its mark.
        orphans.extend(
            page.iter()
                .filter(|f| f.modified_ms < floor.recorded_ms && !recorded.contains(&f.id)),
        );
    }
    Ok(orphans)
}
