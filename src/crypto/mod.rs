//! Encryption at rest: what a stolen disk reveals, and what deleting a
//! tenant destroys.
//!
//! Two levels of keys. Each tenant has data-encryption keys (DEKs), random
//! 256-bit keys numbered by generation; `tenant rotate-key` adds a
//! generation, and old ones stay for reading what they wrote. A DEK is
//! stored only *wrapped*: sealed under the cluster master key, which nodes
//! read from a key file of their own ([`master`]). Gateways never hold
//! either kind of key; they see plaintext only in flight, over TLS.
//!
//! Everything a tenant stores is sealed on the node that receives it from
//! the gateway, before it reaches a disk or another node: chunk contents,
//! inline bodies, and object metadata (content type and `x-amz-meta-*`).
//! Chunk ids are the BLAKE3 hash of the sealed bytes, so every replica can
//! verify a chunk without any key. Names (buckets, object keys) stay in
//! the clear: listings must sort them.
//!
//! **Sealing.** AES-256-GCM (ring, hardware-accelerated). Nonce reuse under
//! one key is what breaks GCM, so no key ever seals twice: every sealed
//! value draws a fresh random 256-bit salt, and its key is
//! `BLAKE3-keyed(DEK, "lumbung seal v1" ‖ salt)`, used once with an all-zero
//! nonce. A repeated key would need two equal salts, a 2⁻²⁵⁶ event per pair.
//! The associated data binds each value to its tenant and its purpose, so
//! a sealed value cannot be replayed as another tenant's or as another kind
//! of data.
//!
//! ```text
//! sealed = u8 version (1) | u32 BE key generation | 32-byte salt | ciphertext | 16-byte tag
//! ```
//!
//! **Crypto-shredding** ([`master`]): deleting a tenant removes its wrapped
//! DEKs from the meta shard and then rotates the master key, destroying the
//! old one on every node. Copies of the wrapped DEKs that outlive the
//! deletion (old log segments, sled's superseded pages, snapshot files)
//! were sealed under a key that no longer exists.

pub mod master;
pub mod tenant_keys;

use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

/// A 256-bit secret key, wiped from memory when dropped.
#[derive(Clone)]
pub struct Key(Zeroizing<[u8; 32]>);

impl Key {
    pub fn random() -> Key {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut k[..]);
        Key(k)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Key> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Key(Zeroizing::new(arr)))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// What a sealed value is; part of its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A chunk of object content.
    Chunk,
    /// A body stored inside its manifest.
    Inline,
    /// An object's or upload's content type and user metadata.
    Metadata,
    /// A tenant's DEK, sealed under the master key.
    WrappedDek,
}

impl Purpose {
    fn tag(self) -> u8 {
        match self {
            Purpose::Chunk => b'c',
            Purpose::Inline => b'i',
            Purpose::Metadata => b'm',
            Purpose::WrappedDek => b'w',
        }
    }
}

const VERSION: u8 = 1;
const SALT_LEN: usize = 32;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + 4 + SALT_LEN;
/// Bytes a sealed value has beyond its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("sealed value is malformed ({0})")]
    Malformed(&'static str),
    #[error("sealed value does not authenticate: wrong key, tenant or purpose, or damaged")]
    Forged,
    #[error("no key of generation {0} is known")]
    UnknownGeneration(u32),
}

/// The one-time key for a salt.
fn value_key(key: &Key, salt: &[u8]) -> LessSafeKey {
    let derived = Zeroizing::new(
        *blake3::Hasher::new_keyed(key.as_bytes())
            .update(b"lumbung seal v1")
            .update(salt)
            .finalize()
            .as_bytes(),
    );
    let unbound = UnboundKey::new(&AES_256_GCM, &derived[..]).expect("32 bytes is an AES-256 key");
    LessSafeKey::new(unbound)
}

fn aad(purpose: Purpose, context: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(context.len() + 1);
    a.push(purpose.tag());
    a.extend_from_slice(context);
    a
}

/// Seals `plaintext` under `key` (of `generation`), bound to `purpose` and
/// `context` (the tenant name, for tenant data).
pub fn seal(
    key: &Key,
    generation: u32,
    purpose: Purpose,
    context: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
    out.push(VERSION);
    out.extend_from_slice(&generation.to_be_bytes());
    let mut salt = [0u8; SALT_LEN];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    out.extend_from_slice(&salt);
    out.extend_from_slice(plaintext);
    let tag = value_key(key, &salt)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(aad(purpose, context)),
            &mut out[HEADER_LEN..],
        )
        .expect("sealing fails only past GCM's 64 GiB message limit");
    out.extend_from_slice(tag.as_ref());
    out
}

/// The key generation a sealed value needs, read without opening it.
pub fn generation_of(sealed: &[u8]) -> Result<u32, CryptoError> {
    if sealed.len() < OVERHEAD {
        return Err(CryptoError::Malformed("too short"));
    }
    if sealed[0] != VERSION {
        return Err(CryptoError::Malformed("unknown version"));
    }
    Ok(u32::from_be_bytes(
        sealed[1..5].try_into().expect("4 bytes"),
    ))
}

/// Opens a value sealed by [`seal`] with the same key, purpose and context.
pub fn open(
    key: &Key,
    purpose: Purpose,
    context: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    generation_of(sealed)?;
    let salt = &sealed[5..HEADER_LEN];
    let mut buf = sealed[HEADER_LEN..].to_vec();
    let plain_len = value_key(key, salt)
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(aad(purpose, context)),
            &mut buf,
        )
        .map_err(|_| CryptoError::Forged)?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_purpose_and_tenant() {
        let key = Key::random();
        let sealed = seal(&key, 7, Purpose::Chunk, b"acme", b"ledger 2026");
        assert_eq!(sealed.len(), 11 + OVERHEAD);
        assert_eq!(generation_of(&sealed), Ok(7));
        assert_eq!(
            open(&key, Purpose::Chunk, b"acme", &sealed).unwrap(),
            b"ledger 2026"
        );
        let other = Key::random();
        assert_eq!(
            open(&other, Purpose::Chunk, b"acme", &sealed),
            Err(CryptoError::Forged)
        );
        assert_eq!(
            open(&key, Purpose::Chunk, b"globex", &sealed),
            Err(CryptoError::Forged)
        );
        assert_eq!(
            open(&key, Purpose::Inline, b"acme", &sealed),
            Err(CryptoError::Forged)
        );
        let mut flipped = sealed.clone();
        flipped[HEADER_LEN] ^= 1;
        assert_eq!(
            open(&key, Purpose::Chunk, b"acme", &flipped),
            Err(CryptoError::Forged)
        );
    }

    #[test]
    fn sealing_the_same_bytes_twice_gives_unrelated_ciphertexts() {
        let key = Key::random();
        let a = seal(&key, 1, Purpose::Chunk, b"t", &[0u8; 64]);
        let b = seal(&key, 1, Purpose::Chunk, b"t", &[0u8; 64]);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
    }

    #[test]
    fn truncated_values_are_refused() {
        assert!(matches!(
            generation_of(&[1, 0, 0]),
            Err(CryptoError::Malformed(_))
        ));
        let key = Key::random();
        assert!(open(&key, Purpose::Chunk, b"t", &[9; OVERHEAD]).is_err());
    }
}
