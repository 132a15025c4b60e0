//! Chunk files: object bytes live here, outside the Raft log.
//!
//! A chunk is named by the BLAKE3 hash of its bytes. A write goes to a
//! temporary file that is fsynced, renamed into place, and made durable by
//! fsyncing its folder; only then does the caller count this replica as
//! holding it. Every read recomputes the hash: a replica never serves bytes
//! that differ from the name, and moves a corrupt file aside so it can be
//! repaired from another replica.

mod missing;

pub use missing::Missing;

use crate::space::SpaceGuard;
use crate::types::ChunkId;
use bytes::Bytes;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {0:?} does not hash to its name")]
    Mismatch(ChunkId),
    #[error("chunk store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The disk is below its reserve (see `space`).
    #[error("{0}")]
    NoSpace(String),
}

/// A chunk file, as the orphan sweep sees it.
#[derive(Clone, Copy, Debug)]
pub struct OldFile {
    pub id: ChunkId,
    pub len: u64,
    pub modified_ms: i64,
}

/// The chunk files of one node.
pub struct ChunkStore {
    dir: PathBuf,
    /// Totals for `admin status`.
    bytes: AtomicU64,
    count: AtomicU64,
    /// When set, writes are refused while the disk is below its reserve.
    space: Option<Arc<SpaceGuard>>,
}

