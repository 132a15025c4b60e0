//! The Raft log of every shard of a node, in append-only segment files.
//!
//! sled served as the log at first, but deleting purged entries from it made
//! its memory grow without bound (900 MiB per node after 80,000 small
//! writes; see docs/design.md). Here a purge deletes nothing: whole segment
//! files are removed once no live entry is left in them, oldest first, and
//! memory holds only an index of where each live entry is.
//!
//! One file is shared by all shards so that one fsync covers every shard's
//! appends (group commit, driven by the node's flusher). A shard that
//! stops writing (idle, or its replica gone) would then keep old segments
//! alive for the sake of a few entries, so [`SegmentLog::compact`] copies
//! the oldest segment's live entries forward once closed segments hold
//! much more than the live entries do.
//!
//! Record layout (all integers big-endian):
//!
//! ```text
//! u32 length of what follows | u8 kind | u32 shard | u64 index |
//! 32 bytes BLAKE3(payload) | payload
//! ```
//!
//! kind 1 is an entry (payload: msgpack openraft entry): it replaces the
//! shard's entry at `index` and drops those after it, as a Raft append
//! does. Kind 2 truncates the shard's log from `index` on (no payload).
//! Kind 3 is an entry copied forward by compaction: it replaces the entry
//! at `index` only. At start-up the segments are replayed in order; a torn
//! record at the very end (a write whose fsync never completed, so never
//! acknowledged) is cut off, while a damaged record anywhere else stops
//! the node: it must not serve a corrupt log.
//!
//! Segments go oldest first, so every record still on disk has every
//! later record (the truncations and copies that supersede it) after it:
//! a replay can never bring back an entry that was dropped.

use crate::types::ShardId;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const HEADER: usize = 1 + 4 + 8 + 32;
const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_COPY: u8 = 3;
/// Compaction copies at most this many bytes per hold of the log's lock,
/// so appends wait at most for one such batch.
const COPY_BATCH: u64 = 1024 * 1024;

fn corrupt(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Where one entry's payload lives.
#[derive(Clone, Copy, PartialEq)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
    hash: [u8; 32],
}

impl Loc {
    /// The bytes of the whole record.
    fn record_bytes(&self) -> u64 {
        4 + HEADER as u64 + self.len as u64
    }
}

/// One segment file.
struct Segment {
    file: Arc<File>,
    /// Bytes written (and not cut back).
    len: u64,
    /// Bytes of the records live entries point into.
    live: u64,
}

struct Inner {
    /// Every segment on disk, by number; the last one is appended to.
    segments: BTreeMap<u64, Segment>,
    /// Why the log can take no more writes: a failed write could not be
    /// cut back, or an fsync failed (after which the kernel may have
    /// dropped the unwritten pages, so nothing written since the last good
    /// fsync can be trusted). The node must restart and replay.
    broken: Option<String>,
    /// Live entries per shard.
    index: HashMap<ShardId, BTreeMap<u64, Loc>>,
    /// Segments past this size are closed (SEGMENT_BYTES but in tests).
    segment_bytes: u64,
}

/// The node's shared Raft log.
pub struct SegmentLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

/// Bytes on disk and bytes live, for `admin status` and the bound on the
/// log's size (see `compact`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LogBytes {
    pub on_disk: u64,
    pub live: u64,
    pub segments: usize,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("segment-{n:016x}.log"))
}

fn open_segment(dir: &Path, n: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(segment_path(dir, n))
}

impl SegmentLog {
    /// Opens the log in `dir`, replaying every segment.
    pub fn open(dir: &Path) -> std::io::Result<SegmentLog> {
        SegmentLog::open_sized(dir, SEGMENT_BYTES)
    }

