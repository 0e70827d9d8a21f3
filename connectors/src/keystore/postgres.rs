//! The PostgreSQL backend: the same tables in a schema of their own, so daemons on several hosts
//! share keys and tombstones, and an erasure's key destruction and tombstones commit together.

use postgres::{Client, NoTls};

use super::{
    BackendError, KeysDestroyed, Mint, Names, ResolveError, Resolved, StoredKey, Tombstone, SHREDDED_RELEASE_MS,
};

/// Where the PostgreSQL key store is. The password comes from the environment, never a file.
#[derive(Clone)]
pub struct PgKeyStoreSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The environment variable holding the password (`keys.password_env`), read when the store
    /// is opened; None: `PGPASSWORD` if set, else no password.
    pub password_env: Option<String>,
    pub database: String,
    /// Schema holding the key store's tables (created if absent).
    pub schema: String,
}

impl std::fmt::Debug for PgKeyStoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PgKeyStoreSettings({}@{}:{}/{} schema {}, password hidden)",
            self.user, self.host, self.port, self.database, self.schema
        )
    }
}

/// Serializes key creation across daemons: two creating the same subject's key at once would
/// otherwise both mint one (a unique violation, or worse two keys in flight).
const KEY_CREATION_LOCK: i64 = 0x736c_7569_6365_6b73; // "sluiceks"

pub(super) struct PgStore {
    client: Client,
    schema: String,
}

fn stored_key(r: &postgres::Row) -> StoredKey {
    StoredKey {
        id: r.get(0),
        wrapped: r.get(1),
        subject: r.get(2),
        system: r.get(3),
    }
}

