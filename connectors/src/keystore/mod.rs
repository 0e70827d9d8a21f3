//! The key store: per-subject data keys and system keys, each wrapped (AES-256-GCM) by a master
//! key that never touches the store; tombstones of erased subjects; the state of erasure jobs.
//! Unwrapped keys are cached in a bounded LRU.
//!
//! Two backends with one schema: an embedded SQLite file (several daemons on one host share it)
//! and PostgreSQL (daemons on several hosts, backed up and replicated like any database). Both
//! commit a batch of new keys, and an erasure's key destruction with its tombstones, in one
//! transaction.

mod postgres;
mod sqlite;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use ring::digest;
use sluice_transforms::crypto::{generate_keys, CryptoError, DataKey, Tokenizer, KEY_ID_LEN, KEY_LEN};
use sluice_transforms::keys::{KeyError, KeyProvider, ERASED_FOR_GOOD};

pub use self::postgres::PgKeyStoreSettings;

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("key store {location}: {message}")]
    Store { location: String, message: String },
    #[error("key store {0}: the master key does not match the one this store was created with")]
    WrongMasterKey(String),
    #[error("master key: {0}")]
    BadMasterKey(&'static str),
    #[error("key store: {0}")]
    Crypto(#[from] CryptoError),
}

/// What a key-store backend reports: its database's error, or a state it refuses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", crate::postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error("{action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("schema `{0}`: use lower-case letters, digits and _")]
    SchemaName(String),
    #[error("{0}")]
    Refused(&'static str),
}

/// Where the keys live.
#[derive(Debug, Clone)]
pub enum KeyStoreLocation {
    Sqlite(PathBuf),
    Postgres(PgKeyStoreSettings),
}

impl std::fmt::Display for KeyStoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyStoreLocation::Sqlite(path) => write!(f, "{}", path.display()),
            KeyStoreLocation::Postgres(s) => write!(
                f,
                "postgres://{}@{}:{}/{} (schema {})",
                s.user, s.host, s.port, s.database, s.schema
            ),
        }
    }
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

    fn wrap(
        &self,
        key_id: &[u8; KEY_ID_LEN],
        material: &[u8; KEY_LEN],
        owner: Owner<'_>,
    ) -> Result<Vec<u8>, CryptoError> {
        self.0.seal(material, &wrap_aad(key_id, owner))
    }

    fn unwrap_material(&self, key_id: &[u8], wrapped: &[u8], owner: Owner<'_>) -> Result<KeyMaterial, KeyStoreError> {
        let id: [u8; KEY_ID_LEN] = key_id.try_into().map_err(|_| CryptoError::KeyLength)?;
        let material = self.0.open(wrapped, &wrap_aad(&id, owner))?;
        let material: [u8; KEY_LEN] = material.try_into().map_err(|_| CryptoError::KeyLength)?;
        Ok((id, material))
    }

    /// Fresh keys for `owners` (one RNG read for all) and their wrapped forms, for a backend
    /// to store.
    fn mint(&self, names: Names, owners: &[&str]) -> Result<Vec<(KeyMaterial, Vec<u8>)>, KeyStoreError> {
        generate_keys(owners.len())?
            .into_iter()
            .zip(owners)
            .map(|((id, material), owner)| Ok(((id, material), self.wrap(&id, &material, (names, owner))?)))
            .collect()
    }
}

/// Whose a key is: a subject (by token) or a system name (`token`, `quarantine`, …).
type Owner<'a> = (Names, &'a str);

/// What a wrapped key is bound to: its id, and whose it is and for what. Someone who can write
/// the store but has no master key cannot swap two subjects' keys, or point the token key (or
/// any system key) at a subject's: the swapped key does not unwrap under its new owner.
fn wrap_aad(key_id: &[u8; KEY_ID_LEN], (names, owner): Owner<'_>) -> Vec<u8> {
    let purpose: &[u8] = match names {
        Names::Subjects => b"subject\0",
        Names::System => b"system\0",
    };
    [b"sluice:keywrap:v2\0".as_slice(), key_id, purpose, owner.as_bytes()].concat()
}

