//! Free space on a node's data disk, and the reserve kept on it.
//!
//! A disk that fills while a write is half done is the hard case: a Raft
//! log append or a store commit that fails on ENOSPC stops the replica. So
//! the node keeps a reserve and backs off in two steps before the disk is
//! actually full:
//!
//! - below the **reserve** it takes no new client data: its chunk store
//!   refuses chunk copies (the writer counts the other replicas), and a
//!   shard it leads refuses writes that add data with InsufficientStorage
//!   (507). Deletes, reads and everything Raft itself needs go on.
//! - below **half the reserve** its Raft log appends wait for room: its
//!   replicas fall behind (their peers commit without them) instead of
//!   failing, and catch up once space comes back.
//!
//! Nothing has to be restarted: when space returns (files deleted, the
//! disk grown) the node takes writes again within a poll.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often free space is read.
const POLL: Duration = Duration::from_millis(250);

/// Watches the free space of one file system.
pub struct SpaceGuard {
    dir: PathBuf,
    reserve: u64,
    /// Free bytes at the last poll (available to unprivileged users).
    free: AtomicU64,
}

/// Bytes available on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a zero byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

impl SpaceGuard {
    /// Reads the free space of `dir`'s file system now and then every
    /// [`POLL`], keeping `reserve` bytes free.
    pub fn start(dir: &Path, reserve: u64) -> std::io::Result<Arc<SpaceGuard>> {
        let guard = Arc::new(SpaceGuard {
            dir: dir.to_path_buf(),
            reserve,
            free: AtomicU64::new(free_bytes(dir)?),
        });
        let weak = Arc::downgrade(&guard);
        tokio::spawn(async move {
            let mut was_low = false;
            loop {
                tokio::time::sleep(POLL).await;
                let Some(g) = weak.upgrade() else { return };
                let dir = g.dir.clone();
                match tokio::task::spawn_blocking(move || free_bytes(&dir)).await {
                    Ok(Ok(free)) => g.free.store(free, Ordering::Relaxed),
                    Ok(Err(e)) => {
                        tracing::warn!("reading the free space of {}: {e}", g.dir.display())
                    }
                    Err(_) => return,
                }
                if g.is_low() != was_low {
                    was_low = g.is_low();
                    if was_low {
                        tracing::warn!(
                            free = g.free(),
                            reserve = g.reserve,
                            "disk below its reserve: refusing new data"
                        );
                    } else {
                        tracing::info!(
                            free = g.free(),
                            "disk above its reserve again: taking new data"
                        );
                    }
                }
            }
        });
        Ok(guard)
    }

    /// Free bytes at the last poll.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// True below the reserve: no new client data.
    pub fn is_low(&self) -> bool {
        self.free() < self.reserve
    }

    /// True below half the reserve: log appends wait.
    pub fn is_critical(&self) -> bool {
        self.free() < self.reserve / 2
    }

    /// Why new data is refused, if it is.
    pub fn refusal(&self) -> Option<String> {
        self.is_low().then(|| {
            format!(
                "this node's disk is nearly full ({} MiB free, {} MiB kept in reserve)",
                self.free() >> 20,
                self.reserve >> 20
            )
        })
    }

    /// Returns once the disk is no longer below half its reserve.
    pub async fn wait_for_room(&self) {
        if !self.is_critical() {
            return;
        }
        tracing::warn!(
            free = self.free(),
            "disk nearly full: Raft log appends wait for room"
        );
        while self.is_critical() {
            tokio::time::sleep(POLL).await;
        }
        tracing::info!(
            free = self.free(),
            "room on the disk again: Raft log appends go on"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_of_a_real_folder_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn a_reserve_larger_than_the_disk_refuses_data() {
        let dir = tempfile::tempdir().unwrap();
        let huge = SpaceGuard::start(dir.path(), u64::MAX).unwrap();
        assert!(huge.is_low() && huge.is_critical());
        assert!(huge.refusal().unwrap().contains("nearly full"));
        let none = SpaceGuard::start(dir.path(), 0).unwrap();
        assert!(!none.is_low() && none.refusal().is_none());
        none.wait_for_room().await;
    }
}
