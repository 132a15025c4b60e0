//! Linearizable reads in rounds.
//!
//! A read may be answered by the leader only after a quorum confirms that
//! it still leads, and only from a state that includes every write
//! acknowledged before the read arrived (openraft's `ensure_linearizable`).
//! One confirmation serves every read that arrived before it started, so
//! concurrent readers of a shard share rounds: while one round runs, new
//! readers wait for the next, which starts as soon as the current ends.

use super::command::ShardError;
use super::Raft;
use openraft::error::{CheckIsLeaderError, RaftError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Longest a leader may take to confirm its leadership.
const CONFIRM_DEADLINE: Duration = Duration::from_secs(10);

type Waiter = oneshot::Sender<Result<(), ShardError>>;

#[derive(Default)]
struct Queue {
    running: bool,
    waiters: Vec<Waiter>,
}

/// The read rounds of one shard replica.
#[derive(Clone, Default)]
pub struct ReadGate {
    queue: Arc<Mutex<Queue>>,
}

impl ReadGate {
    /// Returns once a confirmation that started after this call succeeded.
    pub async fn confirm(&self, raft: &Raft) -> Result<(), ShardError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.waiters.push(tx);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            tokio::spawn(run_rounds(self.queue.clone(), raft.clone()));
        }
        rx.await
            .unwrap_or_else(|_| Err(ShardError::Unavailable("read round abandoned".into())))
    }
}

async fn run_rounds(queue: Arc<Mutex<Queue>>, raft: Raft) {
    loop {
        let waiters = {
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.waiters.is_empty() {
                q.running = false;
                return;
            }
            std::mem::take(&mut q.waiters)
        };
        let result = match tokio::time::timeout(CONFIRM_DEADLINE, raft.ensure_linearizable()).await
        {
            Err(_) => Err(ShardError::Unavailable(
                "could not confirm the leader".into(),
            )),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(ShardError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Ok(Err(e)) => Err(ShardError::Unavailable(e.to_string())),
            Ok(Ok(_)) => Ok(()),
        };
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}
