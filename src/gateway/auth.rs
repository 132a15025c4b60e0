//! SigV4 secrets for s3s, looked up in the meta shard and cached briefly,
//! so a revoked key stops working within seconds on every gateway.

use super::router::NodeRouter;
use crate::rpc::pb;
use s3s::{s3_error, S3Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a looked-up key is trusted without asking again.
const KEY_TTL: Duration = Duration::from_secs(5);

/// The tenant and secret of one access key.
#[derive(Clone)]
pub struct KeyInfo {
    pub tenant: String,
    pub secret: String,
}

pub struct KeyCache {
    router: Arc<NodeRouter>,
    keys: Mutex<HashMap<String, (KeyInfo, Instant)>>,
}

impl KeyCache {
    pub fn new(router: Arc<NodeRouter>) -> KeyCache {
        KeyCache {
            router,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// The key's tenant and secret, or `InvalidAccessKeyId`.
    pub async fn lookup(&self, access_key: &str) -> S3Result<KeyInfo> {
        if let Some((info, at)) = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(access_key)
        {
            if at.elapsed() < KEY_TTL {
                return Ok(info.clone());
            }
        }
        let mut last_err = None;
        for _ in 0..self.router.len().max(2) {
            let (i, mut client) = self.router.pick();
            let req = pb::AccessKeyRequest {
                access_key: access_key.to_string(),
            };
            match client.lookup_access_key(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let info = KeyInfo {
                        tenant: r.tenant,
                        secret: r.secret_key,
                    };
                    self.keys
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(access_key.to_string(), (info.clone(), Instant::now()));
                    return Ok(info);
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(s3_error!(
                        InvalidAccessKeyId,
                        "The AWS access key Id you provided does not exist in our records."
                    ))
                }
                Err(s) => {
                    self.router.report_failure(i);
                    last_err = Some(s)
                }
            }
        }
        // Transient: 503 SlowDown, which clients retry.
        Err(s3_error!(
            SlowDown,
            "could not look up the access key: {}",
            last_err
                .map(|s| s.message().to_string())
                .unwrap_or_default()
        ))
    }
}
