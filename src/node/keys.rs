//! Tenant keys on a node: unwrapped on demand from the meta shard's
//! records with this node's master keyring, and held in memory briefly.
//!
//! The cache is short-lived on purpose: a deleted tenant's DEKs must leave
//! every node's memory soon after they leave the meta shard, and a rotated
//! DEK should seal new writes soon after `tenant rotate-key`. Nodes are also
//! told to forget a tenant right away (`forget`) when that happens; the
//! time limit covers a node that missed the message.

use super::objects::Objects;
use crate::crypto::master::MasterKeys;
use crate::crypto::tenant_keys::TenantKeys;
use crate::shard::command::{Quota, TenantRecord};
use crate::shard::{Query, ShardError, Value};
use crate::types::ShardId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long unwrapped DEKs stay in memory without a fresh look at the
/// meta shard.
const KEEP_FOR: Duration = Duration::from_secs(5);

/// What a node keeps of a tenant's record for a few seconds.
#[derive(Clone)]
struct Recent {
    at: Instant,
    keys: Arc<TenantKeys>,
    quota: Quota,
}

/// This node's master keys and the tenant keys it unwrapped recently.
pub struct KeyCache {
    pub master: Arc<MasterKeys>,
    recent: Mutex<HashMap<String, Recent>>,
}

impl KeyCache {
    pub fn new(master: Arc<MasterKeys>) -> KeyCache {
        KeyCache {
            master,
            recent: Mutex::new(HashMap::new()),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, HashMap<String, Recent>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self, tenant: &str, generation: Option<u32>) -> Option<Recent> {
        let recent = self.recent();
        let entry = recent.get(tenant)?;
        let fresh = entry.at.elapsed() < KEEP_FOR;
        let holds = generation.is_none_or(|g| entry.keys.holds(g));
        (fresh && holds).then(|| entry.clone())
    }

    /// Drops a tenant's unwrapped keys from memory.
    pub fn forget(&self, tenant: &str) {
        self.recent().remove(tenant);
    }
}

impl Objects {
    /// The tenant's record from the meta shard.
    pub async fn tenant(&self, tenant: &str) -> Result<TenantRecord, ShardError> {
        let q = Query::Tenant {
            tenant: tenant.to_string(),
        };
        match self.chunks.host.query(ShardId::META, &q).await? {
            Value::Tenant(Some(t)) => Ok(t),
            Value::Tenant(None) => Err(ShardError::NoSuchTenant),
            v => Err(ShardError::Internal(format!("unexpected reply {v:?}"))),
        }
    }

    /// The tenant's DEKs, including `generation` when given (data sealed
    /// under a generation this node has not seen yet makes it look again).
    pub async fn tenant_keys(
        &self,
        tenant: &str,
        generation: Option<u32>,
    ) -> Result<Arc<TenantKeys>, ShardError> {
        Ok(self.recent_tenant(tenant, generation).await?.keys)
    }

    /// The tenant's quota, as of at most a few seconds ago.
    pub async fn tenant_quota(&self, tenant: &str) -> Result<Quota, ShardError> {
        Ok(self.recent_tenant(tenant, None).await?.quota)
    }

    async fn recent_tenant(
        &self,
        tenant: &str,
        generation: Option<u32>,
    ) -> Result<Recent, ShardError> {
        if let Some(entry) = self.keys.cached(tenant, generation) {
            return Ok(entry);
        }
        let record = self.tenant(tenant).await?;
        let keys = TenantKeys::unwrap_all(&self.keys.master, tenant, &record.deks)
            .map(Arc::new)
            .map_err(|e| ShardError::Internal(format!("unwrapping the keys of {tenant}: {e}")))?;
        let entry = Recent {
            at: Instant::now(),
            keys,
            quota: record.quota,
        };
        self.keys.recent().insert(tenant.to_string(), entry.clone());
        Ok(entry)
    }
}
