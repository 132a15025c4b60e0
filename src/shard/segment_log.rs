//! The Raft log of every shard of a node, in append-only segment files.
//!
//! sled served as the log at first, but deleting purged entries from it made
//! its memory grow without bound (900 MiB per node after 80,000 small
//! writes; see docs/design.md). Here a purge deletes nothing: whole segment
//! files are removed once every entry in them is purged, and memory holds
//! only an index of where each live entry is.
//!
//! One file is shared by all shards so that one fsync covers every shard's
//! appends (group commit, driven by the node's flusher).
//!
//! Record layout (all integers big-endian):
//!
//! ```text
//! u32 length of what follows | u8 kind | u32 shard | u64 index |
//! 32 bytes BLAKE3(payload) | payload
//! ```
//!
//! kind 1 is an entry (payload: msgpack openraft entry); kind 2 truncates the
//! shard's log from `index` on (no payload). At start-up the segments are
//! replayed in order; a torn record at the very end (a write whose fsync
//! never completed, so never acknowledged) is cut off, while a damaged
//! record anywhere else stops the node: it must not serve a corrupt log.

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

fn corrupt(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Where one entry's payload lives.
#[derive(Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
    hash: [u8; 32],
}

struct Inner {
    /// Number and handle of the segment being appended to, and its length.
    active: (u64, Arc<File>, u64),
    /// Every segment still on disk.
    files: BTreeMap<u64, Arc<File>>,
    /// Why the log can take no more writes: a failed write could not be
    /// cut back, or an fsync failed (after which the kernel may have
    /// dropped the unwritten pages, so nothing written since the last good
    /// fsync can be trusted). The node must restart and replay.
    broken: Option<String>,
    /// Live entries per shard.
    index: HashMap<ShardId, BTreeMap<u64, Loc>>,
    /// Per segment, the highest index each shard wrote to it.
    reach: BTreeMap<u64, HashMap<ShardId, u64>>,
    /// Per shard, the index up to which entries are purged.
    purged: HashMap<ShardId, u64>,
}