/// Before v2 a wrap bound the key id only: read once, to rewrap (see [`KeyStore::open`]).
fn legacy_wrap_aad(key_id: &[u8; KEY_ID_LEN]) -> Vec<u8> {
    [b"sluice:keywrap:v1\0".as_slice(), key_id].concat()
}

/// Marks a store whose keys are all wrapped bound to their owners (a system name: no key).
const REWRAPPED_MARKER: &str = "keywrap-v2";

/// A key's id and its unwrapped bytes.
type KeyMaterial = sluice_transforms::crypto::KeyParts;

/// Which name table a key is looked up in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Names {
    Subjects,
    System,
}

/// The release time of a shredded subject's tombstone: every event of theirs, whatever its
/// time, is kept (under a new key). Daemons read it only to drop the key from their caches.
pub(crate) const SHREDDED_RELEASE_MS: i64 = i64::MIN;

/// What an erasure job destroyed in the key store (the same on a rerun).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeysDestroyed {
    /// Subject data keys the job deleted.
    pub keys: u64,
    /// Tombstones the job wrote (a subject erased by an earlier job keeps that job's).
    pub tombstones: u64,
}

enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(Box<postgres::PgStore>),
}

/// Dispatches one call to the backend in use.
macro_rules! backend {
    ($self:expr, $db:ident => $call:expr) => {{
        let mut guard = $self.db.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *guard {
            Backend::Sqlite($db) => $call,
            Backend::Postgres($db) => $call,
        }
    }};
}

/// Tombstones known to this process, refreshed at most every `refresh`.
struct ErasedSet {
    /// Per erased subject, the event time its events are dropped before ([`ERASED_FOR_GOOD`],
    /// or when it was released for reuse).
    tokens: HashMap<String, i64>,
    last_seq: i64,
    refreshed: Option<Instant>,
}

/// What one cached key costs in memory (the token, the key's id and bytes, the LRU's links and
/// hash slot), measured with `keystore::tests::the_key_cache_costs_what_its_budget_assumes`.
pub(crate) const CACHE_ENTRY_BYTES: usize = 144;

