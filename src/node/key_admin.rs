//! Changing keys across the cluster: master key rotation, tenant DEK
//! rotation, and tenant deletion with crypto-shredding.
//!
//! **Master rotation** runs from one node and needs every node reachable,
//! because a DEK wrapped under a key some node lacks would be unreadable
//! there. Steps, each idempotent:
//! 1. every node adds the new key (not yet used);
//! 2. every node makes it current, so new DEKs are wrapped under it;
//! 3. every wrapped DEK in the meta shard is rewrapped under it, each with
//!    a compare-and-set (`RewrapDek`), repeated until none is left under an
//!    older key (a tenant created during step 2 may still use one);
//! 4. every node destroys its older keys.
//!
//! A failure before step 4 leaves extra keys but nothing unreadable; run
//! the rotation again.
//!
//! **Tenant deletion** removes the DEKs, access keys and catalogue from the
//! meta shard, tells every node to drop the unwrapped DEKs from memory, and
//! then rotates the master key: any copy of the wrapped DEKs that survives
//! on disk (an old log segment, a superseded sled page, a snapshot file)
//! was sealed under a key that no longer exists anywhere. The tenant's
//! object indexes are collected in the background (`collect_deleted`).

use super::objects::Objects;
use crate::crypto::master::MasterKeys;
use crate::crypto::tenant_keys::WrappedDek;
use crate::crypto::tenant_keys::{unwrap_dek, wrap_dek};
use crate::crypto::Key;
use crate::rpc::{error_of, pb};
use crate::shard::command::TenantRecord;
use crate::shard::{Command, Query, ShardError, Value};
use crate::types::{NodeId, ShardId};
use pb::MasterKeyStepKind as Step;
use std::time::Duration;

type Result<T> = std::result::Result<T, ShardError>;

/// Rounds of rewrapping before a rotation gives up on a moving target.
const REWRAP_ROUNDS: usize = 5;
/// Index records removed per Raft entry while collecting a deleted tenant.
const PURGE_BATCH: u32 = 1000;

/// Runs one rotation step on this node's keyring.
pub fn apply_master_step(
    master: &MasterKeys,
    req: &pb::MasterKeyStepRequest,
) -> Result<pb::MasterKeyState> {
    let failed = |e: anyhow::Error| ShardError::Unavailable(format!("master key file: {e:#}"));
    match req.step() {
        Step::MasterKeyState => {}
        Step::MasterKeyAdd => {
            let key = Key::from_bytes(&req.key)
                .ok_or_else(|| ShardError::InvalidArgument("a master key is 32 bytes".into()))?;
            master.add(req.generation, &key).map_err(failed)?;
        }
        Step::MasterKeyMakeCurrent => master.make_current(req.generation).map_err(failed)?,
        Step::MasterKeyRetire => master.retire_all_but_current().map_err(failed)?,
    }
    Ok(pb::MasterKeyState {
        generations: master.generations(),
        current: master.current().0,
    })
}

impl Objects {
    fn all_nodes(&self) -> Vec<NodeId> {
        self.chunks.host.layout().live_nodes()
    }