/// The node's shared Raft log.
pub struct SegmentLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
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
        let mut inner = Inner {
            active: (0, Arc::new(open_segment(dir, 0)?), 0),
            files: BTreeMap::new(),
            broken: None,
            index: HashMap::new(),
            reach: BTreeMap::new(),
            purged: HashMap::new(),
        };
        if numbers.is_empty() {
            numbers.push(0);
        }
        let last = *numbers.last().expect("at least one segment");
        for &n in &numbers {
            let file = Arc::new(open_segment(dir, n)?);
            let len = replay(&file, n, n == last, &mut inner)?;
            inner.files.insert(n, file.clone());
            if n == last {
                inner.active = (n, file, len);
            }
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
        let mut buf = Vec::new();
        let mut locs = Vec::with_capacity(entries.len());
        let (segment, _, start) = inner.active.clone();
        for (index, payload) in entries {
            let hash = *blake3::hash(payload).as_bytes();
            let offset = start + buf.len() as u64 + 4 + HEADER as u64;
            encode(&mut buf, KIND_ENTRY, shard, *index, &hash, payload);
            locs.push((
                *index,
                Loc {
                    segment,
                    offset,
                    len: payload.len() as u32,
                    hash,
                },
            ));
        }
        inner.write_active(&buf)?;
        let log = inner.index.entry(shard).or_default();
        for (index, loc) in locs {
            // An append at `index` replaces whatever followed it.
            let _ = log.split_off(&index);
            log.insert(index, loc);
        }
        if let Some(max) = entries.last().map(|e| e.0) {
            let reach = inner
                .reach
                .entry(segment)
                .or_default()
                .entry(shard)
                .or_insert(0);
            *reach = (*reach).max(max);
        }
        if inner.active.2 >= SEGMENT_BYTES {
            self.rotate(&mut inner)?;
        }
        Ok(())
    }

    /// Closes the active segment and starts the next. The old one is on
    /// disk before the new one exists: at start-up only the last segment
    /// may end in a torn record, so a torn record in an older one would
    /// stop the node.
    fn rotate(&self, inner: &mut Inner) -> std::io::Result<()> {
        if let Err(e) = inner.active.1.sync_data() {
            inner.broken = Some(format!("fsync of a full segment failed: {e}"));
            return Err(e);
        }
        let next = inner.active.0 + 1;
        let file = Arc::new(open_segment(&self.dir, next)?);
        File::open(&self.dir)?.sync_all()?;
        inner.active = (next, file.clone(), 0);
        inner.files.insert(next, file);
        Ok(())
    }

    /// Drops `shard`'s entries from `from` on, durably after the next sync.
    pub fn truncate(&self, shard: ShardId, from: u64) -> std::io::Result<()> {
        let mut inner = self.lock();
        inner.usable()?;
        let mut buf = Vec::new();
        encode(&mut buf, KIND_TRUNCATE, shard, from, &[0; 32], &[]);
        inner.write_active(&buf)?;
        if let Some(log) = inner.index.get_mut(&shard) {
            let _ = log.split_off(&from);
        }
        Ok(())
    }

    /// Forgets `shard`'s entries up to `upto` and removes segments that
    /// hold nothing live any more. The caller has made the purge durable.
    pub fn purge(&self, shard: ShardId, upto: u64) -> std::io::Result<()> {
        let mut inner = self.lock();
        if let Some(log) = inner.index.get_mut(&shard) {
            *log = log.split_off(&(upto + 1));
        }
        let p = inner.purged.entry(shard).or_insert(0);
        *p = (*p).max(upto);
        let active = inner.active.0;
        let dead: Vec<u64> = inner
            .reach
            .iter()
            .filter(|(seg, shards)| {
                **seg != active
                    && shards
                        .iter()
                        .all(|(s, max)| inner.purged.get(s).is_some_and(|p| p >= max))
            })
            .map(|(seg, _)| *seg)
            .collect();
        for seg in dead {
            inner.reach.remove(&seg);
            inner.files.remove(&seg);
            std::fs::remove_file(segment_path(&self.dir, seg))?;
        }
        Ok(())
    }

    /// Verified payloads of `shard`'s entries with index in `[from, to)`.
    pub fn read(&self, shard: ShardId, from: u64, to: u64) -> std::io::Result<Vec<Vec<u8>>> {
        let wanted: Vec<(Loc, Arc<File>)> = {
            let inner = self.lock();
            let Some(log) = inner.index.get(&shard) else {
                return Ok(Vec::new());
            };
            log.range(from..to)
                .map(|(_, loc)| (*loc, inner.files[&loc.segment].clone()))
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
                .map(|loc| (loc, inner.files[&loc.segment].clone()))
        };
        found.map(|(loc, file)| read_at(&file, &loc)).transpose()
    }

    /// Makes every append and truncation so far durable (closed segments
    /// were synced when they were closed).
    pub fn sync(&self) -> std::io::Result<()> {
        let active = {
            let inner = self.lock();
            inner.usable()?;
            inner.active.1.clone()
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

    /// Appends `buf` to the active segment. A write that fails part way
    /// (a full disk, EIO) is cut back to the last whole record, so later
    /// records start where the index says; if even that fails, the log is
    /// broken.
    fn write_active(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let (file, len) = (self.active.1.clone(), self.active.2);
        if let Err(e) = file.as_ref().write_all(buf) {
            if let Err(cut) = file.set_len(len) {
                self.broken = Some(format!(
                    "a write failed ({e}) and cutting it back failed too ({cut})"
                ));
            }
            return Err(e);
        }
        self.active.2 += buf.len() as u64;
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
            KIND_ENTRY if blake3::hash(payload).as_bytes() == &hash => {
                let log = inner.index.entry(shard).or_default();
                let _ = log.split_off(&index);
                log.insert(
                    index,
                    Loc {
                        segment,
                        offset: (pos + 4 + HEADER) as u64,
                        len: payload.len() as u32,
                        hash,
                    },
                );
                let reach = inner
                    .reach
                    .entry(segment)
                    .or_default()
                    .entry(shard)
                    .or_insert(0);
                *reach = (*reach).max(index);
            }
            KIND_TRUNCATE => {
                if let Some(log) = inner.index.get_mut(&shard) {
                    let _ = log.split_off(&index);
                }
            }
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