pub struct KeyStore {
    location: String,
    db: Mutex<Backend>,
    /// The embedded backend's durability step, apart from `db` so that it never holds up
    /// key look-ups.
    checkpointer: Option<Mutex<sqlite::Checkpointer>>,
    master: MasterKey,
    /// Unwrapped keys by subject token: the bytes, not a key schedule (a quarter of the memory).
    cache: Mutex<LruCache<String, KeyMaterial>>,
    erased: Mutex<ErasedSet>,
    refresh: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// How long a running daemon may keep using a key after an erasure destroyed it, and go on
/// accepting the erased subject's events from its cache: the tombstones are re-read this often.
pub const DEFAULT_ERASURE_REFRESH: Duration = Duration::from_secs(10);

impl KeyStore {
    /// Opens (or creates) the store. `memory_bytes` bounds what it keeps in memory: three
    /// quarters for unwrapped keys ([`CACHE_ENTRY_BYTES`] each), a quarter for the embedded
    /// backend's page cache (the B-tree pages above the leaves, so a look-up reads one page).
    pub fn open(location: &KeyStoreLocation, master: MasterKey, memory_bytes: usize) -> Result<Self, KeyStoreError> {
        let name = location.to_string();
        let page_cache = memory_bytes / 4;
        let cache_capacity = (memory_bytes - page_cache) / CACHE_ENTRY_BYTES;
        let mut checkpointer = None;
        let backend = match location {
            KeyStoreLocation::Sqlite(path) => {
                let store = sqlite::SqliteStore::open(path, page_cache).map_err(|m| store_err(&name, m))?;
                checkpointer = Some(Mutex::new(
                    sqlite::Checkpointer::open(path).map_err(|m| store_err(&name, m))?,
                ));
                Backend::Sqlite(store)
            }
            KeyStoreLocation::Postgres(s) => {
                Backend::Postgres(Box::new(postgres::PgStore::open(s).map_err(|m| store_err(&name, m))?))
            }
        };
        let store = Self {
            location: name,
            db: Mutex::new(backend),
            checkpointer,
            master,
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(cache_capacity.max(1)).expect("max(1)"))),
            erased: Mutex::new(ErasedSet {
                tokens: HashMap::new(),
                last_seq: 0,
                refreshed: None,
            }),
            refresh: DEFAULT_ERASURE_REFRESH,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        };
        // A store created under one master key must refuse another, instead of minting fresh
        // keys that would silently split the lake in two.
        store.rewrap_legacy()?;
        match store.system_key("master-check") {
            // System keys made just now are durable before anything uses them.
            Ok(_) => store.sync().map(|()| store),
            Err(KeyStoreError::Crypto(CryptoError::Authentication)) => {
                Err(KeyStoreError::WrongMasterKey(store.location.clone()))
            }
            Err(e) => Err(e),
        }
    }

    /// Keys wrapped by an older sluice bound their id only: rewrapped once, bound to their
    /// owners, page by page; then the store is marked and no legacy wrap is accepted again (a
    /// backup's legacy copy cannot be slipped back in). Idempotent: two daemons opening at
    /// once, or one killed halfway, rewrap what is left.
    fn rewrap_legacy(&self) -> Result<(), KeyStoreError> {
        if backend!(self, db => db.has_system_name(REWRAPPED_MARKER)).map_err(|m| self.err(m))? {
            return Ok(());
        }
        let mut after: Vec<u8> = Vec::new();
        let (mut rewrapped, mut foreign) = (0u64, 0u64);
        loop {
            let page = backend!(self, db => db.wrapped_page(&after, 10_000)).map_err(|m| self.err(m))?;
            let Some(last) = page.last() else { break };
            after = last.id.clone();
            for key in &page {
                let Some(owner) = key.owner() else { continue };
                let id: [u8; KEY_ID_LEN] = key.id.as_slice().try_into().map_err(|_| CryptoError::KeyLength)?;
                if self.master.0.open(&key.wrapped, &wrap_aad(&id, owner)).is_ok() {
                    continue;
                }
                let material = match self.master.0.open(&key.wrapped, &legacy_wrap_aad(&id)) {
                    Ok(m) => m,
                    // Another master key's (`open` reports it as such just after), or tampered.
                    Err(CryptoError::Authentication) => {
                        foreign += 1;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let material: [u8; KEY_LEN] = material.try_into().map_err(|_| CryptoError::KeyLength)?;
                let wrapped = self.master.wrap(&id, &material, owner)?;
                backend!(self, db => db.replace_wrapped(&id, &key.wrapped, &wrapped)).map_err(|m| self.err(m))?;
                rewrapped += 1;
            }
        }
        if rewrapped > 0 {
            tracing::info!(
                keys = rewrapped,
                "rewrapped keys of an older sluice, bound to their owners"
            );
        }
        if foreign == 0 {
            self.resolve(Names::System, &[REWRAPPED_MARKER])?;
        }
        Ok(())
    }

    /// How often tombstones are re-read (the bound on a cached key outliving its erasure).
    pub fn with_erasure_refresh(mut self, refresh: Duration) -> Self {
        self.refresh = refresh;
        self
    }

    /// The HMAC key for tokens, created on first use.
    pub fn tokenizer(&self) -> Result<Tokenizer, KeyStoreError> {
        let key = self
            .resolve(Names::System, &["token"])?
            .remove(0)
            .expect("system keys are never erased");
        Ok(Tokenizer::new(&key.1))
    }

    /// A named system key (e.g. `quarantine`), created on first use.
    pub fn system_key(&self, name: &str) -> Result<Arc<DataKey>, KeyStoreError> {
        let (id, material) = self
            .resolve(Names::System, &[name])?
            .remove(0)
            .expect("system keys are never erased");
        Ok(Arc::new(DataKey::new(id, &material)?))
    }

    /// Any key by the id an envelope names (system or subject), for decryption by audited tools.
    pub fn key_by_id(&self, id: &[u8; KEY_ID_LEN]) -> Result<Option<DataKey>, KeyStoreError> {
        let stored = backend!(self, db => db.wrapped_by_id(id.as_slice())).map_err(|m| self.err(m))?;
        match stored.as_ref().and_then(|k| k.owner().map(|owner| (k, owner))) {
            Some((k, owner)) => {
                let (id, material) = self.master.unwrap_material(id, &k.wrapped, owner)?;
                Ok(Some(DataKey::new(id, &material)?))
            }
            None => Ok(None),
        }
    }

    /// Number of subject keys held.
    pub fn subject_count(&self) -> Result<u64, KeyStoreError> {
        backend!(self, db => db.subject_count()).map_err(|m| self.err(m))
    }

    /// The subjects among `tokens` that hold a key now.
    pub fn subjects_with_keys(&self, tokens: &[String]) -> Result<Vec<String>, KeyStoreError> {
        backend!(self, db => db.subjects_with_keys(tokens)).map_err(|m| self.err(m))
    }

    /// Releases an erased subject's id for reuse (a recycled account number, a person who
    /// registers again): events with a source time from `after_ms` on are theirs again and get
    /// a new key; earlier ones (the erased person's, on a replay) are still dropped. `false`
    /// when the subject has no erasure in force. Daemons see it at their next tombstone refresh.
    pub fn release_subject(&self, token: &str, after_ms: i64) -> Result<bool, KeyStoreError> {
        let released = backend!(self, db => db.release(token, after_ms)).map_err(|m| self.err(m))?;
        self.sync()?;
        Ok(released)
    }

    /// How many erased subjects (tombstones) this process has read.
    pub fn erased_known(&self) -> usize {
        self.erased.lock().unwrap_or_else(|p| p.into_inner()).tokens.len()
    }

    /// (hits, misses) of the unwrapped-key cache.
    pub fn cache_stats(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    /// Crypto-shredding: in one transaction, deletes the subjects' data keys and records their
    /// tombstones (token, job, time — never the raw id), then makes the deleted bytes
    /// unrecoverable from the store's own files where the backend allows (SQLite: secure
    /// delete and a truncating WAL checkpoint; PostgreSQL: VACUUM of the key tables).
    pub fn erase_subjects(&self, job_id: &str, tokens: &[String], now_ms: i64) -> Result<KeysDestroyed, KeyStoreError> {
        self.destroy(job_id, tokens, now_ms)
    }

    /// Crypto-shredding without erasure (retention: nothing of the subjects is left): the keys
    /// are deleted and, in the same transaction, tombstones written that release the id at
    /// once — daemons evict the keys from their caches at their next refresh, and any later
    /// event of the subject, whatever its time, gets a new key.
    /// Subjects with a tombstone already (erased, released after an erasure, or shredded by this
    /// job before it was interrupted) are left as they are: a release's cut-off stays.
    pub fn shred_keys(&self, job_id: &str, tokens: &[String], now_ms: i64) -> Result<KeysDestroyed, KeyStoreError> {
        let destroyed = backend!(self, db => db.shred(job_id, tokens, now_ms)).map_err(|m| self.err(m))?;
        self.forget_cached(tokens)?;
        Ok(destroyed)
    }

    fn destroy(&self, job_id: &str, tokens: &[String], now_ms: i64) -> Result<KeysDestroyed, KeyStoreError> {
        let destroyed = backend!(self, db => db.erase(job_id, tokens, now_ms)).map_err(|m| self.err(m))?;
        self.forget_cached(tokens)?;
        Ok(destroyed)
    }

    /// After keys were destroyed: none stays in this process's cache, and the store's files
    /// keep no copy where the backend allows.
    fn forget_cached(&self, tokens: &[String]) -> Result<(), KeyStoreError> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for t in tokens {
                cache.pop(t);
            }
        }
        backend!(self, db => db.purge_deleted()).map_err(|m| self.err(m))
    }

    /// Makes every key created so far durable (by this process or another sharing the store).
    /// Called before a lake commit whose ciphertext needs them: one sync per commit, where a
    /// sync per key transaction would cost one per chunk of events.
    pub fn sync(&self) -> Result<(), KeyStoreError> {
        match &self.checkpointer {
            Some(c) => c
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .sync()
                .map_err(|m| self.err(m)),
            // PostgreSQL: a key transaction is durable when it commits (as the server's
            // `synchronous_commit` has it).
            None => Ok(()),
        }
    }

    /// The saved state of an erasure job (JSON), if any.
    pub fn job_state(&self, job_id: &str) -> Result<Option<String>, KeyStoreError> {
        backend!(self, db => db.job_state(job_id)).map_err(|m| self.err(m))
    }

    /// Saves a job's state (JSON) durably, only if the saved one is still `expected` (`None`:
    /// there is none yet): false when another process changed it since it was read.
    pub fn replace_job_state(
        &self,
        job_id: &str,
        expected: Option<&str>,
        state: &str,
        now_ms: i64,
    ) -> Result<bool, KeyStoreError> {
        let replaced =
            backend!(self, db => db.replace_job_state(job_id, expected, state, now_ms)).map_err(|m| self.err(m))?;
        self.sync()?;
        Ok(replaced)
    }

    /// Saves an erasure job's state (JSON) durably.
    pub fn save_job_state(&self, job_id: &str, state: &str, now_ms: i64) -> Result<(), KeyStoreError> {
        backend!(self, db => db.save_job_state(job_id, state, now_ms)).map_err(|m| self.err(m))?;
        // A job goes on only once its state is on disk (see `sync`: the store is not synced
        // per transaction).
        self.sync()
    }

    /// Per token, the source time before which its events are dropped: `None` for a subject
    /// never erased, [`ERASED_FOR_GOOD`] for an erased one, the release time of one released
    /// for reuse. From the tombstones as of at most `refresh` ago.
    pub(crate) fn erased(&self, tokens: &[&str]) -> Result<Vec<Option<i64>>, KeyStoreError> {
        let mut erased = self.erased.lock().unwrap_or_else(|p| p.into_inner());
        if erased.refreshed.is_none_or(|at| at.elapsed() >= self.refresh) {
            let fresh = backend!(self, db => db.tombstones_since(erased.last_seq)).map_err(|m| self.err(m))?;
            if !fresh.is_empty() {
                // A key cached before its erasure must not outlive this refresh.
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                for t in fresh {
                    cache.pop(&t.token);
                    erased.last_seq = erased.last_seq.max(t.seq);
                    if t.reusable_after_ms == Some(SHREDDED_RELEASE_MS) {
                        // Nothing of theirs is dropped: no need to remember them.
                        erased.tokens.remove(&t.token);
                        continue;
                    }
                    erased
                        .tokens
                        .insert(t.token, t.reusable_after_ms.unwrap_or(ERASED_FOR_GOOD));
                }
            }
            erased.refreshed = Some(Instant::now());
        }
        Ok(tokens.iter().map(|t| erased.tokens.get(*t).copied()).collect())
    }

    /// Reads the named keys, creating the missing ones, in one write transaction: of two
    /// daemons racing for a subject, the first commit wins and the other reads its key. A
    /// subject with a tombstone gets `None`: an erased subject never gets a new key.
    fn resolve(&self, names: Names, wanted: &[&str]) -> Result<Vec<Option<KeyMaterial>>, KeyStoreError> {
        let rows = backend!(self, db => db.resolve(names, wanted, &|owners| self.master.mint(names, owners))).map_err(
            |e| match e {
                ResolveError::Store(m) => self.err(m),
                ResolveError::Key(k) => k,
            },
        )?;
        rows.into_iter()
            .zip(wanted)
            .map(|(row, owner)| match row {
                Resolved::Existing(id, wrapped) => self.master.unwrap_material(&id, &wrapped, (names, owner)).map(Some),
                Resolved::Created(material) => Ok(Some(material)),
                Resolved::Erased => Ok(None),
            })
            .collect()
    }

    fn err(&self, e: impl std::fmt::Display) -> KeyStoreError {
        store_err(&self.location, e)
    }
}

