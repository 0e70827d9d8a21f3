//! PostgreSQL change capture: the control plane (checks, publication, slot, snapshot reads)
//! on `tokio-postgres`, the replication stream on `pgwire-replication`, and the pgoutput
//! messages decoded in [`pgoutput`]. Values become Debezium JSON in [`values`].
//!
//! Errors name settings, tables, columns and positions; never a row value.

mod config;
mod source;
pub use config::PostgresSourceConfig;
pub(crate) use source::PostgresOptions;
pub use source::PostgresSource;

pub(crate) mod pgoutput;
pub(crate) mod values;

use std::collections::BTreeSet;

use futures_util::StreamExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, TlsConfig};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use values::{TableShape, TypeCatalog, TypeRow, SESSION_OPTIONS};

use crate::secret::Secret;

/// How to reach the database, and the slot and publication sluice reads through.
#[derive(Clone)]
pub(crate) struct PgSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// None: no password (trust or peer authentication, as libpq without `PGPASSWORD`).
    pub password: Option<Secret>,
    pub database: String,
    pub slot: String,
    pub publication: String,
}

/// The password is never printed.
impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("connecting to PostgreSQL at {host}:{port} (database `{database}`, user `{user}`): {reason}")]
    Connect {
        host: String,
        port: u16,
        database: String,
        user: String,
        reason: String,
    },
    #[error("PostgreSQL: {what}: {reason}")]
    Sql { what: String, reason: String },
    #[error("PostgreSQL has wal_level = {found}; logical replication needs wal_level = logical (set it in postgresql.conf and restart the server)")]
    WalLevel { found: String },
    #[error("role `{role}` may not replicate: ALTER ROLE {role} WITH REPLICATION (or connect as a role that has it)")]
    NoReplicationPrivilege { role: String },
    #[error("replication slot `{slot}` is in use by another connection (pid {pid}): is another capture running?")]
    SlotActive { slot: String, pid: String },
    #[error("replication slot `{slot}` uses plugin `{plugin}` (database `{database}`); sluice needs a pgoutput slot in database `{expected}`")]
    SlotMismatch {
        slot: String,
        plugin: String,
        database: String,
        expected: String,
    },
    #[error("replication slot `{slot}` does not exist, but {what} was captured through it: changes made since are lost. Re-snapshot: remove the lake tables and the spool of `{slot}`")]
    SlotLost { slot: String, what: String },
    #[error("table {table} named by a policy does not exist in database `{database}`")]
    NoTable { table: String, database: String },
    #[error("table {table} has REPLICA IDENTITY {found}: updates would not carry unchanged TOASTed values. Run: ALTER TABLE {table} REPLICA IDENTITY FULL")]
    ReplicaIdentity { table: String, found: String },
    #[error("publication `{publication}` does not match the policies (missing: {missing:?}; not named by any policy: {extra:?}). Run: ALTER PUBLICATION {publication} SET TABLE {wanted}")]
    PublicationMismatch {
        publication: String,
        missing: Vec<String>,
        extra: Vec<String>,
        wanted: String,
    },
    #[error("publication `{publication}` does not publish {missing}: ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate')")]
    PublicationOperations { publication: String, missing: String },
    #[error("replication stream (slot `{slot}`): {source}")]
    Replication {
        slot: String,
        source: pgwire_replication::PgWireError,
    },
    #[error("replication stream at {lsn}: {source}")]
    Decode { lsn: String, source: pgoutput::DecodeError },
    #[error("replication stream: relation {relation} used before its Relation message (at {lsn})")]
    UnknownRelation { relation: u32, lsn: String },
    #[error("unexpected reply to `{what}`")]
    Protocol { what: &'static str },
}

/// A server error as its SQLSTATE and primary message only: DETAIL and HINT can quote row
/// values (`Key (email)=(…)`), which must never reach a log.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    let what = what.into();
    move |e| PgError::Sql {
        what,
        reason: describe(&e),
    }
}

pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.table` quoted for SQL.
pub(crate) fn quote_table(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// An ordinary SQL session (pinned to the value formats in [`SESSION_OPTIONS`]); its
/// connection task runs on the current tokio runtime.
pub(crate) async fn connect(s: &PgSettings) -> Result<Client, PgError> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&s.host)
        .port(s.port)
        .user(&s.user)
        .dbname(&s.database)
        .options(SESSION_OPTIONS)
        .application_name("sluice");
    if let Some(password) = &s.password {
        config.password(password.expose());
    }
    let (client, connection) = config.connect(NoTls).await.map_err(|e| PgError::Connect {
        host: s.host.clone(),
        port: s.port,
        database: s.database.clone(),
        user: s.user.clone(),
        reason: describe(&e),
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe(&e), "PostgreSQL control connection ended");
        }
    });
    Ok(client)
}

async fn one_value(client: &Client, query: &str, what: &'static str) -> Result<Option<String>, PgError> {
    let messages = client.simple_query(query).await.map_err(sql(what))?;
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            return Ok(row.get(0).map(str::to_string));
        }
    }
    Ok(None)
}

/// How long start-up waits for a slot another (possibly just killed) session holds.
const SLOT_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What start-up found about the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotState {
    Missing,
    /// Exists and is idle; its confirmed position.
    Ready {
        confirmed_flush: u64,
    },
}

/// Checks the server and the tables, and makes the publication hold exactly the policy
/// tables (created when missing; a different existing one is an error, not silently changed).
pub(crate) async fn prepare(
    client: &Client,
    s: &PgSettings,
    tables: &[(String, String)],
) -> Result<SlotState, PgError> {
    let wal_level = one_value(client, "SHOW wal_level", "reading wal_level")
        .await?
        .unwrap_or_default();
    if wal_level != "logical" {
        return Err(PgError::WalLevel { found: wal_level });
    }
    let may_replicate = one_value(
        client,
        "SELECT (rolreplication OR rolsuper)::text FROM pg_roles WHERE rolname = current_user",
        "reading the role's attributes",
    )
    .await?;
    if may_replicate.as_deref() != Some("true") {
        return Err(PgError::NoReplicationPrivilege { role: s.user.clone() });
    }
    for (schema, table) in tables {
        let identity = client
            .query_opt(
                "SELECT c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[schema, table],
            )
            .await
            .map_err(sql("reading table replica identity"))?;
        let name = format!("{schema}.{table}");
        match identity.map(|r| r.get::<_, String>(0)) {
            None => {
                return Err(PgError::NoTable {
                    table: name,
                    database: s.database.clone(),
                })
            }
            Some(f) if f == "f" => {}
            Some(other) => {
                return Err(PgError::ReplicaIdentity {
                    table: quote_table(schema, table),
                    found: match other.as_str() {
                        "d" => "DEFAULT",
                        "n" => "NOTHING",
                        "i" => "USING INDEX",
                        _ => "unknown",
                    }
                    .to_string(),
                })
            }
        }
    }
    ensure_publication(client, s, tables).await?;

    // A daemon killed a moment ago may still hold the slot until its walsender notices: wait a
    // little before calling the slot busy.
    let deadline = std::time::Instant::now() + SLOT_RELEASE_WAIT;
    let slot = loop {
        let slot = client
            .query_opt(
                "SELECT plugin, database, active::text, coalesce(active_pid::text, ''), \
                 coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.slot],
            )
            .await
            .map_err(sql("reading the replication slot"))?;
        match slot {
            Some(row) if row.get::<_, String>(2) == "true" && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            other => break other,
        }
    };
    let Some(slot) = slot else {
        return Ok(SlotState::Missing);
    };
    let plugin: Option<String> = slot.get(0);
    let database: Option<String> = slot.get(1);
    if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(s.database.as_str()) {
        return Err(PgError::SlotMismatch {
            slot: s.slot.clone(),
            plugin: plugin.unwrap_or_else(|| "(physical)".into()),
            database: database.unwrap_or_default(),
            expected: s.database.clone(),
        });
    }
    if slot.get::<_, String>(2) == "true" {
        return Err(PgError::SlotActive {
            slot: s.slot.clone(),
            pid: slot.get(3),
        });
    }
    let confirmed: String = slot.get(4);
    let confirmed_flush = Lsn::parse(&confirmed)
        .map_err(|_| PgError::Protocol {
            what: "confirmed_flush_lsn",
        })?
        .as_u64();
    Ok(SlotState::Ready { confirmed_flush })
}

async fn ensure_publication(client: &Client, s: &PgSettings, tables: &[(String, String)]) -> Result<(), PgError> {
    let wanted: BTreeSet<String> = tables.iter().map(|(sc, t)| format!("{sc}.{t}")).collect();
    let wanted_sql = tables
        .iter()
        .map(|(sc, t)| quote_table(sc, t))
        .collect::<Vec<_>>()
        .join(", ");
    let publication = client
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, puballtables FROM pg_publication WHERE pubname = $1",
            &[&s.publication],
        )
        .await
        .map_err(sql("reading the publication"))?;
    let Some(publication) = publication else {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {wanted_sql}",
                quote_ident(&s.publication)
            ))
            .await
            .map_err(sql(format!("creating publication `{}`", s.publication)))?;
        tracing::info!(publication = %s.publication, tables = wanted.len(), "created publication");
        return Ok(());
    };
    let ops = ["insert", "update", "delete", "truncate"];
    let missing_ops: Vec<&str> = (0..4)
        .filter(|&i| !publication.get::<_, bool>(i))
        .map(|i| ops[i])
        .collect();
    if !missing_ops.is_empty() {
        return Err(PgError::PublicationOperations {
            publication: s.publication.clone(),
            missing: missing_ops.join(", "),
        });
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&s.publication],
        )
        .await
        .map_err(sql("reading the publication's tables"))?;
    let have: BTreeSet<String> = rows
        .iter()
        .map(|r| format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let missing: Vec<String> = wanted.difference(&have).cloned().collect();
    let extra: Vec<String> = have.difference(&wanted).cloned().collect();
    if !missing.is_empty() || !extra.is_empty() || publication.get::<_, bool>(4) {
        return Err(PgError::PublicationMismatch {
            publication: s.publication.clone(),
            missing,
            extra,
            wanted: wanted_sql,
        });
    }
    Ok(())
}

/// Every type's OID and how its values are written (reloaded when an unknown OID appears).
pub(crate) async fn load_types(client: &Client) -> Result<TypeCatalog, PgError> {
    let rows = client
        .query(
            "SELECT oid::int8, typname::text, typtype::text, typelem::int8, typcategory::text, typbasetype::int8 FROM pg_type",
            &[],
        )
        .await
        .map_err(sql("reading pg_type"))?;
    let rows: Vec<TypeRow> = rows
        .iter()
        .map(|r| TypeRow {
            oid: r.get::<_, i64>(0) as u32,
            name: r.get(1),
            typtype: r.get::<_, String>(2).bytes().next().unwrap_or(b'b'),
            elem: r.get::<_, i64>(3) as u32,
            category: r.get::<_, String>(4).bytes().next().unwrap_or(b'U'),
            base: r.get::<_, i64>(5) as u32,
        })
        .collect();
    Ok(TypeCatalog::new(&rows))
}

/// A table's live columns, in order.
pub(crate) async fn table_shape(
    client: &Client,
    schema: &str,
    table: &str,
    types: &TypeCatalog,
) -> Result<TableShape, PgError> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8 FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(sql(format!("reading the columns of {schema}.{table}")))?;
    Ok(TableShape {
        schema: schema.to_string(),
        table: table.to_string(),
        columns: rows
            .iter()
            .map(|r| {
                let oid = r.get::<_, i64>(1) as u32;
                (
                    r.get::<_, String>(0),
                    types.kind(oid).cloned().unwrap_or(values::TypeKind::Unsupported),
                )
            })
            .collect(),
    })
}

/// The primary-key columns of a table, in key order (empty without a primary key).
pub(crate) async fn primary_key(client: &Client, schema: &str, table: &str) -> Result<Vec<String>, PgError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary ORDER BY k.ord",
            &[&schema, &table],
        )
        .await
        .map_err(sql(format!("reading the primary key of {schema}.{table}")))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A transaction snapshot (`pg_current_snapshot()`): which transactions a snapshot read saw.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Parses `xmin:xmax:xip,…`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(|x| x.parse().ok()).collect::<Option<Vec<u64>>>()?,
        };
        Some(Self { xmin, xmax, xip })
    }

    /// Whether the snapshot saw transaction `xid` (32 bits, as the stream's Begin carries it)
    /// as committed: then a table read under it already holds that transaction's changes.
    /// Streamed transactions are recent, so the 32-bit comparison is taken modulo 2^32
    /// around `xmax`, as PostgreSQL compares xids.
    pub(crate) fn saw(&self, xid: u32) -> bool {
        let xmax = self.xmax as u32;
        let before_xmax = (xid.wrapping_sub(xmax) as i32) < 0;
        before_xmax && !self.xip.iter().any(|&x| x as u32 == xid)
    }
}

/// Opens a REPEATABLE READ, read-only transaction (on `exported`, the slot's snapshot, when
/// given) and returns its snapshot and the WAL insert position read after it: a transaction
/// whose commit record lies at or past that position cannot be one the snapshot saw.
pub(crate) async fn begin_snapshot(client: &Client, exported: Option<&str>) -> Result<(Snapshot, u64), PgError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(sql("beginning the snapshot transaction"))?;
    if let Some(name) = exported {
        client
            .batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(name)))
            .await
            .map_err(sql("importing the slot's snapshot"))?;
    }
    let text = one_value(client, "SELECT pg_current_snapshot()::text", "reading the snapshot")
        .await?
        .ok_or(PgError::Protocol {
            what: "pg_current_snapshot",
        })?;
    let snapshot = Snapshot::parse(&text).ok_or(PgError::Protocol {
        what: "pg_current_snapshot",
    })?;
    let insert = one_value(
        client,
        "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::text",
        "reading the WAL insert position",
    )
    .await?
    .and_then(|t| t.parse::<u64>().ok())
    .ok_or(PgError::Protocol {
        what: "pg_current_wal_insert_lsn",
    })?;
    Ok((snapshot, insert))
}

/// Moves an idle slot forward to `lsn` (what every sink committed), e.g. after a `--once` run
/// ended before acknowledging its last commit.
pub(crate) async fn advance_slot(client: &Client, slot: &str, lsn: u64) -> Result<(), PgError> {
    // Never backwards (heartbeats may have moved it further); a session that just ended may
    // hold the slot for a moment.
    let deadline = std::time::Instant::now() + SLOT_RELEASE_WAIT;
    loop {
        let advanced = client
            .execute(
                "SELECT pg_replication_slot_advance(slot_name, $2::text::pg_lsn) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
                &[&slot, &lsn_text(lsn)],
            )
            .await;
        match advanced {
            Ok(_) => return Ok(()),
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Err(sql("advancing the replication slot")(e)),
        }
    }
}

/// Streams `COPY (SELECT columns FROM table) TO STDOUT` (text format) line by line.
pub(crate) async fn copy_table(
    client: &Client,
    shape: &TableShape,
    mut line: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<u64, PgError> {
    let columns = shape
        .columns
        .iter()
        .map(|(c, _)| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let table = quote_table(&shape.schema, &shape.table);
    let what = || format!("reading {}.{}", shape.schema, shape.table);
    let stream = client
        .copy_out(&format!("COPY (SELECT {columns} FROM {table}) TO STDOUT"))
        .await
        .map_err(sql(what()))?;
    let mut stream = std::pin::pin!(stream);
    let mut pending: Vec<u8> = Vec::new();
    let mut rows = 0u64;
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(sql(what()))?;
        pending.extend_from_slice(&bytes);
        let mut start = 0;
        while let Some(end) = memchr::memchr(b'\n', &pending[start..]) {
            line(&pending[start..start + end]).map_err(|_| PgError::Protocol { what: "spool write" })?;
            rows += 1;
            start += end + 1;
        }
        pending.drain(..start);
    }
    Ok(rows)
}

/// Creates the slot on a replication session and returns the session (which must stay open
/// and idle while the exported snapshot is read) with the snapshot's name.
pub(crate) async fn create_slot(s: &PgSettings) -> Result<(ReplicationClient, String), PgError> {
    let replication_error = |source| PgError::Replication {
        slot: s.slot.clone(),
        source,
    };
    let mut session = ReplicationClient::connect_gated(replication_config(s, 0))
        .await
        .map_err(replication_error)?;
    let rows = session
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(&s.slot)
        ))
        .await
        .map_err(replication_error)?;
    let row = rows.into_iter().next().ok_or(PgError::Protocol {
        what: "CREATE_REPLICATION_SLOT",
    })?;
    let text = |i: usize| {
        row.get(i)
            .cloned()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok_or(PgError::Protocol {
                what: "CREATE_REPLICATION_SLOT",
            })
    };
    let consistent = Lsn::parse(&text(1)?)
        .map_err(|_| PgError::Protocol {
            what: "CREATE_REPLICATION_SLOT",
        })?
        .as_u64();
    let snapshot = text(2)?;
    tracing::info!(slot = %s.slot, consistent_point = %Lsn::from_u64(consistent), "created replication slot");
    Ok((session, snapshot))
}

pub(crate) fn replication_config(s: &PgSettings, start_lsn: u64) -> ReplicationConfig {
    ReplicationConfig::new(
        s.host.clone(),
        s.user.clone(),
        s.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default(),
        s.database.clone(),
        s.slot.clone(),
        s.publication.clone(),
    )
    .with_port(s.port)
    .with_tls(TlsConfig::disabled())
    .with_start_lsn(Lsn::from_u64(start_lsn))
    .with_options(SESSION_OPTIONS)
    .with_application_name(format!("sluice:{}", s.slot))
    .with_status_interval(std::time::Duration::from_millis(250))
    .with_wakeup_interval(std::time::Duration::from_secs(5))
    .with_buffer_size(256)
}

/// Starts streaming the slot from `start_lsn` (0: from the slot's confirmed position).
pub(crate) async fn start_stream(s: &PgSettings, start_lsn: u64) -> Result<ReplicationClient, PgError> {
    let mut client = ReplicationClient::connect(replication_config(s, start_lsn))
        .await
        .map_err(|source| PgError::Replication {
            slot: s.slot.clone(),
            source,
        })?;
    client.wait_started().await.map_err(|source| PgError::Replication {
        slot: s.slot.clone(),
        source,
    })?;
    Ok(client)
}

/// Writes a non-transactional logical message (prefix `sluice`, this content) into the WAL; it
/// comes back on the stream in WAL order, so every transaction committed before it has been
/// received when it arrives.
pub(crate) async fn emit_marker(client: &Client, content: &str) -> Result<(), PgError> {
    client
        .execute("SELECT pg_logical_emit_message(false, 'sluice', $1::text)", &[&content])
        .await
        .map_err(sql("writing a marker message"))?;
    Ok(())
}

/// Bytes of WAL the slot holds back on the server.
pub(crate) async fn retained_wal(client: &Client, slot: &str) -> Result<Option<i64>, PgError> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("reading the slot's retained WAL"))?;
    Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
}

pub(crate) fn lsn_text(lsn: u64) -> String {
    Lsn::from_u64(lsn).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_visibility_follows_xmin_xmax_and_in_progress_list() {
        let s = Snapshot::parse("100:105:101,103").unwrap();
        assert!(s.saw(99));
        assert!(s.saw(100));
        assert!(!s.saw(101));
        assert!(s.saw(102));
        assert!(!s.saw(103));
        assert!(s.saw(104));
        assert!(!s.saw(105));
        assert!(!s.saw(200));
        assert_eq!(Snapshot::parse("7:7:").unwrap().xip, Vec::<u64>::new());
        assert!(Snapshot::parse("7:x:").is_none());
        // Near wraparound: xids just below 2^32 precede a small xmax.
        let w = Snapshot::parse("4294967290:4294967300:").unwrap();
        assert!(w.saw(4294967295));
        assert!(w.saw(1));
        assert!(!w.saw(4));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_table("public", "we\"ird"), "\"public\".\"we\"\"ird\"");
        assert_eq!(quote_literal("a'b"), "'a''b'");
    }
}
