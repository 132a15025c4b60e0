//! The node's state store: what a node keeps besides its Raft log and its
//! chunk files.
//!
//! A node has two stores, each a set of named key spaces: the state store
//! (`sm/<shard>`, a shard's state machine) and the meta store
//! (`vote/<shard>`, its vote, purge point and committed id, and `node`, the
//! newest layout the node has seen). They are two because they are made
//! durable at different paces: the meta store at every vote, the state
//! store at checkpoints (see `shard::flusher`). Keys and values are bytes;
//! keys sort bytewise, so a bucket's objects are one range.
//!
//! What the rest of the node relies on:
//!
//! - **Atomic writes.** [`Store::write`] applies everything its closure
//!   did to one space, or nothing. A state machine applies an entry's
//!   changes and its "last applied" mark in one write, so after a crash the
//!   space is exactly the state after some entry, and Raft replays the rest
//!   from its log.
//! - **Writes are not durable until [`Store::persist`].** The Raft log is
//!   the durable record; the state machines are rebuilt from it, so they
//!   need to reach the disk only at checkpoints (before the log behind
//!   them is purged) and where a vote or purge point must hold.
//! - **Reads see every write that returned**, from any thread.
//! - **Every call blocks** (disk, locks), so async code reaches the store
//!   through [`Store::blocking`], never on a tokio worker thread: a slow or
//!   stuck disk then stalls the calls that need it, not the whole runtime,
//!   and the watchdog sees it.
//!
//! The engine is redb (see docs/design.md for why it replaced sled, and the
//! figures of each engine considered). `engine-comparison` builds add the
//! candidates measured against it, for `benches/store_torture.rs`.

#[cfg(feature = "engine-comparison")]
pub mod fjall;
mod redb;
#[cfg(feature = "engine-comparison")]
pub mod sled;

use std::path::Path;
use std::sync::Arc;

pub use self::redb::Redb;

/// A failure of the storage engine, with its message.
#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

impl StoreError {
    pub fn of(e: impl std::fmt::Display) -> StoreError {
        StoreError(e.to_string())
    }
}

impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> std::io::Error {
        std::io::Error::other(e.0)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One key-value pair read from a space.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Changes to one space, made all at once by [`Writer::apply`].
#[derive(Default, Debug)]
pub struct Batch {
    /// Keys to set (`Some`) or remove (`None`), applied in order.
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes of keys and values, to bound a batch's size.
    pub fn bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum()
    }
}

/// Reads one space, as of when the reader was made (or, inside a write,
/// including that write's changes so far).
pub trait Reader {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// The pairs with `from <= key < to` (no upper bound if `to` is None),
    /// in key order.
    fn range<'a>(
        &'a self,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Box<dyn Iterator<Item = Result<Pair>> + 'a>>;

    fn contains(&self, key: &[u8]) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The pairs whose key starts with `prefix`, in key order.
    fn prefix<'a>(&'a self, prefix: &[u8]) -> Result<Box<dyn Iterator<Item = Result<Pair>> + 'a>> {
        let prefix = prefix.to_vec();
        let end = prefix_end(&prefix);
        let pairs = self.range(&prefix, end.as_deref())?;
        Ok(Box::new(pairs.take_while(move |kv| {
            kv.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix))
        })))
    }
}

/// Changes one space inside a [`Store::write`]; reads see the changes
/// applied so far.
pub trait Writer: Reader {
    fn apply(&mut self, batch: Batch) -> Result<()>;
}

/// The smallest key above every key starting with `prefix`, if any.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A storage engine behind the store. Every method blocks.
pub trait Engine: Send + Sync + 'static {
    fn read<'a>(&'a self, space: &str) -> Result<Box<dyn Reader + 'a>>;

    /// Runs `change` in one atomic, not yet durable, write to `space`. If
    /// it fails, nothing it did is kept.
    fn write(
        &self,
        space: &str,
        change: &mut dyn FnMut(&mut dyn Writer) -> Result<()>,
    ) -> Result<()>;

    /// Makes every write that has returned durable.
    fn persist(&self) -> Result<()>;

    /// Deletes a space and everything in it (durably after `persist`).
    fn remove_space(&self, space: &str) -> Result<()>;
}

/// One store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    engine: Arc<dyn Engine>,
}

/// A node's two stores.
#[derive(Clone)]
pub struct Stores {
    pub state: Store,
    pub meta: Store,
}

/// The meta store's cache: it holds a few small records per shard.
const META_CACHE_BYTES: usize = 8 << 20;

impl Stores {
    /// Opens (or creates) both stores in `dir` (`state.redb`, `meta.redb`);
    /// the state store gets a page cache of `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Stores> {
        std::fs::create_dir_all(dir).map_err(StoreError::of)?;
        Ok(Stores {
            state: Store::open(&dir.join("state.redb"), cache_bytes)?,
            meta: Store::open(&dir.join("meta.redb"), META_CACHE_BYTES)?,
        })
    }
}