/// One name's key as a backend found or made it.
#[derive(Clone)]
enum Resolved {
    Existing(Vec<u8>, Vec<u8>),
    Created(KeyMaterial),
    Erased,
}

enum ResolveError {
    Store(BackendError),
    Key(KeyStoreError),
}

/// Makes new keys for the names given: per name, its material and wrapped form.
type Mint<'a> = &'a dyn Fn(&[&str]) -> Result<Vec<(KeyMaterial, Vec<u8>)>, KeyStoreError>;

/// A tombstone as a daemon reads it.
struct Tombstone {
    seq: i64,
    token: String,
    /// Set when the subject was released for reuse: events from then on are kept.
    reusable_after_ms: Option<i64>,
}

/// A key as stored, with whose it is (none: an orphan no name points at).
struct StoredKey {
    id: Vec<u8>,
    wrapped: Vec<u8>,
    subject: Option<String>,
    system: Option<String>,
}

impl StoredKey {
    fn owner(&self) -> Option<Owner<'_>> {
        match (&self.subject, &self.system) {
            (Some(token), _) => Some((Names::Subjects, token)),
            (None, Some(name)) => Some((Names::System, name)),
            (None, None) => None,
        }
    }
}

impl KeyProvider for KeyStore {
    fn subject_keys(&self, tokens: &[&str]) -> Result<Vec<Option<Arc<DataKey>>>, KeyError> {
        let key = |(id, material): KeyMaterial| {
            DataKey::new(id, &material)
                .map(Arc::new)
                .map_err(|e| KeyError(e.to_string()))
        };
        let mut found: Vec<Option<KeyMaterial>> = Vec::with_capacity(tokens.len());
        let mut missing: Vec<&str> = Vec::new();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for t in tokens {
                let hit = cache.get(*t).copied();
                if hit.is_none() {
                    missing.push(t);
                }
                found.push(hit);
            }
        }
        self.hits
            .fetch_add((tokens.len() - missing.len()) as u64, Ordering::Relaxed);
        self.misses.fetch_add(missing.len() as u64, Ordering::Relaxed);
        if missing.is_empty() {
            return found.into_iter().map(|m| m.map(key).transpose()).collect();
        }
        let loaded = self
            .resolve(Names::Subjects, &missing)
            .map_err(|e| KeyError(e.to_string()))?;
        let mut newly_erased = Vec::new();
        let mut out = Vec::with_capacity(tokens.len());
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let mut loaded = loaded.into_iter();
            for (hit, t) in found.into_iter().zip(tokens) {
                let material = match hit {
                    Some(m) => Some(m),
                    None => {
                        let m = loaded.next().expect("one result per miss");
                        match m {
                            Some(m) => {
                                cache.put(t.to_string(), m);
                            }
                            None => newly_erased.push((t.to_string(), ERASED_FOR_GOOD)),
                        }
                        m
                    }
                };
                out.push(material.map(key).transpose()?);
            }
        }
        // Erased since the last tombstone refresh: remembered, not asked again. (The cache lock
        // is released first: `erased` takes the two locks in the other order.)
        if !newly_erased.is_empty() {
            self.erased
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .tokens
                .extend(newly_erased);
        }
        Ok(out)
    }

    fn erased_subjects(&self, tokens: &[&str]) -> Result<Vec<Option<i64>>, KeyError> {
        self.erased(tokens).map_err(|e| KeyError(e.to_string()))
    }
}

fn store_err(location: &str, e: impl std::fmt::Display) -> KeyStoreError {
    KeyStoreError::Store {
        location: location.to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests;
