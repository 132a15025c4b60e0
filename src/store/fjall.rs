//! The store on fjall 3 (an LSM tree): one keyspace per space, each batch
//! one atomic `WriteBatch`, the journal persisted only by `persist`. Built
//! only with `engine-comparison`, as a candidate measured against redb by
//! `benches/store_torture.rs` (docs/design.md has the figures).
//!
//! Configured as a state-machine store should be: small memtables (64 of
//! fjall's default 64 MiB would be 4 GiB), a bounded journal, and reads
//! through a snapshot (a plain keyspace read can see half a batch). As
//! with sled, each [`Writer::apply`] is atomic on its own.

use super::{Batch, Engine, Pair, Reader, Result, StoreError, Writer};
use ::fjall::Readable;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::of(e)
}

pub struct Fjall {
    db: ::fjall::Database,
    /// Open keyspaces: opening one by name takes the database's write lock.
    spaces: Mutex<HashMap<String, ::fjall::Keyspace>>,
}

impl Fjall {
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Fjall> {
        let db = ::fjall::Database::builder(dir.join("fjall"))
            .cache_size(cache_bytes as u64)
            .manual_journal_persist(true)
            .worker_threads(2)
            .max_journaling_size(128 << 20)
            .open()
            .map_err(err)?;
        Ok(Fjall {
            db,
            spaces: Mutex::new(HashMap::new()),
        })
    }

    fn space(&self, name: &str) -> Result<::fjall::Keyspace> {
        let mut spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = spaces.get(name) {
            return Ok(k.clone());
        }
        let k = self
            .db
            .keyspace(name, || {
                ::fjall::KeyspaceCreateOptions::default().max_memtable_size(8 << 20)
            })
            .map_err(err)?;
        spaces.insert(name.to_string(), k.clone());
        Ok(k)
    }
}

struct Space<'a> {
    db: &'a ::fjall::Database,
    keyspace: ::fjall::Keyspace,
}

impl Reader for Space<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let snapshot = self.db.snapshot();
        Ok(snapshot
            .get(&self.keyspace, key)
            .map_err(err)?
            .map(|v| v.to_vec()))
    }

    fn range<'a>(
        &'a self,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Box<dyn Iterator<Item = Result<Pair>> + 'a>> {
        let snapshot = self.db.snapshot();
        let pairs = match to {
            Some(to) => snapshot.range(&self.keyspace, from.to_vec()..to.to_vec()),
            None => snapshot.range(&self.keyspace, from.to_vec()..),
        };
        Ok(Box::new(pairs.map(|g| {
            let (k, v) = g.into_inner().map_err(err)?;
            Ok((k.to_vec(), v.to_vec()))
        })))
    }
}

impl Writer for Space<'_> {
    fn apply(&mut self, batch: Batch) -> Result<()> {
        let mut b = self.db.batch();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(&self.keyspace, k, v),
                None => b.remove(&self.keyspace, k),
            }
        }
        b.commit().map_err(err)
    }
}

impl Engine for Fjall {
    fn read<'a>(&'a self, space: &str) -> Result<Box<dyn Reader + 'a>> {
        Ok(Box::new(Space {
            db: &self.db,
            keyspace: self.space(space)?,
        }))
    }

    fn write(
        &self,
        space: &str,
        change: &mut dyn FnMut(&mut dyn Writer) -> Result<()>,
    ) -> Result<()> {
        change(&mut Space {
            db: &self.db,
            keyspace: self.space(space)?,
        })
    }

    fn persist(&self) -> Result<()> {
        self.db.persist(::fjall::PersistMode::SyncAll).map_err(err)
    }

    fn remove_space(&self, space: &str) -> Result<()> {
        let k = self.space(space)?;
        self.spaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(space);
        self.db.delete_keyspace(k).map_err(err)
    }
}
