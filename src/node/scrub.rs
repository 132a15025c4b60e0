//! Scrub: every chunk file of a node re-read and checked against its name
//! at a limited rate, so silent corruption and lost files are found while
//! other replicas still hold good copies.
//!
//! A pass first names every chunk the local replicas record but the disk
//! lacks (the start-up audit), then reads every chunk file: one that no
//! longer hashes to its name is moved aside as `<id>.corrupt` and, if a
//! local replica records it, named for repair. The repair task copies it
//! from a good replica and deletes the aside copy. The repair queue needs
//! no file of its own: what it holds follows from the chunk records and
//! the files, which the audit reads again at every start.
//!
//! A pass starts `interval_days` after the last one ended (the end time is
//! kept in `<data_dir>/scrub.last`, written without fsync: a crash only
//! brings the next pass forward), or when an admin asks.

use super::chunks::Chunks;
use crate::config::ScrubConfig;
use crate::rpc::pb;
use crate::types::{now_ms, ChunkId};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

/// How long a pass waits, at most, for the repairs it asked for.
const REPAIR_WAIT: Duration = Duration::from_secs(600);

/// A node's scrubber: its settings and the progress of its latest pass.
pub struct Scrub {
    cfg: ScrubConfig,
    last_file: PathBuf,
    pass: Mutex<pb::ScrubStatus>,
    asked: Notify,
}

impl Scrub {
    pub fn new(cfg: ScrubConfig, data_dir: &Path) -> Scrub {
        let last_file = data_dir.join("scrub.last");
        // A node that never scrubbed counts from its first start.
        let finished_ms = std::fs::read_to_string(&last_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                let now = now_ms();
                let _ = std::fs::write(&last_file, now.to_string());
                now
            });
        Scrub {
            cfg,
            last_file,
            pass: Mutex::new(pb::ScrubStatus {
                finished_ms,
                ..Default::default()
            }),
            asked: Notify::new(),
        }
    }

    /// The latest pass: running, or the last one finished.
    pub fn status(&self) -> pb::ScrubStatus {
        *self.pass.lock().unwrap()
    }

    /// Starts a pass now unless one runs; answers the status before it
    /// starts (the running pass, or the last one).
    pub fn start(&self) -> pb::ScrubStatus {
        let status = self.status();
        if !status.running {
            self.asked.notify_one();
        }
        status
    }

    fn update(&self, f: impl FnOnce(&mut pb::ScrubStatus)) {
        f(&mut self.pass.lock().unwrap());
    }

    /// Runs passes: when asked, and `interval_days` after the last.
    pub async fn run(self: std::sync::Arc<Self>, chunks: Chunks) {
        loop {
            let last = self.status().finished_ms;
            let due_ms = last + self.cfg.interval_days as i64 * 24 * 3600 * 1000;
            let wait = Duration::from_millis((due_ms - now_ms()).max(0) as u64);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.asked.notified() => {}
            }
            self.pass(&chunks).await;
        }
    }

    /// One pass over every chunk file of the node.
    async fn pass(&self, chunks: &Chunks) {
        let started_ms = now_ms();
        self.update(|p| {
            *p = pb::ScrubStatus {
                running: true,
                started_ms,
                ..Default::default()
            }
        });
        tracing::info!("scrub pass started");
        let audit = chunks.clone();
        let missing = match tokio::task::spawn_blocking(move || audit.audit()).await {
            Ok(Ok(n)) => n as u64,
            Ok(Err(e)) => {
                tracing::warn!("scrub audit: {e}");
                0
            }
            Err(e) => {
                tracing::warn!("scrub audit: {e}");
                0
            }
        };
        self.update(|p| p.missing = missing);
        let store = chunks.store.clone();
        let ids = match tokio::task::spawn_blocking(move || store.ids()).await {
            Ok(Ok(ids)) => ids,
            other => {
                tracing::error!("scrub could not list the chunk files: {other:?}");
                Vec::new()
            }
        };
        self.update(|p| p.files_total = ids.len() as u64);
        let rate = (self.cfg.mb_per_sec.max(1) * 1_000_000) as f64;
        let clock = tokio::time::Instant::now();
        let mut read = 0u64;
        let mut repairs: Vec<ChunkId> = Vec::new();
        for id in ids {
            match chunks.store.verify(id).await {
                Ok(Some(len)) => read += len,
                // Collected since the listing.
                Ok(None) if !chunks.store.has_corrupt(&id) => {}
                Ok(None) => {
                    self.update(|p| p.corrupt += 1);
                    if chunks.recorded_here(id).await {
                        chunks.missing.name(id);
                        repairs.push(id);
                    } else {
                        // Garbage, or a shard this node no longer holds:
                        // nothing to repair, and the bad copy goes.
                        chunks.store.forget_corrupt(&id);
                    }
                }
                Err(e) => tracing::warn!(chunk = %id.to_hex(), "scrub read: {e}"),
            }
            self.update(|p| {
                p.files_checked += 1;
                p.bytes_checked = read;
            });
            // Keep the average under the rate.
            let due = clock + Duration::from_secs_f64(read as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        let repaired = self.wait_for_repairs(chunks, repairs).await;
        let finished_ms = now_ms();
        self.update(|p| {
            p.running = false;
            p.finished_ms = finished_ms;
            p.repaired = repaired;
        });
        if let Err(e) = std::fs::write(&self.last_file, finished_ms.to_string()) {
            tracing::warn!("recording the scrub pass's end: {e}");
        }
        let p = self.status();
        tracing::info!(
            files = p.files_checked,
            bytes = p.bytes_checked,
            corrupt = p.corrupt,
            missing = p.missing,
            repaired = p.repaired,
            "scrub pass finished"
        );
    }

    /// Waits until the corrupt chunks named for repair, and the missing
    /// ones the audit named, are back; returns how many came back.
    async fn wait_for_repairs(&self, chunks: &Chunks, corrupt: Vec<ChunkId>) -> u64 {
        let deadline = tokio::time::Instant::now() + REPAIR_WAIT;
        loop {
            let back = corrupt
                .iter()
                .filter(|id| chunks.store.contains(id))
                .count() as u64;
            let queued = chunks.missing.len() as u64;
            let missing = self.status().missing;
            let done = back == corrupt.len() as u64 && queued == 0;
            if done || tokio::time::Instant::now() >= deadline {
                return back + missing.saturating_sub(queued);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
