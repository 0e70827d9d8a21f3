//! The embedded backend: one SQLite file in WAL mode. Several daemons on one host share it
//! (file locks, `BEGIN IMMEDIATE`).

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    BackendError, KeysDestroyed, Mint, Names, ResolveError, Resolved, StoredKey, Tombstone, SHREDDED_RELEASE_MS,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (id BLOB PRIMARY KEY, wrapped BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subject_keys (token TEXT PRIMARY KEY, key_id BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS system_keys (name TEXT PRIMARY KEY, key_id BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tombstones (seq INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL UNIQUE,
                                       job_id TEXT NOT NULL, erased_at_ms INTEGER NOT NULL,
                                       key_destroyed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS erasure_jobs (job_id TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at_ms INTEGER NOT NULL);
";

/// A key with the names that point at it.
const STORED_KEYS: &str = "SELECT k.id, k.wrapped, s.token, y.name FROM keys k \
     LEFT JOIN subject_keys s ON s.key_id = k.id LEFT JOIN system_keys y ON y.key_id = k.id";

fn stored_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredKey> {
    Ok(StoredKey {
        id: r.get(0)?,
        wrapped: r.get(1)?,
        subject: r.get(2)?,
        system: r.get(3)?,
    })
}

/// Runs `f` again while SQLite answers "busy" without having waited, up to 30 s.
fn retry_while_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

pub(super) struct SqliteStore {
    db: Connection,
}

/// Pages the write-ahead log may grow to before a key transaction copies it into the database
/// itself (SQLite's default is 1,000, which a chunk of new subjects — a page each — passes
/// every time). A backstop: the [`Checkpointer`] copies it at every lake commit, on its own
/// connection, so the fsyncs of a checkpoint never hold up key look-ups.
const WAL_PAGES_BEFORE_CHECKPOINT: i64 = 65_536;

impl SqliteStore {
    /// Opens (or creates) the store, with a page cache of `page_cache_bytes`.
    pub(super) fn open(path: &Path, page_cache_bytes: usize) -> Result<Self, BackendError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut db = Connection::open(path)?;
        // Another daemon may hold the write lock for a moment: wait rather than fail.
        db.busy_timeout(Duration::from_secs(30))?;
        // Switching a new file to WAL while another daemon opens it too can answer "locked"
        // without consulting the busy handler: retried here for as long as it would wait.
        retry_while_busy(|| db.pragma_update(None, "journal_mode", "WAL"))?;
        // NORMAL: a transaction of new keys is not synced on its own; the lake's commit that
        // needs them syncs the log first (`KeyStore::sync`), once per commit, not per chunk.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.pragma_update(None, "wal_autocheckpoint", WAL_PAGES_BEFORE_CHECKPOINT)?;
        // Negative: KiB rather than pages.
        let kib = (page_cache_bytes / 1024).max(2048) as i64;
        db.pragma_update(None, "cache_size", -kib)?;
        // A destroyed key's bytes are overwritten in the page, not left in free space.
        db.pragma_update(None, "secure_delete", "ON")?;
        // Under the write lock from the start, so the busy handler (not an immediate "locked")
        // answers a daemon creating the tables at the same moment.
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        // Stores made before subjects could be released for reuse lack the column.
        let has_reuse: bool = tx.query_row(
            "SELECT count(*) FROM pragma_table_info('tombstones') WHERE name = 'reusable_after_ms'",
            [],
            |r| r.get::<_, i64>(0),
        )? > 0;
        if !has_reuse {
            tx.execute_batch("ALTER TABLE tombstones ADD COLUMN reusable_after_ms INTEGER")?;
        }
        tx.commit()?;
        Ok(Self { db })
    }

    pub(super) fn resolve(
        &mut self,
        names: Names,
        wanted: &[&str],
        mint: Mint<'_>,
    ) -> Result<Vec<Resolved>, ResolveError> {
        let store = |e: rusqlite::Error| ResolveError::Store(e.into());
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(store)?;
        let mut by_name: Vec<(&str, Resolved)> = Vec::with_capacity(wanted.len());
        {
            let (select, insert_name) = match names {
                Names::Subjects => (
                    "SELECT k.id, k.wrapped FROM subject_keys s JOIN keys k ON k.id = s.key_id WHERE s.token = ?1",
                    "INSERT INTO subject_keys (token, key_id) VALUES (?1, ?2)",
                ),
                Names::System => (
                    "SELECT k.id, k.wrapped FROM system_keys s JOIN keys k ON k.id = s.key_id WHERE s.name = ?1",
                    "INSERT INTO system_keys (name, key_id) VALUES (?1, ?2)",
                ),
            };
            let mut select = tx.prepare_cached(select).map_err(store)?;
            let mut insert_name = tx.prepare_cached(insert_name).map_err(store)?;
            let mut insert_key = tx
                .prepare_cached("INSERT INTO keys (id, wrapped) VALUES (?1, ?2)")
                .map_err(store)?;
            let mut tombstone = tx
                .prepare_cached("SELECT 1 FROM tombstones WHERE token = ?1 AND reusable_after_ms IS NULL")
                .map_err(store)?;
            // In name order, each name once: neighbouring look-ups and inserts share B-tree
            // pages, which stay in the page cache.
            let mut order: Vec<usize> = (0..wanted.len()).collect();
            order.sort_unstable_by_key(|&i| wanted[i]);
            order.dedup_by_key(|i| wanted[*i]);
            let mut missing = Vec::new();
            for &i in &order {
                let name = wanted[i];
                let existing: Option<(Vec<u8>, Vec<u8>)> = select
                    .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(store)?;
                match existing {
                    Some((id, wrapped)) => by_name.push((name, Resolved::Existing(id, wrapped))),
                    None if names == Names::Subjects && tombstone.exists([name]).map_err(store)? => {
                        by_name.push((name, Resolved::Erased))
                    }
                    None => missing.push(name),
                }
            }
            if !missing.is_empty() {
                let minted = mint(&missing).map_err(ResolveError::Key)?;
                // Keys first, in id order: a batch's ids are adjacent (see `generate_keys`).
                for (material, wrapped) in &minted {
                    insert_key
                        .execute(params![material.0.as_slice(), wrapped])
                        .map_err(store)?;
                }
                for (name, (material, _)) in missing.iter().zip(minted) {
                    insert_name
                        .execute(params![name, material.0.as_slice()])
                        .map_err(store)?;
                    by_name.push((name, Resolved::Created(material)));
                }
            }
        }
        // Durable once synced (`sync`), before any ciphertext made with these keys is committed.
        tx.commit().map_err(store)?;
        by_name.sort_unstable_by_key(|(name, _)| *name);
        Ok(wanted
            .iter()
            .map(|w| {
                let at = by_name
                    .binary_search_by_key(w, |(name, _)| name)
                    .expect("every name resolved");
                by_name[at].1.clone()
            })
            .collect())
    }

    pub(super) fn wrapped_by_id(&mut self, id: &[u8]) -> Result<Option<StoredKey>, BackendError> {
        self.db
            .query_row(&format!("{STORED_KEYS} WHERE k.id = ?1"), [id], stored_key)
            .optional()
            .map_err(BackendError::from)
    }

    /// Stored keys in id order, after `after` (empty: from the first).
    pub(super) fn wrapped_page(&mut self, after: &[u8], limit: i64) -> Result<Vec<StoredKey>, BackendError> {
        let mut select = self
            .db
            .prepare(&format!("{STORED_KEYS} WHERE k.id > ?1 ORDER BY k.id LIMIT ?2"))?;
        let rows = select.query_map(params![after, limit], stored_key)?;
        rows.collect::<Result<_, _>>().map_err(BackendError::from)
    }

    /// Replaces a key's wrapped form if it is still `old` (a concurrent rewrap wins).
    pub(super) fn replace_wrapped(&mut self, id: &[u8], old: &[u8], new: &[u8]) -> Result<(), BackendError> {
        self.db
            .execute(
                "UPDATE keys SET wrapped = ?3 WHERE id = ?1 AND wrapped = ?2",
                params![id, old, new],
            )
            .map(|_| ())
            .map_err(BackendError::from)
    }

    pub(super) fn has_system_name(&mut self, name: &str) -> Result<bool, BackendError> {
        self.db
            .query_row("SELECT 1 FROM system_keys WHERE name = ?1", [name], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(BackendError::from)
    }

    pub(super) fn subject_count(&mut self) -> Result<u64, BackendError> {
        let n: i64 = self
            .db
            .query_row("SELECT count(*) FROM subject_keys", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub(super) fn subjects_with_keys(&mut self, tokens: &[String]) -> Result<Vec<String>, BackendError> {
        let mut select = self.db.prepare_cached("SELECT 1 FROM subject_keys WHERE token = ?1")?;
        let mut out = Vec::new();
        for t in tokens {
            if select.exists([t])? {
                out.push(t.clone());
            }
        }
        Ok(out)
    }

    pub(super) fn erase(
        &mut self,
        job_id: &str,
        tokens: &[String],
        now_ms: i64,
    ) -> Result<KeysDestroyed, BackendError> {
        let tx = self.db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let destroyed = {
            let mut delete_key =
                tx.prepare_cached("DELETE FROM keys WHERE id IN (SELECT key_id FROM subject_keys WHERE token = ?1)")?;
            let mut delete_name = tx.prepare_cached("DELETE FROM subject_keys WHERE token = ?1")?;
            let mut tombstone = tx.prepare_cached(
                "INSERT INTO tombstones (token, job_id, erased_at_ms, key_destroyed) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (token) DO NOTHING",
            )?;
            // A subject released for reuse and erased again: erased for good, under a new seq
            // (daemons read tombstones by increasing seq).
            let mut released =
                tx.prepare_cached("DELETE FROM tombstones WHERE token = ?1 AND reusable_after_ms IS NOT NULL")?;
            for t in tokens {
                let keys = delete_key.execute([t])?;
                delete_name.execute([t])?;
                released.execute([t])?;
                tombstone.execute(params![t, job_id, now_ms, keys > 0])?;
            }
            // Counted from the job's tombstones, so a rerun reports what the job destroyed.
            tx.query_row(
                "SELECT count(*), coalesce(sum(key_destroyed), 0) FROM tombstones WHERE job_id = ?1",
                [job_id],
                |r| {
                    Ok(KeysDestroyed {
                        tombstones: r.get::<_, i64>(0)? as u64,
                        keys: r.get::<_, i64>(1)? as u64,
                    })
                },
            )?
        };
        tx.commit()?;
        Ok(destroyed)
    }

    /// Crypto-shredding without erasure: for each subject with no tombstone, deletes its key and
    /// writes a tombstone that releases the id from the beginning of time; a subject with one
    /// (erased, released, or shredded by this job before) is left as it is.
    pub(super) fn shred(
        &mut self,
        job_id: &str,
        tokens: &[String],
        now_ms: i64,
    ) -> Result<KeysDestroyed, BackendError> {
        let tx = self.db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let destroyed = {
            let mut has_tombstone = tx.prepare_cached("SELECT 1 FROM tombstones WHERE token = ?1")?;
            let mut delete_key =
                tx.prepare_cached("DELETE FROM keys WHERE id IN (SELECT key_id FROM subject_keys WHERE token = ?1)")?;
            let mut delete_name = tx.prepare_cached("DELETE FROM subject_keys WHERE token = ?1")?;
            let mut tombstone = tx.prepare_cached(
                "INSERT INTO tombstones (token, job_id, erased_at_ms, key_destroyed, reusable_after_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for t in tokens {
                if has_tombstone.exists([t])? {
                    continue;
                }
                let keys = delete_key.execute([t])?;
                delete_name.execute([t])?;
                tombstone.execute(params![t, job_id, now_ms, keys > 0, SHREDDED_RELEASE_MS])?;
            }
            tx.query_row(
                "SELECT count(*), coalesce(sum(key_destroyed), 0) FROM tombstones WHERE job_id = ?1",
                [job_id],
                |r| {
                    Ok(KeysDestroyed {
                        tombstones: r.get::<_, i64>(0)? as u64,
                        keys: r.get::<_, i64>(1)? as u64,
                    })
                },
            )?
        };
        tx.commit()?;
        Ok(destroyed)
    }

    /// Old page images of a deleted key live on in the WAL until it is checkpointed and
    /// truncated; secure_delete has already zeroed them in the database file.
    pub(super) fn purge_deleted(&mut self) -> Result<(), BackendError> {
        let busy: i64 = self.db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            return Err(BackendError::Refused("another process holds the key store open: its WAL could not be truncated; stop the daemons sharing it or rerun the job (erasure is idempotent)"));
        }
        Ok(())
    }

    pub(super) fn tombstones_since(&mut self, seq: i64) -> Result<Vec<Tombstone>, BackendError> {
        let mut select = self
            .db
            .prepare_cached("SELECT seq, token, reusable_after_ms FROM tombstones WHERE seq > ?1 ORDER BY seq")?;
        let rows = select.query_map([seq], |r| {
            Ok(Tombstone {
                seq: r.get(0)?,
                token: r.get(1)?,
                reusable_after_ms: r.get(2)?,
            })
        })?;
        rows.collect::<Result<_, _>>().map_err(BackendError::from)
    }

    /// Releases an erased subject for reuse from `after_ms` on: its tombstone written again
    /// (a new seq) with the time. `false` if it has no tombstone in force.
    pub(super) fn release(&mut self, token: &str, after_ms: i64) -> Result<bool, BackendError> {
        let tx = self.db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let erased: Option<(String, i64, bool)> = tx
            .query_row(
                "SELECT job_id, erased_at_ms, key_destroyed FROM tombstones WHERE token = ?1 AND reusable_after_ms IS NULL",
                [token],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            ?;
        let Some((job_id, erased_at, destroyed)) = erased else {
            return Ok(false);
        };
        tx.execute("DELETE FROM tombstones WHERE token = ?1", [token])?;
        tx.execute(
            "INSERT INTO tombstones (token, job_id, erased_at_ms, key_destroyed, reusable_after_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![token, job_id, erased_at, destroyed, after_ms],
        )
        ?;
        tx.commit()?;
        Ok(true)
    }

    pub(super) fn job_state(&mut self, job_id: &str) -> Result<Option<String>, BackendError> {
        self.db
            .query_row("SELECT state FROM erasure_jobs WHERE job_id = ?1", [job_id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(BackendError::from)
    }

    /// Saves `state` only if the saved state is still `expected` (`None`: none saved yet).
    pub(super) fn replace_job_state(
        &mut self,
        job_id: &str,
        expected: Option<&str>,
        state: &str,
        now_ms: i64,
    ) -> Result<bool, BackendError> {
        let changed = match expected {
            None => self.db.execute(
                "INSERT INTO erasure_jobs (job_id, state, updated_at_ms) VALUES (?1, ?2, ?3) ON CONFLICT (job_id) DO NOTHING",
                params![job_id, state, now_ms],
            )?,
            Some(expected) => self.db.execute(
                "UPDATE erasure_jobs SET state = ?2, updated_at_ms = ?3 WHERE job_id = ?1 AND state = ?4",
                params![job_id, state, now_ms, expected],
            )?,
        };
        Ok(changed == 1)
    }

    pub(super) fn save_job_state(&mut self, job_id: &str, state: &str, now_ms: i64) -> Result<(), BackendError> {
        self.db
            .execute(
                "INSERT INTO erasure_jobs (job_id, state, updated_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (job_id) DO UPDATE SET state = excluded.state, updated_at_ms = excluded.updated_at_ms",
                params![job_id, state, now_ms],
            )
            .map(|_| ())
            .map_err(BackendError::from)
    }
}

/// Makes keys durable, on a connection of its own (see [`WAL_PAGES_BEFORE_CHECKPOINT`]).
pub(super) struct Checkpointer {
    db: Connection,
    wal: std::path::PathBuf,
}

impl Checkpointer {
    /// Opens a second connection to a store [`SqliteStore::open`] has opened.
    pub(super) fn open(path: &Path) -> Result<Self, BackendError> {
        let db = Connection::open(path)?;
        db.busy_timeout(Duration::from_secs(30))?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(Self { db, wal: wal.into() })
    }

    /// Makes every key committed so far durable, by this process or another sharing the store:
    /// copies the write-ahead log into the database as far as readers allow (bounding the log;
    /// the copy is synced), then syncs the log itself — a file-wide `fsync`, whoever appended
    /// the frames. With no log file, everything is in the synced database.
    pub(super) fn sync(&mut self) -> Result<(), BackendError> {
        // Busy (another checkpoint, e.g. an erasure's) is not an error: the log sync follows.
        self.db
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0))?;
        match std::fs::File::open(&self.wal) {
            Ok(wal) => wal.sync_data().map_err(|source| BackendError::File {
                action: "syncing",
                path: self.wal.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BackendError::File {
                action: "opening",
                path: self.wal.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Daemons started together open a new key store at the same moment (the Kafka group test
    /// saw one fail with "database is locked"): every one must open it.
    #[test]
    fn daemons_opening_a_new_store_at_once_all_succeed() {
        for round in 0..30 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("keys-{round}.db"));
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let opened: Vec<Result<(), BackendError>> = (0..4)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        SqliteStore::open(&path, 0).map(|_| ())
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            assert!(opened.iter().all(Result::is_ok), "round {round}: {opened:?}");
        }
    }
}
