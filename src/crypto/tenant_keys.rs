//! A tenant's data-encryption keys: wrapped for storage in the meta shard,
//! unwrapped in a node's memory while it seals and opens that tenant's data.

use super::master::MasterKeys;
use super::{generation_of, open, seal, CryptoError, Key, Purpose};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One DEK generation as the meta shard stores it: sealed under a master
/// key, whose generation is in the sealed header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedDek {
    /// The DEK's generation; data sealed with it carries this number.
    pub generation: u32,
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

impl WrappedDek {
    /// The master key generation this DEK is wrapped under.
    pub fn master_generation(&self) -> Result<u32, CryptoError> {
        generation_of(&self.sealed)
    }
}

/// Binds a wrapped DEK to its tenant and generation.
fn wrap_context(tenant: &str, generation: u32) -> Vec<u8> {
    let mut c = tenant.as_bytes().to_vec();
    c.push(0);
    c.extend_from_slice(&generation.to_be_bytes());
    c
}

/// Seals `dek` under the node's current master key.
pub fn wrap_dek(master: &MasterKeys, tenant: &str, generation: u32, dek: &Key) -> WrappedDek {
    let (master_generation, master_key) = master.current();
    WrappedDek {
        generation,
        sealed: seal(
            &master_key,
            master_generation,
            Purpose::WrappedDek,
            &wrap_context(tenant, generation),
            dek.as_bytes(),
        ),
    }
}

pub fn unwrap_dek(master: &MasterKeys, tenant: &str, w: &WrappedDek) -> Result<Key, CryptoError> {
    let master_generation = w.master_generation()?;
    let master_key = master
        .get(master_generation)
        .ok_or(CryptoError::UnknownGeneration(master_generation))?;
    let bytes = zeroize::Zeroizing::new(open(
        &master_key,
        Purpose::WrappedDek,
        &wrap_context(tenant, w.generation),
        &w.sealed,
    )?);
    Key::from_bytes(&bytes).ok_or(CryptoError::Malformed("a DEK is 32 bytes"))
}

/// The unwrapped DEKs of one tenant: the newest seals, any opens.
pub struct TenantKeys {
    tenant: String,
    deks: BTreeMap<u32, Key>,
}

impl TenantKeys {
    /// Unwraps every generation; fails if any cannot be.
    pub fn unwrap_all(
        master: &MasterKeys,
        tenant: &str,
        wrapped: &[WrappedDek],
    ) -> Result<TenantKeys, CryptoError> {
        let mut deks = BTreeMap::new();
        for w in wrapped {
            deks.insert(w.generation, unwrap_dek(master, tenant, w)?);
        }
        if deks.is_empty() {
            return Err(CryptoError::Malformed("a tenant without a DEK"));
        }
        Ok(TenantKeys {
            tenant: tenant.to_string(),
            deks,
        })
    }

    /// True if data sealed under `generation` can be opened.
    pub fn holds(&self, generation: u32) -> bool {
        self.deks.contains_key(&generation)
    }

    /// The generation new data is sealed with.
    pub fn current_generation(&self) -> u32 {
        *self.deks.keys().next_back().expect("never empty")
    }

    pub fn seal(&self, purpose: Purpose, plaintext: &[u8]) -> Vec<u8> {
        let (generation, dek) = self.deks.iter().next_back().expect("never empty");
        seal(dek, *generation, purpose, self.tenant.as_bytes(), plaintext)
    }

    pub fn open(&self, purpose: Purpose, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let generation = generation_of(sealed)?;
        let dek = self
            .deks
            .get(&generation)
            .ok_or(CryptoError::UnknownGeneration(generation))?;
        open(dek, purpose, self.tenant.as_bytes(), sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(dir: &std::path::Path) -> MasterKeys {
        let path = dir.join("master.key");
        MasterKeys::create(&path, &Key::random()).unwrap();
        MasterKeys::load(&path).unwrap()
    }

    #[test]
    fn old_generations_keep_opening_after_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let master = keyring(dir.path());
        let first = wrap_dek(&master, "acme", 1, &Key::random());
        let keys = TenantKeys::unwrap_all(&master, "acme", std::slice::from_ref(&first)).unwrap();
        let old = keys.seal(Purpose::Chunk, b"old");

        let second = wrap_dek(&master, "acme", 2, &Key::random());
        let keys = TenantKeys::unwrap_all(&master, "acme", &[first, second]).unwrap();
        assert_eq!(keys.current_generation(), 2);
        let new = keys.seal(Purpose::Chunk, b"new");
        assert_eq!(generation_of(&new), Ok(2));
        assert_eq!(keys.open(Purpose::Chunk, &old).unwrap(), b"old");
        assert_eq!(keys.open(Purpose::Chunk, &new).unwrap(), b"new");
    }

    #[test]
    fn a_wrapped_dek_is_bound_to_its_tenant_and_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let master = keyring(dir.path());
        let w = wrap_dek(&master, "acme", 1, &Key::random());
        assert_eq!(
            unwrap_dek(&master, "globex", &w).unwrap_err(),
            CryptoError::Forged
        );
        let elsewhere = tempfile::tempdir().unwrap();
        assert_eq!(
            unwrap_dek(&keyring(elsewhere.path()), "acme", &w).unwrap_err(),
            CryptoError::Forged,
            "another cluster's master key of the same generation"
        );
        master.add(2, &Key::random()).unwrap();
        master.make_current(2).unwrap();
        master.retire_all_but_current().unwrap();
        assert_eq!(
            unwrap_dek(&master, "acme", &w).unwrap_err(),
            CryptoError::UnknownGeneration(1)
        );
    }
}