impl PgStore {
    pub(super) fn open(s: &PgKeyStoreSettings) -> Result<Self, BackendError> {
        if s.schema.is_empty()
            || !s
                .schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(BackendError::SchemaName(s.schema.clone()));
        }
        let mut config = postgres::Config::new();
        config
            .host(&s.host)
            .port(s.port)
            .user(&s.user)
            .dbname(&s.database)
            .application_name("sluice-keystore")
            // "relation already exists, skipping" and the like are not worth a log line.
            .options("-c client_min_messages=warning");
        let password =
            crate::secret::Secret::from_named_env_or(s.password_env.as_deref(), "PGPASSWORD", "keys.password_env")?;
        if let Some(password) = &password {
            config.password(password.expose());
        }
        let mut client = config.connect(NoTls)?;
        let schema = &s.schema;
        client.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {schema}.keys (id BYTEA PRIMARY KEY, wrapped BYTEA NOT NULL);
                 CREATE TABLE IF NOT EXISTS {schema}.subject_keys (token TEXT PRIMARY KEY, key_id BYTEA NOT NULL);
                 CREATE TABLE IF NOT EXISTS {schema}.system_keys (name TEXT PRIMARY KEY, key_id BYTEA NOT NULL);
                 CREATE TABLE IF NOT EXISTS {schema}.tombstones (seq BIGSERIAL PRIMARY KEY, token TEXT NOT NULL UNIQUE,
                                                                 job_id TEXT NOT NULL, erased_at_ms BIGINT NOT NULL,
                                                                 key_destroyed BOOLEAN NOT NULL);
                 CREATE TABLE IF NOT EXISTS {schema}.erasure_jobs (job_id TEXT PRIMARY KEY, state TEXT NOT NULL,
                                                                   updated_at_ms BIGINT NOT NULL);
                 ALTER TABLE {schema}.tombstones ADD COLUMN IF NOT EXISTS reusable_after_ms BIGINT;"
        ))?;
        Ok(Self {
            client,
            schema: schema.clone(),
        })
    }

    pub(super) fn resolve(
        &mut self,
        names: Names,
        wanted: &[&str],
        mint: Mint<'_>,
    ) -> Result<Vec<Resolved>, ResolveError> {
        let store = |err: postgres::Error| ResolveError::Store(err.into());
        let s = &self.schema;
        let (table, column) = match names {
            Names::Subjects => ("subject_keys", "token"),
            Names::System => ("system_keys", "name"),
        };
        let select = format!("SELECT k.id, k.wrapped, n.{column} FROM {s}.{table} n JOIN {s}.keys k ON k.id = n.key_id WHERE n.{column} = ANY($1)");
        let mut found = std::collections::HashMap::new();
        let wanted_owned: Vec<String> = wanted.iter().map(|w| w.to_string()).collect();
        // Most lookups find every key: read without locking first.
        for row in self.client.query(&select, &[&wanted_owned]).map_err(store)? {
            found.insert(
                row.get::<_, String>(2),
                (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1)),
            );
        }
        if found.len() == wanted.iter().collect::<std::collections::HashSet<_>>().len() {
            return Ok(wanted
                .iter()
                .map(|w| {
                    let (id, wrapped) = found[*w].clone();
                    Resolved::Existing(id, wrapped)
                })
                .collect());
        }
        let mut tx = self.client.transaction().map_err(store)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEY_CREATION_LOCK])
            .map_err(store)?;
        found.clear();
        for row in tx.query(&select, &[&wanted_owned]).map_err(store)? {
            found.insert(
                row.get::<_, String>(2),
                (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1)),
            );
        }
        let erased: std::collections::HashSet<String> = if names == Names::Subjects {
            tx.query(
                &format!("SELECT token FROM {s}.tombstones WHERE token = ANY($1) AND reusable_after_ms IS NULL"),
                &[&wanted_owned],
            )
            .map_err(store)?
            .into_iter()
            .map(|r| r.get(0))
            .collect()
        } else {
            Default::default()
        };
        // The missing names, each once, get their keys from one batch and one insert per table.
        let mut missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| !found.contains_key(*w) && !erased.contains(*w))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let mut created = std::collections::HashMap::new();
        if !missing.is_empty() {
            let minted = mint(&missing).map_err(ResolveError::Key)?;
            let ids: Vec<&[u8]> = minted.iter().map(|(m, _)| m.0.as_slice()).collect();
            let wrapped: Vec<&[u8]> = minted.iter().map(|(_, w)| w.as_slice()).collect();
            tx.execute(
                &format!("INSERT INTO {s}.keys (id, wrapped) SELECT * FROM unnest($1::bytea[], $2::bytea[])"),
                &[&ids, &wrapped],
            )
            .map_err(store)?;
            tx.execute(
                &format!("INSERT INTO {s}.{table} ({column}, key_id) SELECT * FROM unnest($1::text[], $2::bytea[])"),
                &[&missing, &ids],
            )
            .map_err(store)?;
            for (name, (material, _)) in missing.iter().zip(&minted) {
                created.insert(*name, *material);
            }
        }
        let out = wanted
            .iter()
            .map(|w| {
                if let Some((id, wrapped)) = found.get(*w) {
                    Resolved::Existing(id.clone(), wrapped.clone())
                } else if let Some(material) = created.get(*w) {
                    Resolved::Created(*material)
                } else {
                    Resolved::Erased
                }
            })
            .collect();
        // Durable (synchronous_commit as the server has it) before ciphertext made with these
        // keys can be committed to the lake.
        tx.commit().map_err(store)?;
        Ok(out)
    }

    /// A key with the names that point at it.
    fn stored_keys(&self) -> String {
        let s = &self.schema;
        format!("SELECT k.id, k.wrapped, n.token, y.name FROM {s}.keys k LEFT JOIN {s}.subject_keys n ON n.key_id = k.id LEFT JOIN {s}.system_keys y ON y.key_id = k.id")
    }

    pub(super) fn wrapped_by_id(&mut self, id: &[u8]) -> Result<Option<StoredKey>, BackendError> {
        let select = format!("{} WHERE k.id = $1", self.stored_keys());
        let row = self.client.query_opt(&select, &[&id])?;
        Ok(row.map(|r| stored_key(&r)))
    }

    /// Stored keys in id order, after `after` (empty: from the first).
    pub(super) fn wrapped_page(&mut self, after: &[u8], limit: i64) -> Result<Vec<StoredKey>, BackendError> {
        let select = format!("{} WHERE k.id > $1 ORDER BY k.id LIMIT $2", self.stored_keys());
        let rows = self.client.query(&select, &[&after, &limit])?;
        Ok(rows.iter().map(stored_key).collect())
    }

    /// Replaces a key's wrapped form if it is still `old` (a concurrent rewrap wins).
    pub(super) fn replace_wrapped(&mut self, id: &[u8], old: &[u8], new: &[u8]) -> Result<(), BackendError> {
        let update = format!(
            "UPDATE {}.keys SET wrapped = $3 WHERE id = $1 AND wrapped = $2",
            self.schema
        );
        self.client
            .execute(&update, &[&id, &old, &new])
            .map(|_| ())
            .map_err(BackendError::from)
    }

    pub(super) fn has_system_name(&mut self, name: &str) -> Result<bool, BackendError> {
        let select = format!("SELECT 1 FROM {}.system_keys WHERE name = $1", self.schema);
        Ok(self.client.query_opt(&select, &[&name])?.is_some())
    }

    pub(super) fn subject_count(&mut self) -> Result<u64, BackendError> {
        let row = self
            .client
            .query_one(&format!("SELECT count(*) FROM {}.subject_keys", self.schema), &[])?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    pub(super) fn subjects_with_keys(&mut self, tokens: &[String]) -> Result<Vec<String>, BackendError> {
        let rows = self.client.query(
            &format!("SELECT token FROM {}.subject_keys WHERE token = ANY($1)", self.schema),
            &[&tokens],
        )?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    pub(super) fn erase(
        &mut self,
        job_id: &str,
        tokens: &[String],
        now_ms: i64,
    ) -> Result<KeysDestroyed, BackendError> {
        let s = self.schema.clone();
        let mut tx = self.client.transaction()?;
        // The key-creation lock: no key for these subjects can be minted between the delete
        // and the commit, and erasures commit their tombstones in `seq` order (daemons read
        // tombstones by increasing `seq`).
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEY_CREATION_LOCK])?;
        // A subject released for reuse and erased again: erased for good, under a new seq.
        tx.execute(
            &format!("DELETE FROM {s}.tombstones WHERE token = ANY($1) AND reusable_after_ms IS NOT NULL"),
            &[&tokens],
        )?;
        tx.execute(
            &format!(
                "WITH gone AS (DELETE FROM {s}.subject_keys WHERE token = ANY($1) RETURNING token, key_id),
                      keys AS (DELETE FROM {s}.keys WHERE id IN (SELECT key_id FROM gone))
                 INSERT INTO {s}.tombstones (token, job_id, erased_at_ms, key_destroyed)
                 SELECT t, $2, $3, t IN (SELECT token FROM gone) FROM unnest($1::text[]) t
                 ON CONFLICT (token) DO NOTHING"
            ),
            &[&tokens, &job_id, &now_ms],
        )?;
        // Counted from the job's tombstones, so a rerun reports what the job destroyed.
        let row = tx.query_one(
            &format!("SELECT count(*), count(*) FILTER (WHERE key_destroyed) FROM {s}.tombstones WHERE job_id = $1"),
            &[&job_id],
        )?;
        tx.commit()?;
        Ok(KeysDestroyed {
            tombstones: row.get::<_, i64>(0) as u64,
            keys: row.get::<_, i64>(1) as u64,
        })
    }

    /// Dead row versions keep a deleted key's bytes in the table's pages until VACUUM prunes
    /// them. (WAL archives and base backups of this database keep them as long as they are
    /// kept: give them a retention shorter than the erasure deadline.)
    pub(super) fn purge_deleted(&mut self) -> Result<(), BackendError> {
        // One statement each: VACUUM cannot run inside a (multi-statement) transaction.
        for table in ["keys", "subject_keys"] {
            self.client.batch_execute(&format!("VACUUM {}.{table}", self.schema))?;
        }
        Ok(())
    }

    pub(super) fn tombstones_since(&mut self, seq: i64) -> Result<Vec<Tombstone>, BackendError> {
        let rows = self.client.query(
            &format!(
                "SELECT seq, token, reusable_after_ms FROM {}.tombstones WHERE seq > $1 ORDER BY seq",
                self.schema
            ),
            &[&seq],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| Tombstone {
                seq: r.get(0),
                token: r.get(1),
                reusable_after_ms: r.get(2),
            })
            .collect())
    }

    /// Releases an erased subject for reuse from `after_ms` on (see the SQLite backend).
    pub(super) fn release(&mut self, token: &str, after_ms: i64) -> Result<bool, BackendError> {
        let s = self.schema.clone();
        let mut tx = self.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEY_CREATION_LOCK])?;
        let Some(old) = tx.query_opt(
            &format!(
                "DELETE FROM {s}.tombstones WHERE token = $1 AND reusable_after_ms IS NULL
                     RETURNING job_id, erased_at_ms, key_destroyed"
            ),
            &[&token],
        )?
        else {
            return Ok(false);
        };
        tx.execute(
            &format!(
                "INSERT INTO {s}.tombstones (token, job_id, erased_at_ms, key_destroyed, reusable_after_ms) VALUES ($1, $2, $3, $4, $5)"
            ),
            &[&token, &old.get::<_, String>(0), &old.get::<_, i64>(1), &old.get::<_, bool>(2), &after_ms],
        )
        ?;
        tx.commit()?;
        Ok(true)
    }

    pub(super) fn job_state(&mut self, job_id: &str) -> Result<Option<String>, BackendError> {
        let row = self.client.query_opt(
            &format!("SELECT state FROM {}.erasure_jobs WHERE job_id = $1", self.schema),
            &[&job_id],
        )?;
        Ok(row.map(|r| r.get(0)))
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
        let s = self.schema.clone();
        let mut tx = self.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEY_CREATION_LOCK])?;
        tx.execute(
            &format!(
                "WITH fresh AS (SELECT t FROM unnest($1::text[]) t
                                 WHERE NOT EXISTS (SELECT 1 FROM {s}.tombstones b WHERE b.token = t)),
                      gone AS (DELETE FROM {s}.subject_keys WHERE token IN (SELECT t FROM fresh) RETURNING token, key_id),
                      keys AS (DELETE FROM {s}.keys WHERE id IN (SELECT key_id FROM gone))
                 INSERT INTO {s}.tombstones (token, job_id, erased_at_ms, key_destroyed, reusable_after_ms)
                 SELECT t, $2, $3, t IN (SELECT token FROM gone), $4::bigint FROM fresh
                 ON CONFLICT (token) DO NOTHING"
            ),
            &[&tokens, &job_id, &now_ms, &SHREDDED_RELEASE_MS],
        )?;
        let row = tx.query_one(
            &format!("SELECT count(*), count(*) FILTER (WHERE key_destroyed) FROM {s}.tombstones WHERE job_id = $1"),
            &[&job_id],
        )?;
        let destroyed = KeysDestroyed {
            tombstones: row.get::<_, i64>(0) as u64,
            keys: row.get::<_, i64>(1) as u64,
        };
        tx.commit()?;
        Ok(destroyed)
    }

    /// Saves `state` only if the saved state is still `expected` (`None`: none saved yet).
    pub(super) fn replace_job_state(
        &mut self,
        job_id: &str,
        expected: Option<&str>,
        state: &str,
        now_ms: i64,
    ) -> Result<bool, BackendError> {
        let s = &self.schema;
        let changed = match expected {
            None => self.client.execute(
                &format!(
                    "INSERT INTO {s}.erasure_jobs (job_id, state, updated_at_ms) VALUES ($1, $2, $3) ON CONFLICT (job_id) DO NOTHING"
                ),
                &[&job_id, &state, &now_ms],
            )?,
            Some(expected) => self.client.execute(
                &format!(
                    "UPDATE {s}.erasure_jobs SET state = $2, updated_at_ms = $3 WHERE job_id = $1 AND state = $4"
                ),
                &[&job_id, &state, &now_ms, &expected],
            )?,
        };
        Ok(changed == 1)
    }

    pub(super) fn save_job_state(&mut self, job_id: &str, state: &str, now_ms: i64) -> Result<(), BackendError> {
        self.client
            .execute(
                &format!(
                    "INSERT INTO {}.erasure_jobs (job_id, state, updated_at_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (job_id) DO UPDATE SET state = excluded.state, updated_at_ms = excluded.updated_at_ms",
                    self.schema
                ),
                &[&job_id, &state, &now_ms],
            )
            .map(|_| ())
            .map_err(BackendError::from)
    }
}