impl Store {
    /// Opens (or creates) the store in the file `path` with a page cache
    /// of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Store> {
        #[cfg(feature = "engine-comparison")]
        if let Some(store) = Store::open_candidate(path, cache_bytes)? {
            return Ok(store);
        }
        Ok(Store::with_engine(Redb::open(path, cache_bytes)?))
    }

    /// In `engine-comparison` builds, the engine `LUMBUNG_STORE_ENGINE`
    /// names (sled or fjall) instead of redb, in a folder beside `path`,
    /// so the load bench can compare them in real nodes.
    #[cfg(feature = "engine-comparison")]
    fn open_candidate(path: &Path, cache_bytes: usize) -> Result<Option<Store>> {
        let dir = path.with_extension("");
        match std::env::var("LUMBUNG_STORE_ENGINE").as_deref() {
            Ok("sled") => Ok(Some(Store::with_engine(sled::Sled::open(
                &dir,
                cache_bytes,
            )?))),
            Ok("fjall") => Ok(Some(Store::with_engine(fjall::Fjall::open(
                &dir,
                cache_bytes,
            )?))),
            Ok("redb") | Err(_) => Ok(None),
            Ok(other) => Err(StoreError(format!("unknown LUMBUNG_STORE_ENGINE {other}"))),
        }
    }

    pub fn with_engine(engine: impl Engine) -> Store {
        Store {
            engine: Arc::new(engine),
        }
    }

    pub fn read(&self, space: &str) -> Result<Box<dyn Reader + '_>> {
        self.engine.read(space)
    }

    /// One value of `space`.
    pub fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.read(space)?.get(key)
    }

    /// Runs `change` as one atomic write to `space` (see [`Engine::write`]).
    pub fn write<T>(
        &self,
        space: &str,
        change: impl FnOnce(&mut dyn Writer) -> Result<T>,
    ) -> Result<T> {
        let mut change = Some(change);
        let mut out = None;
        self.engine.write(space, &mut |w| {
            let f = change.take().expect("an engine runs a write's change once");
            out = Some(f(w)?);
            Ok(())
        })?;
        Ok(out.expect("a write that succeeded ran its change"))
    }

    /// Applies `batch` to `space` atomically.
    pub fn apply(&self, space: &str, batch: Batch) -> Result<()> {
        self.write(space, |w| w.apply(batch))
    }

    pub fn persist(&self) -> Result<()> {
        self.engine.persist()
    }

    pub fn remove_space(&self, space: &str) -> Result<()> {
        self.engine.remove_space(space)
    }

    /// Runs `f` on tokio's blocking pool, where store calls may wait on
    /// the disk without holding up a runtime worker.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError(format!("a store call panicked: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    /// The contract every engine keeps; run against each.
    pub(crate) fn keeps_the_store_contract(store: &Store) {
        let mut b = Batch::default();
        b.insert(b"a1".to_vec(), b"one".to_vec());
        b.insert(b"a2".to_vec(), b"two".to_vec());
        b.insert(b"b1".to_vec(), b"three".to_vec());
        store.apply("s", b).unwrap();
        assert_eq!(store.get("s", b"a2").unwrap().unwrap(), b"two");
        assert!(store.get("other", b"a2").unwrap().is_none());

        let r = store.read("s").unwrap();
        let keys: Vec<Vec<u8>> = r.prefix(b"a").unwrap().map(|kv| kv.unwrap().0).collect();
        assert_eq!(keys, [b"a1".to_vec(), b"a2".to_vec()]);
        let from_a2: Vec<Vec<u8>> = r
            .range(b"a2", None)
            .unwrap()
            .map(|kv| kv.unwrap().0)
            .collect();
        assert_eq!(from_a2, [b"a2".to_vec(), b"b1".to_vec()]);
        drop(r);

        // A write sees its own changes, and a failed write keeps none.
        let seen = store
            .write("s", |w| {
                let mut b = Batch::default();
                b.remove(b"a1".to_vec());
                w.apply(b)?;
                w.contains(b"a1")
            })
            .unwrap();
        assert!(!seen);
        let failed: Result<()> = store.write("s", |w| {
            let mut b = Batch::default();
            b.insert(b"a3".to_vec(), b"never".to_vec());
            w.apply(b)?;
            Err(StoreError("refused".into()))
        });
        assert!(failed.is_err());
        assert!(store.get("s", b"a3").unwrap().is_none());

        store.persist().unwrap();
        store.remove_space("s").unwrap();
        assert!(store
            .read("s")
            .unwrap()
            .range(b"", None)
            .unwrap()
            .next()
            .is_none());
        store.persist().unwrap();
    }
}
