//! Snapshot files: a shard's state written out key by key, so building,
//! sending and storing a snapshot never holds the whole state in memory.
//!
//! Layout of `snapshots/shard-<n>.snap`:
//!
//! ```text
//! "LUMBUNG-SNAP-1\n"                      magic, 15 bytes
//! u32 BE length, msgpack SnapshotMeta     what openraft knows it as
//! { u32 BE key length, key, u32 BE value length, value }*
//! u32 BE 0xFFFF_FFFF                      end of pairs
//! 32 bytes                                BLAKE3 of everything before
//! ```
//!
//! A file is written under a temporary name, fsynced, renamed into place
//! and its folder fsynced; a received file is checked against its BLAKE3
//! trailer before any of it reaches the tree.

use crate::types::NodeId;
use openraft::{BasicNode, SnapshotMeta};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"LUMBUNG-SNAP-1\n";
const END: u32 = u32::MAX;

pub type Meta = SnapshotMeta<NodeId, BasicNode>;

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// Hashes everything written through it.
struct Hashing<W> {
    inner: W,
    hash: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes everything read through it.
struct Verifying<R> {
    inner: R,
    hash: blake3::Hasher,
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

fn write_block<W: Write>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| invalid("record over 4 GiB"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(bytes)
}

fn read_len<R: Read>(r: &mut R) -> std::io::Result<u32> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    Ok(u32::from_be_bytes(len))
}

fn read_block<R: Read>(r: &mut R, len: u32) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes `pairs` with `meta` to `path`, durably.
pub fn write<I>(path: &Path, meta: &Meta, pairs: I) -> std::io::Result<()>
where
    I: Iterator<Item = std::io::Result<crate::store::Pair>>,
{
    let tmp = tmp_path(path);
    let file = File::create(&tmp)?;
    let mut w = Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: blake3::Hasher::new(),
    };
    w.write_all(MAGIC)?;
    write_block(
        &mut w,
        &rmp_serde::to_vec_named(meta).map_err(|e| invalid(&e.to_string()))?,
    )?;
    for pair in pairs {
        let (k, v) = pair?;
        write_block(&mut w, &k)?;
        write_block(&mut w, &v)?;
    }
    w.write_all(&END.to_be_bytes())?;
    let digest = w.hash.finalize();
    let mut file = w.inner.into_inner().map_err(|e| e.into_error())?;
    file.write_all(digest.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Reads the meta at the head of a snapshot file.
pub fn read_meta(path: &Path) -> std::io::Result<Meta> {
    let mut r = BufReader::new(File::open(path)?);
    read_header(&mut r)
}

fn read_header<R: Read>(r: &mut R) -> std::io::Result<Meta> {
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic)?;
    if magic != MAGIC {
        return Err(invalid("not a Lumbung snapshot"));
    }
    let len = read_len(r)?;
    crate::shard::command::from_msgpack(&read_block(r, len)?).map_err(|e| invalid(&e.to_string()))
}

/// Reads a whole snapshot file, handing each pair to `each`, and checks
/// the trailer. What `each` saw is only known good if this returns Ok.
pub fn read(
    file: File,
    mut each: impl FnMut(Vec<u8>, Vec<u8>) -> std::io::Result<()>,
) -> std::io::Result<Meta> {
    let mut r = Verifying {
        inner: BufReader::with_capacity(1 << 20, file),
        hash: blake3::Hasher::new(),
    };
    let meta = read_header(&mut r)?;
    loop {
        let len = read_len(&mut r)?;
        if len == END {
            break;
        }
        let k = read_block(&mut r, len)?;
        let len = read_len(&mut r)?;
        let v = read_block(&mut r, len)?;
        each(k, v)?;
    }
    let digest = r.hash.finalize();
    let mut trailer = [0u8; 32];
    r.inner.read_exact(&mut trailer)?;
    if digest.as_bytes() != &trailer {
        return Err(invalid("snapshot checksum mismatch"));
    }
    Ok(meta)
}

/// The current snapshot file of a shard.
pub fn current_path(dir: &Path, shard: crate::types::ShardId) -> PathBuf {
    dir.join(format!("shard-{shard}.snap"))
}

/// Writes a small file atomically and durably (tmp, fsync, rename, fsync dir).
pub fn write_small(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}
