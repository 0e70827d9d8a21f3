//! The embedded key store: one SQLite file (WAL mode) holding per-subject data keys and system
//! keys, each wrapped (AES-256-GCM) by a master key that never touches the file. Unwrapped keys
//! are cached in a bounded LRU.
//!
//! SQLite rather than a hand-rolled file: atomic multi-key commits, crash safety, and several
//! daemons on one host sharing the store (file locks; the first writer of a subject's key wins
//! and everyone reads that one). Daemons on several hosts need a networked store.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use ring::digest;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sluice_transforms::crypto::{generate_key, CryptoError, DataKey, Tokenizer, KEY_ID_LEN, KEY_LEN};
use sluice_transforms::keys::{KeyError, KeyProvider};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (id BLOB PRIMARY KEY, wrapped BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subject_keys (token TEXT PRIMARY KEY, key_id BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS system_keys (name TEXT PRIMARY KEY, key_id BLOB NOT NULL) WITHOUT ROWID;
";
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("key store {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("key store {0}: the master key does not match the one this store was created with")]
    WrongMasterKey(PathBuf),
    #[error("master key: {0}")]
    BadMasterKey(&'static str),
    #[error("key store: {0}")]
    Crypto(#[from] CryptoError),
}

/// The key-encryption key. Never written anywhere; read from a file or the environment.
pub struct MasterKey(DataKey);

impl MasterKey {
    /// Parses 32 bytes written as 64 hex characters (or 44 base64 characters is not accepted:
    /// one spelling, one place).
    pub fn from_hex(text: &str) -> Result<Self, KeyStoreError> {
        let bytes = hex::decode(text.trim()).map_err(|_| KeyStoreError::BadMasterKey("expected 64 hex characters"))?;
        let material: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| KeyStoreError::BadMasterKey("expected 32 bytes (64 hex characters)"))?;
        let fingerprint = digest::digest(
            &digest::SHA256,
            &[b"sluice:master-id:v1\0".as_slice(), &material].concat(),
        );
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&fingerprint.as_ref()[..KEY_ID_LEN]);
        Ok(Self(DataKey::new(id, &material)?))
    }

    fn wrap(&self, key_id: &[u8; KEY_ID_LEN], material: &[u8; KEY_LEN]) -> Result<Vec<u8>, CryptoError> {
        self.0.seal(material, &wrap_aad(key_id))
    }

    fn unwrap(&self, key_id: &[u8; KEY_ID_LEN], wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        let material = self.0.open(wrapped, &wrap_aad(key_id))?;
        DataKey::new(*key_id, &material)
    }
}

fn wrap_aad(key_id: &[u8; KEY_ID_LEN]) -> Vec<u8> {
    [b"sluice:keywrap:v1\0".as_slice(), key_id].concat()
}

pub struct KeyStore {
    path: PathBuf,
    db: Mutex<Connection>,
    master: MasterKey,
    cache: Mutex<LruCache<String, Arc<DataKey>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A key's id and its unwrapped bytes.
type KeyMaterial = ([u8; KEY_ID_LEN], [u8; KEY_LEN]);

/// Where a key is named: which table, and its key column.
#[derive(Clone, Copy)]
enum Names {
    Subjects,
    System,
}

impl Names {
    fn select(self) -> &'static str {
        match self {
            Names::Subjects => {
                "SELECT k.id, k.wrapped FROM subject_keys s JOIN keys k ON k.id = s.key_id WHERE s.token = ?1"
            }
            Names::System => {
                "SELECT k.id, k.wrapped FROM system_keys s JOIN keys k ON k.id = s.key_id WHERE s.name = ?1"
            }
        }
    }
    fn insert(self) -> &'static str {
        match self {
            Names::Subjects => "INSERT INTO subject_keys (token, key_id) VALUES (?1, ?2)",
            Names::System => "INSERT INTO system_keys (name, key_id) VALUES (?1, ?2)",
        }
    }
}

impl KeyStore {
    /// Opens (or creates) the store at `path`. `cache_capacity` bounds the unwrapped keys kept
    /// in memory.
    pub fn open(path: &Path, master: MasterKey, cache_capacity: usize) -> Result<Self, KeyStoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| store_err(path, e))?;
        }
        let db = Connection::open(path).map_err(|e| store_err(path, e))?;
        // Another daemon may hold the write lock for a moment: wait rather than fail.
        db.busy_timeout(Duration::from_secs(30))
            .map_err(|e| store_err(path, e))?;
        db.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| store_err(path, e))?;
        // FULL: a key is on disk before any ciphertext made with it can be committed.
        db.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| store_err(path, e))?;
        db.execute_batch(SCHEMA).map_err(|e| store_err(path, e))?;
        let store = Self {
            path: path.to_path_buf(),
            db: Mutex::new(db),
            master,
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(cache_capacity.max(1)).expect("max(1)"))),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        };
        // A store created under one master key must refuse another, instead of minting fresh
        // keys that would silently split the lake in two.
        match store.system_key("master-check") {
            Ok(_) => Ok(store),
            Err(KeyStoreError::Crypto(CryptoError::Authentication)) => {
                Err(KeyStoreError::WrongMasterKey(path.to_path_buf()))
            }
            Err(e) => Err(e),
        }
    }

    /// The HMAC key for tokens, created on first use.
    pub fn tokenizer(&self) -> Result<Tokenizer, KeyStoreError> {
        let key = self.resolve(Names::System, &["token"])?.remove(0);
        Ok(Tokenizer::new(&key.1))
    }

    /// A named system key (e.g. `quarantine`), created on first use.
    pub fn system_key(&self, name: &str) -> Result<Arc<DataKey>, KeyStoreError> {
        let (id, material) = self.resolve(Names::System, &[name])?.remove(0);
        Ok(Arc::new(DataKey::new(id, &material)?))
    }

    /// Any key by the id an envelope names (system or subject), for decryption by audited tools.
    pub fn key_by_id(&self, id: &[u8; KEY_ID_LEN]) -> Result<Option<DataKey>, KeyStoreError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let wrapped: Option<Vec<u8>> = db
            .query_row("SELECT wrapped FROM keys WHERE id = ?1", [id.as_slice()], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(match wrapped {
            Some(w) => Some(self.master.unwrap(id, &w)?),
            None => None,
        })
    }

    /// Number of subject keys held.
    pub fn subject_count(&self) -> Result<u64, KeyStoreError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let n: i64 = db
            .query_row("SELECT count(*) FROM subject_keys", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// (hits, misses) of the unwrapped-key cache.
    pub fn cache_stats(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    /// Reads the named keys, creating the missing ones, in one write transaction: of two
    /// daemons racing for a subject, the first commit wins and the other reads its key.
    fn resolve(&self, names: Names, wanted: &[&str]) -> Result<Vec<KeyMaterial>, KeyStoreError> {
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let tx = db
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(wanted.len());
        {
            let mut select = tx.prepare_cached(names.select()).map_err(|e| self.err(e))?;
            let mut insert_name = tx.prepare_cached(names.insert()).map_err(|e| self.err(e))?;
            let mut insert_key = tx
                .prepare_cached("INSERT INTO keys (id, wrapped) VALUES (?1, ?2)")
                .map_err(|e| self.err(e))?;
            for name in wanted {
                let existing: Option<(Vec<u8>, Vec<u8>)> = select
                    .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(|e| self.err(e))?;
                let key = match existing {
                    Some((id, wrapped)) => {
                        let id = key_id(&id).ok_or_else(|| self.err("malformed key id"))?;
                        let material = self.master.0.open(&wrapped, &wrap_aad(&id))?;
                        let material: [u8; KEY_LEN] = material.try_into().map_err(|_| CryptoError::KeyLength)?;
                        (id, material)
                    }
                    None => {
                        let (id, material) = generate_key()?;
                        insert_key
                            .execute(params![id.as_slice(), self.master.wrap(&id, &material)?])
                            .map_err(|e| self.err(e))?;
                        insert_name
                            .execute(params![name, id.as_slice()])
                            .map_err(|e| self.err(e))?;
                        (id, material)
                    }
                };
                out.push(key);
            }
        }
        // Durable before any ciphertext made with these keys can be committed.
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Resolves keys not in the cache.
    fn load_or_create(&self, tokens: &[&str]) -> Result<Vec<Arc<DataKey>>, KeyStoreError> {
        self.resolve(Names::Subjects, tokens)?
            .into_iter()
            .map(|(id, material)| Ok(Arc::new(DataKey::new(id, &material)?)))
            .collect()
    }

    fn err(&self, e: impl std::fmt::Display) -> KeyStoreError {
        store_err(&self.path, e)
    }
}

impl KeyProvider for KeyStore {
    fn subject_keys(&self, tokens: &[&str]) -> Result<Vec<Arc<DataKey>>, KeyError> {
        let mut out: Vec<Option<Arc<DataKey>>> = Vec::with_capacity(tokens.len());
        let mut missing: Vec<&str> = Vec::new();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for t in tokens {
                let hit = cache.get(*t).cloned();
                if hit.is_none() {
                    missing.push(t);
                }
                out.push(hit);
            }
        }
        self.hits
            .fetch_add((tokens.len() - missing.len()) as u64, Ordering::Relaxed);
        self.misses.fetch_add(missing.len() as u64, Ordering::Relaxed);
        if !missing.is_empty() {
            let loaded = self.load_or_create(&missing).map_err(|e| KeyError(e.to_string()))?;
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let mut loaded = loaded.into_iter();
            for (slot, t) in out.iter_mut().zip(tokens) {
                if slot.is_none() {
                    let key = loaded.next().expect("one loaded key per miss");
                    cache.put(t.to_string(), key.clone());
                    *slot = Some(key);
                }
            }
        }
        Ok(out.into_iter().map(|k| k.expect("filled")).collect())
    }
}

fn key_id(bytes: &[u8]) -> Option<[u8; KEY_ID_LEN]> {
    bytes.try_into().ok()
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> KeyStoreError {
    KeyStoreError::Store {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_transforms::crypto::{envelope_key_id, field_aad};

    const MASTER: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn keys_persist_are_per_subject_and_need_the_right_master() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let envelope;
        let token_a;
        {
            let store = KeyStore::open(&path, MasterKey::from_hex(MASTER).unwrap(), 2).unwrap();
            let keys = store.subject_keys(&["a", "b", "a"]).unwrap();
            assert_eq!(keys[0].id(), keys[2].id());
            assert_ne!(keys[0].id(), keys[1].id());
            envelope = keys[0].seal(b"secret", &field_aad("t", "c", "a")).unwrap();
            token_a = store.tokenizer().unwrap().domain("d").token("1");
            assert_eq!(store.subject_count().unwrap(), 2);
        }
        let store = KeyStore::open(&path, MasterKey::from_hex(MASTER).unwrap(), 2).unwrap();
        let again = store.subject_keys(&["a"]).unwrap();
        assert_eq!(again[0].open(&envelope, &field_aad("t", "c", "a")).unwrap(), b"secret");
        // The owner of the master key can open any envelope from its key id alone.
        let by_id = store.key_by_id(&envelope_key_id(&envelope).unwrap()).unwrap().unwrap();
        assert_eq!(by_id.open(&envelope, &field_aad("t", "c", "a")).unwrap(), b"secret");
        assert!(store.key_by_id(&[9; KEY_ID_LEN]).unwrap().is_none());
        assert_eq!(
            store.tokenizer().unwrap().domain("d").token("1"),
            token_a,
            "token key persists"
        );
        drop(store);
        let other = MASTER.replace("00", "ff");
        assert!(matches!(
            KeyStore::open(&path, MasterKey::from_hex(&other).unwrap(), 2),
            Err(KeyStoreError::WrongMasterKey(_))
        ));
        assert!(MasterKey::from_hex("abcd").is_err());
    }
}