/// Opens a folder for fsync.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl ChunkStore {
    /// Opens the store, creating the 256 fan-out folders once.
    pub fn open(dir: &Path) -> std::io::Result<ChunkStore> {
        std::fs::create_dir_all(dir)?;
        let (mut bytes, mut count) = (0, 0);
        for i in 0..=255u8 {
            let sub = dir.join(format!("{i:02x}"));
            if !sub.exists() {
                std::fs::create_dir(&sub)?;
            }
            // Listed first: a file put back below must not be met twice.
            let files: Vec<_> = std::fs::read_dir(&sub)?.collect();
            for f in files {
                let f = f?;
                let name = f.file_name();
                if name.to_string_lossy().ends_with(".tmp") {
                    // A write that never finished; nobody acknowledged it.
                    let _ = std::fs::remove_file(f.path());
                } else if name.to_string_lossy().ends_with(".sweep") {
                    // A sweep stopped before it decided: put it back (the
                    // next sweep asks again).
                    let back = f.path().with_extension("");
                    std::fs::rename(f.path(), &back)?;
                    bytes += std::fs::metadata(&back)?.len();
                    count += 1;
                } else if name.len() == 64 {
                    bytes += f.metadata()?.len();
                    count += 1;
                }
            }
        }
        sync_dir(dir)?;
        Ok(ChunkStore {
            dir: dir.to_path_buf(),
            bytes: AtomicU64::new(bytes),
            count: AtomicU64::new(count),
            space: None,
        })
    }

    /// Refuses writes while `space` is below its reserve.
    pub fn with_space(mut self, space: Arc<SpaceGuard>) -> ChunkStore {
        self.space = Some(space);
        self
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.path(id).exists()
    }

    /// Bytes and number of chunk files held.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.count.load(Ordering::Relaxed),
        )
    }

    /// Stores `data` under `id` durably, after checking that it hashes to
    /// `id`. Storing a chunk that is already here is a no-op.
    pub async fn put_verified(&self, id: ChunkId, data: Bytes) -> Result<(), ChunkError> {
        if let Some(why) = self.space.as_ref().and_then(|s| s.refusal()) {
            if !self.contains(&id) {
                return Err(ChunkError::NoSpace(why));
            }
        }
        let path = self.path(&id);
        let result = tokio::task::spawn_blocking(move || -> Result<bool, ChunkError> {
            if ChunkId::of(&data) != id {
                return Err(ChunkError::Mismatch(id));
            }
            if path.exists() {
                return Ok(false);
            }
            let tmp = path.with_extension(format!("{}.tmp", rand::random::<u32>()));
            let written = (|| {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                sync_dir(path.parent().expect("chunk paths have a folder"))
            })();
            if written.is_err() {
                // A full disk, most likely: do not leave half a chunk.
                let _ = std::fs::remove_file(&tmp);
            }
            written?;
            Ok(true)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        if result {
            self.count.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(
                std::fs::metadata(self.path(&id))
                    .map(|m| m.len())
                    .unwrap_or(0),
                Ordering::Relaxed,
            );
        }
        Ok(())
    }

    /// Deletes a chunk this node no longer holds a replica for.
    pub fn remove(&self, id: &ChunkId) -> std::io::Result<()> {
        let path = self.path(id);
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        std::fs::remove_file(&path)?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        Ok(())
    }

    /// The chunk files last written before `cutoff_ms` (ms since the
    /// epoch), with their sizes and when: candidates for the orphan sweep.
    pub fn files_older_than(&self, cutoff_ms: i64) -> std::io::Result<Vec<OldFile>> {
        let cutoff =
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(cutoff_ms.max(0) as u64);
        let mut old = Vec::new();
        self.each_chunk_file(|id, f| {
            let meta = match f.metadata() {
                Ok(m) => m,
                // Deleted since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            let modified = meta.modified()?;
            if modified < cutoff {
                let since = modified
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                old.push(OldFile {
                    id,
                    len: meta.len(),
                    modified_ms: since.as_millis() as i64,
                });
            }
            Ok(())
        })?;
        Ok(old)
    }

    /// Calls `f` with every chunk file (named by its id; files aside,
    /// `.tmp`, `.corrupt` and `.sweep`, are skipped).
    fn each_chunk_file(
        &self,
        mut f: impl FnMut(ChunkId, std::fs::DirEntry) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        for i in 0..=255u8 {
            for entry in std::fs::read_dir(self.dir.join(format!("{i:02x}")))? {
                let entry = entry?;
                let id = hex::decode(entry.file_name().as_encoded_bytes())
                    .ok()
                    .and_then(|b| ChunkId::from_slice(&b));
                if let Some(id) = id {
                    f(id, entry)?;
                }
            }
        }
        Ok(())
    }

    /// Deletes a chunk file unless `still_unwanted`, asked once the file is
    /// out of sight, says otherwise: a copy arriving meanwhile (a replica
    /// moving in) finds no file and writes its own, and a file wanted
    /// again is put back.
    pub fn remove_if(
        &self,
        id: &ChunkId,
        still_unwanted: impl FnOnce() -> bool,
    ) -> std::io::Result<bool> {
        let path = self.path(id);
        let aside = path.with_extension("sweep");
        match std::fs::rename(&path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        if !still_unwanted() {
            std::fs::rename(&aside, &path)?;
            return Ok(false);
        }
        let len = std::fs::metadata(&aside)?.len();
        std::fs::remove_file(&aside)?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        Ok(true)
    }

    /// Every chunk file's id.
    pub fn ids(&self) -> std::io::Result<Vec<ChunkId>> {
        let mut ids = Vec::new();
        self.each_chunk_file(|id, _| {
            ids.push(id);
            Ok(())
        })?;
        Ok(ids)
    }

    /// Re-reads a chunk file and checks it against its name: `Some(len)`
    /// when it verifies, `None` when it is gone or was corrupt (then moved
    /// aside as `<id>.corrupt` for repair).
    pub async fn verify(&self, id: ChunkId) -> Result<Option<u64>, ChunkError> {
        Ok(self.get_verified(id).await?.map(|d| d.len() as u64))
    }

    /// Deletes the copy of `id` moved aside as corrupt, once repaired.
    pub fn forget_corrupt(&self, id: &ChunkId) {
        let _ = std::fs::remove_file(self.path(id).with_extension("corrupt"));
    }

    /// True if a corrupt copy of `id` was moved aside and is still there.
    pub fn has_corrupt(&self, id: &ChunkId) -> bool {
        self.path(id).with_extension("corrupt").exists()
    }

    /// Reads a chunk and verifies it. `Ok(None)` when this replica does not
    /// have it, or had a corrupt copy (which is moved aside).
    pub async fn get_verified(&self, id: ChunkId) -> Result<Option<Bytes>, ChunkError> {
        let path = self.path(&id);
        tokio::task::spawn_blocking(move || -> Result<Option<Bytes>, ChunkError> {
            let data = match std::fs::read(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if ChunkId::of(&data) != id {
                tracing::error!(chunk = ?id, "corrupt chunk moved aside");
                let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                return Ok(None);
            }
            Ok(Some(Bytes::from(data)))
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stores_reads_and_refuses_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let data = Bytes::from_static(b"granary");
        let id = ChunkId::of(&data);
        assert!(matches!(
            store
                .put_verified(ChunkId::of(b"other"), data.clone())
                .await,
            Err(ChunkError::Mismatch(_))
        ));
        store.put_verified(id, data.clone()).await.unwrap();
        assert_eq!(store.get_verified(id).await.unwrap(), Some(data));
        std::fs::write(store.path(&id), b"rotten").unwrap();
        assert_eq!(store.get_verified(id).await.unwrap(), None);
        assert!(!store.contains(&id), "corrupt copy must be moved aside");
    }
}
