//! The master keyring of one node: the keys that wrap tenants' DEKs.
//!
//! It is a small text file (mode 0600) that only this node reads, one key
//! per line, plus which generation wraps new DEKs:
//!
//! ```text
//! # Lumbung master keys. Secret: whoever holds this file and a disk reads the data.
//! key 1 <64 hex digits>
//! key 2 <64 hex digits>
//! current 2
//! ```
//!
//! Every change rewrites the whole file (temporary file, fsync, rename,
//! fsync of the folder), so a crash leaves either the old keyring or the
//! new one. Rotation (see `node::keys`) adds a key to every node, makes it
//! current everywhere, rewraps every DEK under it, and only then retires
//! the old keys, so at every step each node can unwrap every stored DEK.

use super::Key;
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// The parsed contents of a keyring file.
#[derive(Clone, Debug)]
struct Ring {
    keys: BTreeMap<u32, Key>,
    current: u32,
}

impl Ring {
    fn parse(text: &str) -> anyhow::Result<Ring> {
        let mut keys = BTreeMap::new();
        let mut current = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let parsed = match words.as_slice() {
                ["key", generation, hex_key] => generation.parse::<u32>().ok().and_then(|g| {
                    let key = Key::from_bytes(&hex::decode(hex_key).ok()?)?;
                    keys.insert(g, key);
                    Some(())
                }),
                ["current", generation] => generation.parse().ok().map(|g| current = Some(g)),
                _ => None,
            };
            if parsed.is_none() {
                bail!("line {}: expected `key N <64 hex>` or `current N`", n + 1);
            }
        }
        let current = current.context("no `current` line")?;
        if !keys.contains_key(&current) {
            bail!("the current generation {current} has no key");
        }
        Ok(Ring { keys, current })
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "# Lumbung master keys. Secret: whoever holds this file and a disk reads the data.\n",
        );
        for (g, k) in &self.keys {
            out.push_str(&format!("key {g} {}\n", hex::encode(k.as_bytes())));
        }
        out.push_str(&format!("current {}\n", self.current));
        out
    }
}

/// A node's master keys, as loaded from and saved to its key file.
pub struct MasterKeys {
    path: PathBuf,
    ring: RwLock<Ring>,
}

impl MasterKeys {
    /// Writes a new key file holding `key` as generation 1; refuses to
    /// replace an existing file.
    pub fn create(path: &Path, key: &Key) -> anyhow::Result<()> {
        if path.exists() {
            bail!("{} already exists", path.display());
        }
        let ring = Ring {
            keys: BTreeMap::from([(1, key.clone())]),
            current: 1,
        };
        write_secret(path, &ring.render())
    }

    pub fn load(path: &Path) -> anyhow::Result<MasterKeys> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the master key file {}", path.display()))?;
        let ring = Ring::parse(&text).with_context(|| format!("in {}", path.display()))?;
        Ok(MasterKeys {
            path: path.to_path_buf(),
            ring: RwLock::new(ring),
        })
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The generation and key that wrap new DEKs.
    pub fn current(&self) -> (u32, Key) {
        let ring = self.ring();
        (ring.current, ring.keys[&ring.current].clone())
    }

    pub fn get(&self, generation: u32) -> Option<Key> {
        self.ring().keys.get(&generation).cloned()
    }

    /// Generations held, oldest first.
    pub fn generations(&self) -> Vec<u32> {
        self.ring().keys.keys().copied().collect()
    }

    /// Applies `change` to a copy of the ring, saves it, then swaps it in;
    /// a failed save changes nothing.
    fn update(&self, change: impl FnOnce(&mut Ring) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
        let mut next = ring.clone();
        change(&mut next)?;
        write_secret(&self.path, &next.render())?;
        *ring = next;
        Ok(())
    }

    /// Adds a key (not yet current). Adding the same key again is a no-op;
    /// a different key under a held generation is refused.
    pub fn add(&self, generation: u32, key: &Key) -> anyhow::Result<()> {
        if let Some(held) = self.get(generation) {
            if held.as_bytes() == key.as_bytes() {
                return Ok(());
            }
            bail!("master key generation {generation} already holds a different key");
        }
        self.update(|r| {
            r.keys.insert(generation, key.clone());
            Ok(())
        })
    }

    /// Makes a held generation the one that wraps new DEKs.
    pub fn make_current(&self, generation: u32) -> anyhow::Result<()> {
        if self.ring().current == generation {
            return Ok(());
        }
        self.update(|r| {
            if !r.keys.contains_key(&generation) {
                bail!("master key generation {generation} is not held here");
            }
            r.current = generation;
            Ok(())
        })
    }

    /// Destroys every key but the current one.
    pub fn retire_all_but_current(&self) -> anyhow::Result<()> {
        if self.ring().keys.len() == 1 {
            return Ok(());
        }
        self.update(|r| {
            let current = r.current;
            r.keys.retain(|g, _| *g == current);
            Ok(())
        })
    }
}

/// Replaces `path` atomically with `text`, readable by its owner only.
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn rotation_steps_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let first = Key::random();
        MasterKeys::create(&path, &first).unwrap();
        assert!(MasterKeys::create(&path, &first).is_err(), "never replaced");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let keys = MasterKeys::load(&path).unwrap();
        let second = Key::random();
        keys.add(2, &second).unwrap();
        keys.add(2, &second).unwrap();
        assert!(keys.add(2, &first).is_err());
        assert_eq!(keys.current().0, 1, "adding does not switch");
        keys.make_current(2).unwrap();
        assert!(keys.make_current(3).is_err());

        let reloaded = MasterKeys::load(&path).unwrap();
        assert_eq!(reloaded.generations(), vec![1, 2]);
        assert_eq!(reloaded.current().1.as_bytes(), second.as_bytes());
        reloaded.retire_all_but_current().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex::encode(first.as_bytes())));
        assert_eq!(MasterKeys::load(&path).unwrap().generations(), vec![2]);
    }

    #[test]
    fn damaged_files_are_refused() {
        for text in [
            "key 1 abcd\ncurrent 1\n",
            &format!("key 1 {}\n", "00".repeat(32)),
            &format!("key 1 {}\ncurrent 2\n", "00".repeat(32)),
        ] {
            assert!(Ring::parse(text).is_err(), "{text}");
        }
    }
}