    /// Runs a rotation step on `node`, this one included.
    async fn master_step(
        &self,
        node: NodeId,
        req: pb::MasterKeyStepRequest,
    ) -> Result<pb::MasterKeyState> {
        let host = &self.chunks.host;
        if node == host.id {
            return apply_master_step(&self.keys.master, &req);
        }
        let addr = host
            .addr_of(node)
            .ok_or_else(|| ShardError::Internal(format!("unknown node {node}")))?;
        let mut client = host.pool().client(addr)?;
        match tokio::time::timeout(Duration::from_secs(10), client.master_key_step(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(error_of(&s)),
            Err(_) => Err(ShardError::Unavailable(format!("node {node} timed out"))),
        }
    }

    /// Runs a step on every node, in order; the first failure stops it.
    async fn master_step_everywhere(
        &self,
        step: Step,
        generation: u32,
        key: &[u8],
    ) -> Result<Vec<pb::MasterKeyState>> {
        let mut states = Vec::new();
        for node in self.all_nodes() {
            let mut req = pb::MasterKeyStepRequest {
                step: 0,
                generation,
                key: key.to_vec().into(),
            };
            req.set_step(step);
            let state = self.master_step(node, req).await.map_err(|e| {
                ShardError::Unavailable(format!(
                    "node {node}: {e}; every node must be reachable to change the master key, and what was done so far is safe to redo"
                ))
            })?;
            states.push(state);
        }
        Ok(states)
    }

    /// Every tenant's record, from the meta shard.
    pub(crate) async fn tenant_records(&self) -> Result<Vec<(String, TenantRecord)>> {
        match self
            .chunks
            .host
            .query(ShardId::META, &Query::Tenants)
            .await?
        {
            Value::Tenants(t) => Ok(t),
            v => Err(ShardError::Internal(format!("unexpected reply {v:?}"))),
        }
    }

    /// DEKs wrapped under any master generation but `generation`.
    async fn stale_deks(&self, generation: u32) -> Result<Vec<(String, WrappedDek)>> {
        let mut stale = Vec::new();
        for (tenant, record) in self.tenant_records().await? {
            for dek in record.deks {
                if dek.master_generation().ok() != Some(generation) {
                    stale.push((tenant.clone(), dek));
                }
            }
        }
        Ok(stale)
    }

    /// Rotates the master key on every node; returns the new generation and
    /// how many DEKs were rewrapped.
    pub async fn rotate_master(&self) -> Result<(u32, u32)> {
        let states = self
            .master_step_everywhere(Step::MasterKeyState, 0, &[])
            .await?;
        let generation = states
            .iter()
            .flat_map(|s| s.generations.iter().copied())
            .max()
            .unwrap_or(0)
            + 1;
        let key = Key::random();
        self.master_step_everywhere(Step::MasterKeyAdd, generation, key.as_bytes())
            .await?;
        self.master_step_everywhere(Step::MasterKeyMakeCurrent, generation, &[])
            .await?;
        let mut rewrapped = 0;
        for _ in 0..REWRAP_ROUNDS {
            let stale = self.stale_deks(generation).await?;
            if stale.is_empty() {
                self.master_step_everywhere(Step::MasterKeyRetire, generation, &[])
                    .await?;
                tracing::info!(generation, rewrapped, "master key rotated");
                return Ok((generation, rewrapped));
            }
            for (tenant, old) in stale {
                let dek = unwrap_dek(&self.keys.master, &tenant, &old).map_err(|e| {
                    ShardError::Internal(format!("unwrapping a DEK of {tenant}: {e}"))
                })?;
                let new = wrap_dek(&self.keys.master, &tenant, old.generation, &dek);
                let cmd = Command::RewrapDek { tenant, old, new };
                self.chunks.host.propose(ShardId::META, &cmd).await?;
                rewrapped += 1;
            }
        }
        Err(ShardError::Unavailable(format!(
            "DEKs kept appearing under old master keys after {REWRAP_ROUNDS} rounds; old keys were kept, run the rotation again"
        )))
    }

    /// Tells every node to drop a tenant's unwrapped keys; a node that does
    /// not answer drops them within its cache's few seconds anyway.
    async fn forget_everywhere(&self, tenant: &str) {
        let host = &self.chunks.host;
        self.keys.forget(tenant);
        for node in self.all_nodes().into_iter().filter(|n| *n != host.id) {
            let Some(addr) = host.addr_of(node) else {
                continue;
            };
            if let Ok(mut client) = host.pool().client(addr) {
                let req = pb::TenantRequest {
                    tenant: tenant.to_string(),
                };
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), client.forget_tenant_keys(req))
                        .await;
            }
        }
    }

    /// Gives the tenant's new writes a new DEK; returns its generation.
    pub async fn rotate_tenant_key(&self, tenant: &str) -> Result<u32> {
        let record = self.tenant(tenant).await?;
        let generation = record.deks.last().map_or(1, |d| d.generation + 1);
        let cmd = Command::AddDek {
            tenant: tenant.to_string(),
            dek: wrap_dek(&self.keys.master, tenant, generation, &Key::random()),
        };
        self.chunks.host.propose(ShardId::META, &cmd).await?;
        self.forget_everywhere(tenant).await;
        Ok(generation)
    }

    /// Deletes a tenant and shreds its keys; returns its bucket count and
    /// the outcome of the master key rotation that completes the shredding.
    pub async fn delete_tenant(&self, tenant: &str) -> Result<(u32, Result<u32>)> {
        let cmd = Command::DeleteTenant {
            tenant: tenant.to_string(),
        };
        let buckets = match self.chunks.host.propose(ShardId::META, &cmd).await? {
            Value::Buckets(b) => b.len() as u32,
            v => return Err(ShardError::Internal(format!("unexpected reply {v:?}"))),
        };
        self.forget_everywhere(tenant).await;
        let shredded = self.rotate_master().await.map(|(g, _)| g);
        tokio::spawn(self.clone().collect_deleted());
        tracing::info!(tenant, buckets, "tenant deleted");
        Ok((buckets, shredded))
    }

    /// Removes the object indexes of deleted tenants, then their
    /// tombstones. Safe to run anywhere, any number of times at once.
    pub async fn collect_deleted(self) {
        let tombstones = match self
            .chunks
            .host
            .query(ShardId::META, &Query::Tombstones)
            .await
        {
            Ok(Value::Tombstones(t)) => t,
            _ => return,
        };
        for (tenant, buckets) in tombstones {
            let mut done = true;
            for bucket in &buckets {
                done &= self.purge_index(&tenant, bucket).await.is_ok();
            }
            if done {
                let cmd = Command::ForgetTenant {
                    tenant: tenant.clone(),
                };
                if self.chunks.host.propose(ShardId::META, &cmd).await.is_ok() {
                    tracing::info!(tenant, buckets = buckets.len(), "deleted tenant collected");
                }
            }
        }
    }

    async fn purge_index(&self, tenant: &str, bucket: &str) -> Result<()> {
        let shard = self.chunks.host.layout().shard_for_bucket(tenant, bucket);
        loop {
            let cmd = Command::PurgeIndex {
                tenant: tenant.to_string(),
                bucket: bucket.to_string(),
                max: PURGE_BATCH,
            };
            match self.chunks.host.propose(shard, &cmd).await? {
                Value::Exists(true) => continue,
                _ => return Ok(()),
            }
        }
    }
}
