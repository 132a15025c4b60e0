//! The node's group-commit loop: one thread that makes durable, in one go,
//! what everyone asked for while the previous round ran.
//!
//! Three things reach the disk here, each only as often as someone needs
//! it: the segment log (every Raft append waits for its fdatasync), the
//! meta store (votes, purge points, the layout: a small file, one fsync)
//! and the state store (the shards' state machines: at checkpoints and
//! snapshot installs only, as persisting it writes out every dirty page
//! and holds its writers back meanwhile).

use super::segment_log::SegmentLog;
use super::TypeConfig;
use crate::store::Store;
use openraft::storage::LogFlushed;
use std::sync::Arc;
use tokio::sync::oneshot;

/// How much a waiter needs on disk; each level includes the ones before.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    /// The segment log.
    Log,
    /// The log and the meta store.
    Meta,
    /// The log and both stores.
    All,
}

/// Someone waiting for the next round.
enum Waiter {
    /// A Raft append.
    Append(LogFlushed<TypeConfig>),
    Notify(Level, oneshot::Sender<std::io::Result<()>>),
}

impl Waiter {
    fn level(&self) -> Level {
        match self {
            Waiter::Append(_) => Level::Log,
            Waiter::Notify(level, _) => *level,
        }
    }
}

/// What the loop makes durable.
struct Durables {
    log: Arc<SegmentLog>,
    meta: Store,
    state: Store,
}

impl Durables {
    fn sync(&self, level: Level) -> std::io::Result<()> {
        self.log.sync()?;
        if level >= Level::Meta {
            self.meta.persist()?;
        }
        if level == Level::All {
            self.state.persist()?;
        }
        Ok(())
    }
}

/// A handle on the loop; cheap to clone.
#[derive(Clone)]
pub struct Flusher {
    tx: std::sync::mpsc::Sender<Waiter>,
}

impl Flusher {
    /// Starts the loop; it ends when every handle is dropped.
    pub fn start(log: Arc<SegmentLog>, meta: Store, state: Store) -> Flusher {
        let durables = Durables { log, meta, state };
        let (tx, rx) = std::sync::mpsc::channel::<Waiter>();
        std::thread::Builder::new()
            .name("lumbung-fsync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let level = waiters
                        .iter()
                        .map(Waiter::level)
                        .max()
                        .unwrap_or(Level::Log);
                    let result = durables.sync(level);
                    for w in waiters {
                        let r = match &result {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                        };
                        match w {
                            Waiter::Append(cb) => cb.log_io_completed(r),
                            Waiter::Notify(_, tx) => {
                                let _ = tx.send(r);
                            }
                        }
                    }
                }
            })
            .expect("spawning the fsync thread");
        Flusher { tx }
    }

    async fn wait(&self, level: Level) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Waiter::Notify(level, tx))
            .map_err(|_| std::io::Error::other("flusher stopped"))?;
        rx.await
            .map_err(|_| std::io::Error::other("flusher stopped"))?
    }

    /// Waits until the log written so far is on disk.
    pub async fn sync_log(&self) -> std::io::Result<()> {
        self.wait(Level::Log).await
    }

    /// Waits until the log and the meta store (votes, purge points, the
    /// layout) written so far are on disk.
    pub async fn sync_meta(&self) -> std::io::Result<()> {
        self.wait(Level::Meta).await
    }

    /// Waits until everything written so far, state machines included, is
    /// on disk.
    pub async fn sync_all(&self) -> std::io::Result<()> {
        self.wait(Level::All).await
    }

    /// Calls `cb` once the log written so far is on disk.
    pub fn after_next_sync(&self, cb: LogFlushed<TypeConfig>) {
        if let Err(std::sync::mpsc::SendError(Waiter::Append(cb))) =
            self.tx.send(Waiter::Append(cb))
        {
            cb.log_io_completed(Err(std::io::Error::other("flusher stopped")));
        }
    }
}