    fn open_sized(dir: &Path, segment_bytes: u64) -> std::io::Result<SegmentLog> {
        std::fs::create_dir_all(dir)?;
        let mut numbers: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let hex = name.strip_prefix("segment-")?.strip_suffix(".log")?;
                u64::from_str_radix(hex, 16).ok()
            })
            .collect();
        numbers.sort_unstable();
        if numbers.is_empty() {
            numbers.push(0);
        }
        let mut inner = Inner {
            segments: BTreeMap::new(),
            broken: None,
            index: HashMap::new(),
            segment_bytes,
        };
        let last = *numbers.last().expect("at least one segment");
        for &n in &numbers {
            let file = Arc::new(open_segment(dir, n)?);
            inner.segments.insert(
                n,
                Segment {
                    file: file.clone(),
                    len: 0,
                    live: 0,
                },
            );
            let len = replay(&file, n, n == last, &mut inner)?;
            inner.segments.get_mut(&n).expect("just inserted").len = len;
        }
        File::open(dir)?.sync_all()?;
        Ok(SegmentLog {
            dir: dir.to_path_buf(),
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends entries `(index, payload)` of `shard`. Durable only after the
    /// next [`SegmentLog::sync`].
    pub fn append(&self, shard: ShardId, entries: &[(u64, Vec<u8>)]) -> std::io::Result<()> {
        let mut inner = self.lock();
        inner.usable()?;
        let (segment, start) = inner.active();
        let mut buf = Vec::new();
        let mut locs = Vec::with_capacity(entries.len());
        for (index, payload) in entries {
            let hash = *blake3::hash(payload).as_bytes();
            let offset = start + buf.len() as u64 + 4 + HEADER as u64;
            encode(&mut buf, KIND_ENTRY, shard, *index, &hash, payload);
            let len = payload.len() as u32;
            locs.push((
                *index,
                Loc {
                    segment,
                    offset,
                    len,
                    hash,
                },
            ));
        }
        inner.write_active(&buf)?;
        for (index, loc) in locs {
            inner.place(shard, index, loc, KIND_ENTRY);
        }
        inner.rotate_if_full(&self.dir)
    }

    /// Drops `shard`'s entries from `from` on, durably after the next sync.
    /// `from` 0 drops them all: the replica is gone, and its segments can
    /// go as soon as nothing older holds them back.
    pub fn truncate(&self, shard: ShardId, from: u64) -> std::io::Result<()> {
        let mut inner = self.lock();
        inner.usable()?;
        let mut buf = Vec::new();
        encode(&mut buf, KIND_TRUNCATE, shard, from, &[0; 32], &[]);
        inner.write_active(&buf)?;
        inner.drop_from(shard, from);
        inner.remove_dead_segments(&self.dir)
    }

    /// Forgets `shard`'s entries up to `upto` and removes segments that
    /// hold nothing live any more. The caller has made the purge durable.
    pub fn purge(&self, shard: ShardId, upto: u64) -> std::io::Result<()> {
        let mut inner = self.lock();
        inner.drop_upto(shard, upto);
        inner.remove_dead_segments(&self.dir)
    }

    /// Copies the live entries of the oldest segments forward, in batches,
    /// while closed segments hold more than twice the live entries' bytes
    /// plus one segment, and removes the segments emptied. That keeps the
    /// log's size on disk within `2 × live + 2 segments` (the active one
    /// included) between runs, whatever an idle shard or a wiped replica
    /// left behind. Returns the number of segments removed.
    pub fn compact(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        // Copying never needs more than everything once: a bound, so that
        // the loop ends whatever the shards append meanwhile.
        let mut allowance = self.bytes().on_disk;
        loop {
            let mut inner = self.lock();
            inner.usable()?;
            let Some(oldest) = inner.worth_compacting() else {
                return Ok(removed);
            };
            let live = inner.segments[&oldest].live;
            if live > 0 {
                if allowance == 0 {
                    return Ok(removed);
                }
                allowance = allowance.saturating_sub(live.min(COPY_BATCH));
                inner.copy_forward(oldest, COPY_BATCH)?;
                inner.rotate_if_full(&self.dir)?;
            }
            let before = inner.segments.len();
            inner.remove_dead_segments(&self.dir)?;
            removed += before - inner.segments.len();
        }
    }

    /// What the log takes on disk, and how much of it is live.
    pub fn bytes(&self) -> LogBytes {
        let inner = self.lock();
        LogBytes {
            on_disk: inner.segments.values().map(|s| s.len).sum(),
            live: inner.segments.values().map(|s| s.live).sum(),
            segments: inner.segments.len(),
        }
    }

    /// Verified payloads of `shard`'s entries with index in `[from, to)`.
    pub fn read(&self, shard: ShardId, from: u64, to: u64) -> std::io::Result<Vec<Vec<u8>>> {
        let wanted: Vec<(Loc, Arc<File>)> = {
            let inner = self.lock();
            let Some(log) = inner.index.get(&shard) else {
                return Ok(Vec::new());
            };
            log.range(from..to)
                .map(|(_, loc)| (*loc, inner.segments[&loc.segment].file.clone()))
                .collect()
        };
        wanted
            .into_iter()
            .map(|(loc, file)| read_at(&file, &loc))
            .collect()
    }

    /// The payload of `shard`'s last entry.
    pub fn last(&self, shard: ShardId) -> std::io::Result<Option<Vec<u8>>> {
        let found = {
            let inner = self.lock();
            inner
                .index
                .get(&shard)
                .and_then(|l| l.values().next_back().copied())
                .map(|loc| (loc, inner.segments[&loc.segment].file.clone()))
        };
        found.map(|(loc, file)| read_at(&file, &loc)).transpose()
    }

    /// Makes every append and truncation so far durable (closed segments
    /// were synced when they were closed).
    pub fn sync(&self) -> std::io::Result<()> {
        let active = {
            let inner = self.lock();
            inner.usable()?;
            inner.active_file()
        };
        active.sync_data().inspect_err(|e| {
            self.lock().broken = Some(format!("fsync failed: {e}"));
        })
    }
}

impl Inner {
    fn usable(&self) -> std::io::Result<()> {
        match &self.broken {
            Some(why) => Err(std::io::Error::other(format!(
                "the Raft log takes no more writes ({why}); the node must restart"
            ))),
            None => Ok(()),
        }
    }

    /// The number and length of the segment appended to.
    fn active(&self) -> (u64, u64) {
        let (n, s) = self.segments.last_key_value().expect("a segment");
        (*n, s.len)
    }

    fn active_file(&self) -> Arc<File> {
        let (_, s) = self.segments.last_key_value().expect("a segment");
        s.file.clone()
    }

    /// Makes `loc` the entry at `index` of `shard`. A Raft append
    /// (`KIND_ENTRY`) also drops the entries after it; a copy does not.
    fn place(&mut self, shard: ShardId, index: u64, loc: Loc, kind: u8) {
        let log = self.index.entry(shard).or_default();
        let gone: Vec<Loc> = if kind == KIND_COPY {
            log.remove(&index).into_iter().collect()
        } else {
            log.split_off(&index).into_values().collect()
        };
        log.insert(index, loc);
        self.segments
            .get_mut(&loc.segment)
            .expect("entries are placed in a segment on disk")
            .live += loc.record_bytes();
        self.forget(gone);
    }

    fn drop_from(&mut self, shard: ShardId, from: u64) {
        let gone = match self.index.get_mut(&shard) {
            Some(log) => log.split_off(&from).into_values().collect(),
            None => Vec::new(),
        };
        self.forget(gone);
    }

    fn drop_upto(&mut self, shard: ShardId, upto: u64) {
        let gone = match self.index.get_mut(&shard) {
            Some(log) => {
                let kept = log.split_off(&upto.saturating_add(1));
                std::mem::replace(log, kept).into_values().collect()
            }
            None => Vec::new(),
        };
        self.forget(gone);
    }

    /// Takes entries no longer live off their segments' live bytes.
    fn forget(&mut self, gone: Vec<Loc>) {
        for loc in gone {
            if let Some(s) = self.segments.get_mut(&loc.segment) {
                s.live -= loc.record_bytes();
            }
        }
    }

    /// The oldest closed segment, when closed segments hold more than
    /// twice the live bytes plus one segment.
    fn worth_compacting(&self) -> Option<u64> {
        let (active, _) = self.active();
        let closed: u64 = self.segments.range(..active).map(|(_, s)| s.len).sum();
        let live: u64 = self.segments.values().map(|s| s.live).sum();
        let oldest = *self.segments.first_key_value()?.0;
        (oldest != active && closed > 2 * live + self.segment_bytes).then_some(oldest)
    }

    /// Copies up to `budget` bytes of `segment`'s live entries to the
    /// active segment (kind 3: they replace the same index only).
    fn copy_forward(&mut self, segment: u64, budget: u64) -> std::io::Result<()> {
        let file = self.segments[&segment].file.clone();
        let mut moving = Vec::new();
        let mut bytes = 0;
        'shards: for (shard, log) in &self.index {
            for (index, loc) in log.iter().filter(|(_, l)| l.segment == segment) {
                if bytes >= budget {
                    break 'shards;
                }
                bytes += loc.record_bytes();
                moving.push((*shard, *index, *loc));
            }
        }
        let (active, start) = self.active();
        let mut buf = Vec::new();
        let mut placed = Vec::with_capacity(moving.len());
        for (shard, index, loc) in moving {
            let payload = read_at(&file, &loc)?;
            let offset = start + buf.len() as u64 + 4 + HEADER as u64;
            encode(&mut buf, KIND_COPY, shard, index, &loc.hash, &payload);
            let copy = Loc {
                segment: active,
                offset,
                ..loc
            };
            placed.push((shard, index, copy));
        }
        self.write_active(&buf)?;
        for (shard, index, copy) in placed {
            self.place(shard, index, copy, KIND_COPY);
        }
        Ok(())
    }

    /// Removes the oldest segments while nothing live is left in them (the
    /// active one stays). The active segment is synced first: it may hold
    /// the copies of what they held.
    fn remove_dead_segments(&mut self, dir: &Path) -> std::io::Result<()> {
        let (active, _) = self.active();
        let dead: Vec<u64> = self
            .segments
            .iter()
            .take_while(|(n, s)| **n != active && s.live == 0)
            .map(|(n, _)| *n)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.active_file().sync_data() {
            self.broken = Some(format!("fsync failed: {e}"));
            return Err(e);
        }
        for n in dead {
            self.segments.remove(&n);
            std::fs::remove_file(segment_path(dir, n))?;
        }
        Ok(())
    }

    /// Closes the active segment once full and starts the next. The old
    /// one is on disk before the new one exists: at start-up only the last
    /// segment may end in a torn record, so a torn record in an older one
    /// would stop the node.
    fn rotate_if_full(&mut self, dir: &Path) -> std::io::Result<()> {
        let (active, len) = self.active();
        if len < self.segment_bytes {
            return Ok(());
        }
        if let Err(e) = self.active_file().sync_data() {
            self.broken = Some(format!("fsync of a full segment failed: {e}"));
            return Err(e);
        }
        let next = active + 1;
        let file = Arc::new(open_segment(dir, next)?);
        File::open(dir)?.sync_all()?;
        let segment = Segment {
            file,
            len: 0,
            live: 0,
        };
        self.segments.insert(next, segment);
        Ok(())
    }

    /// Appends `buf` to the active segment. A write that fails part way
    /// (a full disk, EIO) is cut back to the last whole record, so later
    /// records start where the index says; if even that fails, the log is
    /// broken.
    fn write_active(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let (_, len) = self.active();
        let file = self.active_file();
        if let Err(e) = file.as_ref().write_all(buf) {
            if let Err(cut) = file.set_len(len) {
                self.broken = Some(format!(
                    "a write failed ({e}) and cutting it back failed too ({cut})"
                ));
            }
            return Err(e);
        }
        let mut active = self.segments.last_entry().expect("a segment");
        active.get_mut().len += buf.len() as u64;
        Ok(())
    }
}

