//! `lumbung admin tenant …` and `key …`: tenants and access keys through
//! any reachable node.

use super::on_any_node;
use crate::config::AdminConfig;
use crate::rpc::pb;

/// A tenant's limits; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuotaSpec {
    pub bytes: Option<u64>,
    pub objects: Option<u64>,
}

fn spec(tenant: &str, quota: QuotaSpec) -> pb::TenantSpec {
    pb::TenantSpec {
        tenant: tenant.to_string(),
        quota_bytes: quota.bytes,
        quota_objects: quota.objects,
    }
}

pub async fn create_tenant(
    cfg: &AdminConfig,
    tenant: &str,
    quota: QuotaSpec,
) -> anyhow::Result<()> {
    let req = spec(tenant, quota);
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.create_tenant(req).await }
    })
    .await
    .map(|_| ())
}

pub async fn show_tenant(cfg: &AdminConfig, tenant: &str) -> anyhow::Result<pb::TenantInfo> {
    let req = pb::TenantRequest {
        tenant: tenant.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.show_tenant(req).await }
    })
    .await
}

pub async fn set_quota(cfg: &AdminConfig, tenant: &str, quota: QuotaSpec) -> anyhow::Result<()> {
    let req = spec(tenant, quota);
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.set_quota(req).await }
    })
    .await
    .map(|_| ())
}

pub async fn list_tenants(cfg: &AdminConfig) -> anyhow::Result<Vec<pb::TenantEntry>> {
    on_any_node(
        cfg,
        |mut c| async move { c.list_tenants(pb::Empty {}).await },
    )
    .await
    .map(|l| l.tenants)
}

pub async fn create_key(cfg: &AdminConfig, tenant: &str) -> anyhow::Result<pb::AccessKeyCreated> {
    let req = pb::TenantRequest {
        tenant: tenant.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.create_access_key(req).await }
    })
    .await
}

pub async fn list_keys(cfg: &AdminConfig, tenant: &str) -> anyhow::Result<Vec<String>> {
    let req = pb::TenantRequest {
        tenant: tenant.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.list_access_keys(req).await }
    })
    .await
    .map(|l| l.access_keys)
}

pub async fn revoke_key(cfg: &AdminConfig, access_key: &str) -> anyhow::Result<()> {
    let req = pb::AccessKeyRequest {
        access_key: access_key.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.revoke_access_key(req).await }
    })
    .await
    .map(|_| ())
}

pub async fn rotate_tenant_key(cfg: &AdminConfig, tenant: &str) -> anyhow::Result<pb::TenantInfo> {
    let req = pb::TenantRequest {
        tenant: tenant.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.rotate_tenant_key(req).await }
    })
    .await
}

pub async fn delete_tenant(cfg: &AdminConfig, tenant: &str) -> anyhow::Result<pb::TenantDeletion> {
    let req = pb::TenantRequest {
        tenant: tenant.to_string(),
    };
    on_any_node(cfg, |mut c| {
        let req = req.clone();
        async move { c.delete_tenant(req).await }
    })
    .await
}

pub async fn rotate_master_key(cfg: &AdminConfig) -> anyhow::Result<pb::MasterRotation> {
    on_any_node(cfg, |mut c| async move {
        c.rotate_master_key(pb::Empty {}).await
    })
    .await
}

/// A quota limit as typed: a count or size (`10GiB`, `500MB`, `1000`), or
/// `none` for no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitArg(pub Option<u64>);

impl std::str::FromStr for LimitArg {
    type Err = String;

    fn from_str(s: &str) -> Result<LimitArg, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("unlimited") {
            return Ok(LimitArg(None));
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a number, a size like 10GiB, or none"))?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown unit {other:?}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
                ))
            }
        };
        n.checked_mul(scale)
            .map(|v| LimitArg(Some(v)))
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

/// `tenant show --json`.
pub fn json_of(t: &pb::TenantInfo) -> serde_json::Value {
    serde_json::json!({
        "name": t.name,
        "created_ms": t.created_ms,
        "quota_bytes": t.quota_bytes,
        "quota_objects": t.quota_objects,
        "used_bytes": t.used_bytes,
        "garbage_bytes": t.garbage_bytes,
        "stored_bytes": t.stored_bytes,
        "used_objects": t.used_objects,
        "buckets": t.buckets,
        "access_keys": t.access_keys,
        "key_generation": t.key_generation,
    })
}

/// `tenant show`: the logical bytes against the quota, what overwrites and
/// deletes freed that is not collected yet (it counts toward the quota),
/// and about what it all takes on disk.
pub fn render(t: &pb::TenantInfo) -> String {
    let limit = |l: Option<u64>| l.map_or("unlimited".to_string(), |n| n.to_string());
    format!(
        "tenant          {}\n\
         bytes           {} of {}\n\
         awaiting gc     {} (counted toward the quota until collected)\n\
         stored          {} (with every replica and the garbage)\n\
         objects         {} of {}\n\
         buckets         {}\n\
         access keys     {}\n\
         key generation  {}\n",
        t.name,
        t.used_bytes,
        limit(t.quota_bytes),
        t.garbage_bytes,
        t.stored_bytes,
        t.used_objects,
        limit(t.quota_objects),
        t.buckets,
        t.access_keys,
        t.key_generation,
    )
}

#[cfg(test)]
mod tests {
    use super::LimitArg;

    #[test]
    fn limits_parse_as_sizes_counts_or_none() {
        let parse = |s: &str| s.parse::<LimitArg>().map(|l| l.0);
        assert_eq!(parse("10GiB"), Ok(Some(10 << 30)));
        assert_eq!(parse("500MB"), Ok(Some(500_000_000)));
        assert_eq!(parse("1000"), Ok(Some(1000)));
        assert_eq!(parse("none"), Ok(None));
        assert!(parse("-5").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("99999999999TiB").is_err());
    }
}
