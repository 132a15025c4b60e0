//! Tenants and their access keys, kept in the meta shard. Every S3 call is
//! signed with one access key and so bound to exactly one tenant.

use super::objects::Objects;
use crate::shard::command::AccessKey;
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
    pub async fn create_tenant(&self, tenant: &str) -> Result<()> {
        check_tenant_name(tenant)?;
        let cmd = Command::CreateTenant {
            tenant: tenant.to_string(),
            created_ms: now_ms(),
        };
        self.chunks
            .host
            .propose(ShardId::META, &cmd)
            .await
            .map(|_| ())
    }

    pub async fn list_tenants(&self) -> Result<Vec<(String, i64)>> {
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
