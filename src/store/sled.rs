//! The store on sled 0.34, as Lumbung used it before redb: one tree per
//! space, each batch one `apply_batch`, `persist` a `flush`. Built only
//! with `engine-comparison`, so the torture bench can show the deadlock it
//! was replaced for (docs/design.md).
//!
//! Each [`Writer::apply`] is atomic on its own; a write that fails after
//! applying a batch keeps that batch. That is how the state machine used
//! sled (one batch per entry), so the comparison is fair.

use super::{Batch, Engine, Pair, Reader, Result, StoreError, Writer};
use std::path::Path;

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::of(e)
}

pub struct Sled {
    db: ::sled::Db,
}

impl Sled {
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Sled> {
        let db = ::sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(cache_bytes as u64)
            .open()
            .map_err(err)?;
        Ok(Sled { db })
    }
}

struct Tree(::sled::Tree);

impl Reader for Tree {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(key).map_err(err)?.map(|v| v.to_vec()))
    }

    fn range<'a>(
        &'a self,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Box<dyn Iterator<Item = Result<Pair>> + 'a>> {
        let pairs = match to {
            Some(to) => self.0.range(from.to_vec()..to.to_vec()),
            None => self.0.range(from.to_vec()..),
        };
        Ok(Box::new(pairs.map(|kv| {
            let (k, v) = kv.map_err(err)?;
            Ok((k.to_vec(), v.to_vec()))
        })))
    }
}

impl Writer for Tree {
    fn apply(&mut self, batch: Batch) -> Result<()> {
        let mut b = ::sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.0.apply_batch(b).map_err(err)
    }
}

impl Engine for Sled {
    fn read<'a>(&'a self, space: &str) -> Result<Box<dyn Reader + 'a>> {
        Ok(Box::new(Tree(self.db.open_tree(space).map_err(err)?)))
    }

    fn write(
        &self,
        space: &str,
        change: &mut dyn FnMut(&mut dyn Writer) -> Result<()>,
    ) -> Result<()> {
        change(&mut Tree(self.db.open_tree(space).map_err(err)?))
    }

    fn persist(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(err)
    }

    fn remove_space(&self, space: &str) -> Result<()> {
        self.db.drop_tree(space).map(|_| ()).map_err(err)
    }
}
