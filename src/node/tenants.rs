//! Tenants and their access keys, kept in the meta shard. Every S3 call is
//! signed with one access key and so bound to exactly one tenant.

use super::objects::Objects;
use crate::crypto::tenant_keys::wrap_dek;
use crate::crypto::Key;
use crate::rpc::pb;
use crate::shard::command::{AccessKey, Quota, Usage};
use crate::shard::{Command, Query, ShardError, Value};
use crate::types::{now_ms, ShardId};
use rand::distributions::{Alphanumeric, DistString};

type Result<T> = std::result::Result<T, ShardError>;

/// A fresh access key id (`LK` and 18 letters or digits) and secret.
pub fn new_access_key() -> (String, String) {
    let mut rng = rand::thread_rng();
    let id = format!(
        "LK{}",
        Alphanumeric.sample_string(&mut rng, 18).to_uppercase()
    );
    (id, Alphanumeric.sample_string(&mut rng, 40))
}

/// Tenant names: 1 to 63 lowercase letters, digits and dashes.
pub fn check_tenant_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ShardError::InvalidArgument(format!(
            "tenant name {name:?} must be 1 to 63 lowercase letters, digits or dashes"
        )))
    }
}

impl Objects {
    /// Creates a tenant with a fresh DEK, wrapped under this node's current
    /// master key; the plain DEK never leaves this node's memory.
    pub async fn create_tenant(&self, tenant: &str, quota: Quota) -> Result<()> {
        check_tenant_name(tenant)?;
        let cmd = Command::CreateTenant {
            tenant: tenant.to_string(),
            created_ms: now_ms(),
            quota,
            dek: wrap_dek(&self.keys.master, tenant, 1, &Key::random()),
        };
        self.chunks
            .host
            .propose(ShardId::META, &cmd)
            .await
            .map(|_| ())
    }

    pub async fn set_quota(&self, tenant: &str, quota: Quota) -> Result<()> {
        let cmd = Command::SetQuota {
            tenant: tenant.to_string(),
            quota,
        };
        self.chunks.host.propose(ShardId::META, &cmd).await?;
        self.keys.forget(tenant);
        Ok(())
    }

    /// A tenant's quota against the sum of what its buckets hold.
    pub async fn show_tenant(&self, tenant: &str) -> Result<pb::TenantInfo> {
        let record = self.tenant(tenant).await?;
        let usage = self.usage_by_bucket(tenant).await?;
        let access_keys = self.list_access_keys(tenant).await?;
        Ok(pb::TenantInfo {
            name: tenant.to_string(),
            created_ms: record.created_ms,
            quota_bytes: record.quota.bytes,
            quota_objects: record.quota.objects,
            used_bytes: usage.iter().map(|(_, u)| u.bytes).sum(),
            garbage_bytes: usage.iter().map(|(_, u)| u.garbage).sum(),
            stored_bytes: usage.iter().map(|(_, u)| u.stored()).sum::<u64>()
                * self.chunks.host.layout().replication as u64,
            used_objects: usage.iter().map(|(_, u)| u.objects).sum(),
            buckets: usage.len() as u32,
            access_keys: access_keys.len() as u32,
            key_generation: record.deks.last().map_or(0, |d| d.generation),
        })
    }

    pub async fn list_tenants(&self) -> Result<Vec<(String, i64)>> {
        let records = self.tenant_records().await?;
        Ok(records
            .into_iter()
            .map(|(n, r)| (n, r.created_ms))
            .collect())
    }

    /// Creates a key for an existing tenant and returns `(id, secret)`.
    pub async fn create_access_key(&self, tenant: &str) -> Result<(String, String)> {
        if !self.list_tenants().await?.iter().any(|(t, _)| t == tenant) {
            return Err(ShardError::NoSuchTenant);
        }
        let (access_key, secret_key) = new_access_key();
        let cmd = Command::PutAccessKey {
            access_key: access_key.clone(),
            key: AccessKey {
                tenant: tenant.to_string(),
                secret_key: secret_key.clone(),
            },
        };
        self.chunks.host.propose(ShardId::META, &cmd).await?;
        Ok((access_key, secret_key))
    }

    pub async fn list_access_keys(&self, tenant: &str) -> Result<Vec<String>> {
        let q = Query::AccessKeys {
            tenant: tenant.to_string(),
        };
        match self.chunks.host.query(ShardId::META, &q).await? {
            Value::AccessKeys(k) => Ok(k),
            v => Err(ShardError::Internal(format!("unexpected reply {v:?}"))),
        }
    }

    pub async fn revoke_access_key(&self, access_key: &str) -> Result<()> {
        let cmd = Command::RevokeAccessKey {
            access_key: access_key.to_string(),
        };
        self.chunks
            .host
            .propose(ShardId::META, &cmd)
            .await
            .map(|_| ())
    }
}

impl Objects {
    /// What one bucket holds.
    pub async fn usage(&self, tenant: &str, bucket: &str) -> Result<Usage> {
        let q = Query::Usage {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
        };
        let shard = self.chunks.host.layout().shard_for_bucket(tenant, bucket);
        match self.chunks.host.query(shard, &q).await? {
            Value::Usage(u) => Ok(u),
            v => Err(ShardError::Internal(format!("unexpected reply {v:?}"))),
        }
    }

    /// What each of the tenant's buckets holds, asked of their index
    /// shards at once.
    pub async fn usage_by_bucket(&self, tenant: &str) -> Result<Vec<(String, Usage)>> {
        let buckets = self.list_buckets(tenant).await?;
        let asks = buckets.iter().map(|(b, _)| self.usage(tenant, b));
        let mut out = Vec::with_capacity(buckets.len());
        for ((bucket, _), usage) in buckets.iter().zip(futures::future::join_all(asks).await) {
            match usage {
                Ok(u) => out.push((bucket.clone(), u)),
                // Listed in the catalogue but its index is gone: a bucket
                // deletion between the two writes; it holds nothing.
                Err(ShardError::NoSuchBucket) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}
