//! The Raft log on a disk that fills up.
//!
//! A node's segment log lives on a 2 MiB tmpfs here. Appends go on until the
//! disk refuses one part way through a record (ENOSPC). The log must then
//! be exactly what it was before that append: the index and the file agree,
//! so once space is freed the next append lands where the index says and a
//! restart replays every record written, none torn. Needs root (`mount`);
//! the mount is removed when the test ends, pass or fail.

use lumbung::shard::segment_log::SegmentLog;
use lumbung::types::ShardId;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A size-limited tmpfs, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount (this test needs root)")
            .success();
        assert!(ok, "mounting a tmpfs failed (this test needs root)");
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn payload(i: u64) -> Vec<u8> {
    // Large enough that the disk fills in a few hundred appends, and that
    // the failing one is cut part way through.
    let mut p = vec![(i % 251) as u8; 12_000];
    p[..8].copy_from_slice(&i.to_be_bytes());
    p
}

#[test]
fn a_write_the_full_disk_refuses_leaves_the_log_as_it_was() {
    let disk = SmallDisk::mount("2m");
    let logdir: PathBuf = disk.path().join("raftlog");
    let shard = ShardId(1);
    // Room to free later: a filler written first.
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![0u8; 256 * 1024]).unwrap();

    let log = SegmentLog::open(&logdir).unwrap();
    let mut written = 0u64;
    let refused = loop {
        let i = written + 1;
        match log.append(shard, &[(i, payload(i))]) {
            Ok(()) => written = i,
            Err(e) => break e,
        }
        assert!(written < 10_000, "the 2 MiB disk never filled");
    };
    assert_eq!(refused.raw_os_error(), Some(libc::ENOSPC), "{refused}");
    assert!(written > 10, "only {written} records fitted");
    log.sync().unwrap();
    assert_eq!(log.read(shard, 1, u64::MAX).unwrap().len() as u64, written);

    // Space comes back: the next append goes where the index says.
    std::fs::remove_file(&filler).unwrap();
    let next = written + 1;
    log.append(shard, &[(next, payload(next))]).unwrap();
    log.sync().unwrap();
    drop(log);

    // A restart replays every record, and none is torn or corrupt.
    let log = SegmentLog::open(&logdir).unwrap();
    let got = log.read(shard, 1, u64::MAX).unwrap();
    assert_eq!(got.len() as u64, next);
    for (i, p) in (1..=next).zip(&got) {
        assert_eq!(*p, payload(i), "record {i} differs after the restart");
    }
}
