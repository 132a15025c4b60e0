//! The store on redb: one file, one table per space.
//!
//! redb is a copy-on-write B-tree with one writer at a time and readers
//! that never wait: a read transaction is a snapshot, and a writer waits
//! only for the previous writer. It runs no threads of its own, so no
//! background thread can hold a lock a caller waits for (sled's deadlock,
//! docs/design.md). Writes commit with `Durability::None`: visible at once,
//! on disk at the next [`Engine::persist`], a commit with
//! `Durability::Immediate` and quick repair (the allocator state is saved,
//! so reopening after a crash does not walk the whole file).

use super::{Batch, Engine, Pair, Reader, Result, StoreError, Writer};
use ::redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, Table, TableDefinition,
    TableError,
};
use std::path::Path;

type Def<'a> = TableDefinition<'a, &'static [u8], &'static [u8]>;

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::of(e)
}

/// The store's redb database.
pub struct Redb {
    db: Database,
}

impl Redb {
    /// Opens the file at `path`, creating it if needed. After a crash,
    /// redb checks the file and rebuilds what the last durable commit left.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Redb> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .set_repair_callback(|session| {
                tracing::info!(
                    progress = format!("{:.0}%", session.progress() * 100.0),
                    "repairing the state store after a crash"
                );
            })
            .create(path)
            .map_err(|e| StoreError(format!("opening {}: {e}", path.display())))?;
        Ok(Redb { db })
    }
}

/// A read transaction's view of one table; `None` if it was never made.
struct Snapshot {
    table: Option<ReadOnlyTable<&'static [u8], &'static [u8]>>,
}

impl Reader for Snapshot {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match &self.table {
            Some(t) => get(t, key),
            None => Ok(None),
        }
    }

    fn range<'a>(
        &'a self,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Box<dyn Iterator<Item = Result<Pair>> + 'a>> {
        match &self.table {
            Some(t) => range(t, from, to),
            None => Ok(Box::new(std::iter::empty())),
        }
    }
}

/// A table open in the write transaction.
struct Open<'t> {
    table: Table<'t, &'static [u8], &'static [u8]>,
}

impl Reader for Open<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        get(&self.table, key)
    }

    fn range<'a>(
        &'a self,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Box<dyn Iterator<Item = Result<Pair>> + 'a>> {
        range(&self.table, from, to)
    }
}

impl Writer for Open<'_> {
    fn apply(&mut self, batch: Batch) -> Result<()> {
        for (k, v) in batch.ops {
            match v {
                Some(v) => {
                    self.table.insert(k.as_slice(), v.as_slice()).map_err(err)?;
                }
                None => {
                    self.table.remove(k.as_slice()).map_err(err)?;
                }
            }
        }
        Ok(())
    }
}

fn get(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<Option<Vec<u8>>> {
    Ok(t.get(key).map_err(err)?.map(|v| v.value().to_vec()))
}

fn range<'a>(
    t: &'a impl ReadableTable<&'static [u8], &'static [u8]>,
    from: &[u8],
    to: Option<&[u8]>,
) -> Result<Box<dyn Iterator<Item = Result<Pair>> + 'a>> {
    let pairs = match to {
        Some(to) => t.range::<&[u8]>(from..to),
        None => t.range::<&[u8]>(from..),
    }
    .map_err(err)?;
    Ok(Box::new(pairs.map(|kv| {
        let (k, v) = kv.map_err(err)?;
        Ok((k.value().to_vec(), v.value().to_vec()))
    })))
}

impl Engine for Redb {
    fn read<'a>(&'a self, space: &str) -> Result<Box<dyn Reader + 'a>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = match tx.open_table(Def::new(space)) {
            Ok(t) => Some(t),
            Err(TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(err(e)),
        };
        Ok(Box::new(Snapshot { table }))
    }

    fn write(
        &self,
        space: &str,
        change: &mut dyn FnMut(&mut dyn Writer) -> Result<()>,
    ) -> Result<()> {
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::None).map_err(err)?;
        {
            let table = tx.open_table(Def::new(space)).map_err(err)?;
            // An error drops the transaction uncommitted: nothing is kept.
            change(&mut Open { table })?;
        }
        tx.commit().map_err(err)
    }

    fn persist(&self) -> Result<()> {
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::Immediate).map_err(err)?;
        tx.set_quick_repair(true);
        tx.commit().map_err(err)
    }

    fn remove_space(&self, space: &str) -> Result<()> {
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::None).map_err(err)?;
        tx.delete_table(Def::new(space)).map_err(err)?;
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn redb_keeps_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        crate::store::tests::keeps_the_store_contract(&store);
    }

    #[test]
    fn persisted_writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
            let mut b = Batch::default();
            b.insert(b"k".to_vec(), b"v".to_vec());
            store.apply("sm/1", b).unwrap();
            store.persist().unwrap();
        }
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        assert_eq!(store.get("sm/1", b"k").unwrap().unwrap(), b"v");
    }
}