fn encode(
    buf: &mut Vec<u8>,
    kind: u8,
    shard: ShardId,
    index: u64,
    hash: &[u8; 32],
    payload: &[u8],
) {
    buf.extend_from_slice(&((HEADER + payload.len()) as u32).to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(&shard.0.to_be_bytes());
    buf.extend_from_slice(&index.to_be_bytes());
    buf.extend_from_slice(hash);
    buf.extend_from_slice(payload);
}

fn read_at(file: &File, loc: &Loc) -> std::io::Result<Vec<u8>> {
    let mut payload = vec![0u8; loc.len as usize];
    file.read_exact_at(&mut payload, loc.offset)?;
    if blake3::hash(&payload).as_bytes() != &loc.hash {
        return Err(corrupt(format!(
            "log entry at segment {} offset {} does not match its checksum",
            loc.segment, loc.offset
        )));
    }
    Ok(payload)
}

/// Replays one segment into `inner`; returns its valid length.
fn replay(file: &File, segment: u64, is_last: bool, inner: &mut Inner) -> std::io::Result<u64> {
    let mut data = Vec::new();
    (&*file).read_to_end(&mut data)?;
    let mut pos = 0usize;
    while pos < data.len() {
        let torn = |what: &str| corrupt(format!("segment {segment} at byte {pos}: {what}"));
        let Some(len) = data.get(pos..pos + 4) else {
            if is_last {
                break;
            }
            return Err(torn("truncated length"));
        };
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        let Some(rec) = data.get(pos + 4..pos + 4 + len).filter(|_| len >= HEADER) else {
            if is_last {
                break;
            }
            return Err(torn("truncated record"));
        };
        let kind = rec[0];
        let shard = ShardId(u32::from_be_bytes(rec[1..5].try_into().expect("4 bytes")));
        let index = u64::from_be_bytes(rec[5..13].try_into().expect("8 bytes"));
        let hash: [u8; 32] = rec[13..45].try_into().expect("32 bytes");
        let payload = &rec[HEADER..];
        match kind {
            KIND_ENTRY | KIND_COPY if blake3::hash(payload).as_bytes() == &hash => {
                let loc = Loc {
                    segment,
                    offset: (pos + 4 + HEADER) as u64,
                    len: payload.len() as u32,
                    hash,
                };
                inner.place(shard, index, loc, kind);
            }
            KIND_TRUNCATE => inner.drop_from(shard, index),
            _ if is_last && pos + 4 + len == data.len() => break,
            _ => return Err(torn("checksum mismatch")),
        }
        pos += 4 + len;
    }
    if pos < data.len() {
        // The unacknowledged tail of the last segment.
        file.set_len(pos as u64)?;
        file.sync_all()?;
    }
    Ok(pos as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_truncations_and_purges_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = ShardId(3);
        {
            let log = SegmentLog::open(dir.path()).unwrap();
            let entries: Vec<_> = (1..=10).map(|i| (i, vec![i as u8; 100])).collect();
            log.append(s, &entries).unwrap();
            log.truncate(s, 8).unwrap();
            log.append(s, &[(8, b"new eight".to_vec())]).unwrap();
            log.sync().unwrap();
        }
        let log = SegmentLog::open(dir.path()).unwrap();
        let got = log.read(s, 0, 100).unwrap();
        assert_eq!(got.len(), 8);
        assert_eq!(got[7], b"new eight");
        assert_eq!(log.last(s).unwrap().unwrap(), b"new eight");
        log.purge(s, 5).unwrap();
        assert_eq!(log.read(s, 0, 100).unwrap().len(), 3);
    }

    /// Entries `from..=to` of a shard, 1 KiB each, naming their index.
    fn entries(from: u64, to: u64, tag: u8) -> Vec<(u64, Vec<u8>)> {
        (from..=to)
            .map(|i| {
                let mut p = vec![tag; 1024];
                p[..8].copy_from_slice(&i.to_be_bytes());
                (i, p)
            })
            .collect()
    }

    fn assert_holds(log: &SegmentLog, shard: ShardId, want: &[(u64, Vec<u8>)]) {
        let got = log.read(shard, 0, u64::MAX).unwrap();
        let want: Vec<&Vec<u8>> = want.iter().map(|(_, p)| p).collect();
        assert_eq!(got.iter().collect::<Vec<_>>(), want, "shard {shard}");
    }

    /// Shard 1 writes entries `from..=to`, purging all but the last five
    /// as it goes, as a busy shard behind its snapshots does.
    fn busy(log: &SegmentLog, from: u64, to: u64) -> Vec<(u64, Vec<u8>)> {
        let busy = ShardId(1);
        for i in from..=to {
            log.append(busy, &entries(i, i, 1)).unwrap();
            if i > 5 {
                log.purge(busy, i - 5).unwrap();
            }
        }
        entries(to - 4, to, 1)
    }

    #[test]
    fn an_idle_shard_pins_no_segment_once_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let idle = ShardId(2);
        let (kept_busy, kept_idle) = {
            let log = SegmentLog::open_sized(dir.path(), 8 * 1024).unwrap();
            log.append(idle, &entries(1, 3, 2)).unwrap();
            let kept = busy(&log, 1, 200);
            let before = log.bytes();
            assert!(before.segments > 20, "{before:?}: the idle shard pins them");
            log.compact().unwrap();
            let after = log.bytes();
            assert!(
                after.on_disk <= 2 * after.live + 2 * 8 * 1024 + 2048,
                "{before:?} became {after:?}"
            );
            log.sync().unwrap();
            (kept, entries(1, 3, 2))
        };
        let log = SegmentLog::open_sized(dir.path(), 8 * 1024).unwrap();
        log.purge(ShardId(1), 195).unwrap();
        assert_holds(&log, ShardId(1), &kept_busy);
        assert_holds(&log, idle, &kept_idle);
    }

    #[test]
    fn a_copied_entry_keeps_the_entries_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let x = ShardId(3);
        {
            let log = SegmentLog::open_sized(dir.path(), 8 * 1024).unwrap();
            log.append(x, &entries(1, 3, 3)).unwrap();
            busy(&log, 1, 40);
            log.append(x, &entries(4, 10, 3)).unwrap();
            busy(&log, 41, 80);
            log.compact().unwrap();
            assert!(log.bytes().segments < 10, "{:?}", log.bytes());
            log.sync().unwrap();
        }
        let log = SegmentLog::open_sized(dir.path(), 8 * 1024).unwrap();
        assert_holds(&log, x, &entries(1, 10, 3));
        // Later truncations and appends still win over the copies.
        log.truncate(x, 2).unwrap();
        log.append(x, &entries(2, 2, 9)).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open_sized(dir.path(), 8 * 1024).unwrap();
        let mut want = entries(1, 1, 3);
        want.extend(entries(2, 2, 9));
        assert_holds(&log, x, &want);
    }

    #[test]
    fn a_truncation_outlives_the_entries_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (pin, x) = (ShardId(5), ShardId(6));
        {
            let log = SegmentLog::open_sized(dir.path(), 8 * 1024).unwrap();
            log.append(pin, &entries(1, 1, 5)).unwrap();
            log.append(x, &entries(1, 10, 6)).unwrap();
            // A new leader's log from 5 on, in later segments, then purged:
            // only the truncation record keeps 6..10 from coming back.
            log.truncate(x, 5).unwrap();
            log.append(x, &entries(5, 5, 7)).unwrap();
            busy(&log, 1, 20);
            log.purge(x, 5).unwrap();
            log.sync().unwrap();
        }
        let log = SegmentLog::open_sized(dir.path(), 8 * 1024).unwrap();
        log.purge(x, 5).unwrap();
        assert_holds(&log, x, &[]);
        assert_holds(&log, pin, &entries(1, 1, 5));
    }

    #[test]
    fn a_wiped_replica_releases_its_segments() {
        let dir = tempfile::tempdir().unwrap();
        let gone = ShardId(4);
        let log = SegmentLog::open_sized(dir.path(), 8 * 1024).unwrap();
        log.append(gone, &entries(1, 30, 4)).unwrap();
        let kept = busy(&log, 1, 10);
        let before = log.bytes();
        log.truncate(gone, 0).unwrap();
        let after = log.bytes();
        assert!(
            after.segments < before.segments,
            "{before:?} then {after:?}"
        );
        assert!(after.on_disk <= after.live + 8 * 1024 + 2048, "{after:?}");
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open_sized(dir.path(), 8 * 1024).unwrap();
        assert_holds(&log, gone, &[]);
        log.purge(ShardId(1), 5).unwrap();
        assert_holds(&log, ShardId(1), &kept);
    }

    #[test]
    fn a_torn_tail_is_cut_but_damage_elsewhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = ShardId(1);
        {
            let log = SegmentLog::open(dir.path()).unwrap();
            log.append(s, &[(1, b"one".to_vec()), (2, b"two".to_vec())])
                .unwrap();
            log.sync().unwrap();
        }
        let path = segment_path(dir.path(), 0);
        let len = std::fs::metadata(&path).unwrap().len();
        // A half-written third record: cut off on open.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[0, 0, 0, 90, 1])
            .unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.read(s, 0, 10).unwrap().len(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        drop(log);
        // A flipped byte inside the first record, which is not the tail.
        let mut data = std::fs::read(&path).unwrap();
        data[4 + HEADER] ^= 0xFF;
        std::fs::write(&path, &data).unwrap();
        assert!(
            SegmentLog::open(dir.path()).is_err(),
            "a corrupt log must not open"
        );
    }
}
