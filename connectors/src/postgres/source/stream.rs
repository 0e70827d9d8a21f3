//! The change stream of a capture: pgoutput messages from the slot, turned into Debezium
//! events, in chunks that end only at transaction boundaries.

use super::*;

/// A chunk this old is handed over at the next transaction end, full or not.
const HAND_OVER_AFTER: Duration = Duration::from_millis(100);
/// Microseconds between the Unix and the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_UNIX_MS: i64 = 946_684_800_000;

/// A relation of the stream.
pub(super) struct Relation {
    shape: TableShape,
    /// Positions of the replica identity's columns (the primary key by default).
    key: Vec<usize>,
    /// The snapshot the table's rows were read under (and the WAL position read after it):
    /// its transactions are already in.
    seen: Option<(Snapshot, u64)>,
}

struct Txn {
    xid: u32,
    lsn: u64,
    commit_ms: i64,
    emitted: bool,
    /// Already in every sink: its changes are not sent again.
    done: bool,
}

/// The chunk being filled: handed over at a transaction's end once full or old enough.
struct Outgoing {
    stream: Arc<str>,
    chunk_events: usize,
    chunk: Chunk,
    /// When the chunk got its first line: a transaction's end hands over a chunk that old, so
    /// a steady trickle of small transactions does not wait for the chunk to fill.
    since: Option<Instant>,
}

impl Outgoing {
    /// False when the sink loop is gone.
    fn hand_over(&mut self, out: &mut ChunkSender) -> bool {
        self.since = None;
        if self.chunk.lines.is_empty() {
            return true;
        }
        let next = Chunk::new(self.stream.clone(), self.chunk_events);
        out.send(std::mem::replace(&mut self.chunk, next))
    }
}

/// Where a stream stands: what it sent and acknowledged, when it reports next.
struct StreamState {
    start_lsn: u64,
    relations: HashMap<u32, Relation>,
    txn: Option<Txn>,
    outgoing: Outgoing,
    /// A transaction larger than a chunk is cut, before a row (so that its last chunk is never
    /// empty), at this many rows.
    cut_at: usize,
    line: Vec<u8>,
    /// The newest commit LSN whose events were sent, and what the slot was told.
    last_sent: u64,
    acked: u64,
    skipped_seen: u64,
    next_marker: Instant,
    next_report: Instant,
    last_commit_ms: i64,
}

impl StreamState {
    fn begin(&mut self, final_lsn: u64, xid: u32, commit_time_micros: i64) {
        let commit_ms = commit_time_micros / 1000 + PG_EPOCH_UNIX_MS;
        self.last_commit_ms = commit_ms;
        self.txn = Some(Txn {
            xid,
            lsn: final_lsn,
            commit_ms,
            emitted: false,
            // Sent again after a restart at its commit LSN: every sink holds it.
            done: final_lsn <= self.start_lsn,
        });
    }

    /// A transaction's end: the chunk may be handed over here. False when the sink loop is gone.
    fn commit(&mut self, out: &mut ChunkSender) -> bool {
        if let Some(t) = self.txn.take() {
            if t.emitted {
                self.last_sent = t.lsn;
            }
        }
        let o = &mut self.outgoing;
        o.chunk.boundary = true;
        let due = o.chunk.lines.len() >= o.chunk_events
            || o.chunk.data.len() >= CHUNK_BYTES
            || o.since.is_some_and(|t| t.elapsed() >= HAND_OVER_AFTER);
        !due || o.hand_over(out)
    }
}

impl PostgresSource {
    /// Streams changes from the slot until the sink stops (or, with `once`, until every change
    /// committed before the start is taken).
    pub(super) async fn stream(
        &mut self,
        start_lsn: u64,
        seen: HashMap<String, (Snapshot, u64)>,
        out: &mut ChunkSender,
    ) -> Result<ReaderEnd, SourceError> {
        let mut client = pg::start_stream(&self.o.settings, start_lsn).await?;
        let result = self.stream_events(&mut client, start_lsn, seen, out).await;
        // Release the slot before a next pass (or process) wants it.
        client.stop();
        let _ = client.shutdown().await;
        result
    }

    async fn stream_events(
        &mut self,
        client: &mut ReplicationClient,
        start_lsn: u64,
        seen: HashMap<String, (Snapshot, u64)>,
        out: &mut ChunkSender,
    ) -> Result<ReaderEnd, SourceError> {
        let slot = self.o.settings.slot.clone();
        let replication = |source| PgError::Replication {
            slot: slot.clone(),
            source,
        };
        info!(slot = %slot, from = %pg::lsn_text(start_lsn), "streaming changes");
        // `--once` ends at a marker of its own, written now.
        let end_marker = format!(
            "end-of-once {}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        if self.o.once {
            pg::emit_marker(self.control(), &end_marker).await?;
        }
        let stream: Arc<str> = Arc::from(self.stream_name().as_str());
        let mut s = StreamState {
            start_lsn,
            relations: HashMap::new(),
            txn: None,
            outgoing: Outgoing {
                chunk: Chunk::new(stream.clone(), self.o.chunk_events),
                stream,
                chunk_events: self.o.chunk_events,
                since: None,
            },
            cut_at: self.o.chunk_events.saturating_mul(4).max(1),
            line: Vec::with_capacity(1024),
            last_sent: start_lsn,
            acked: start_lsn,
            skipped_seen: 0,
            next_marker: Instant::now() + self.o.heartbeat,
            next_report: Instant::now() + Duration::from_secs(30),
            last_commit_ms: 0,
        };
        loop {
            self.keep_up(client, &mut s, out).await;
            if out.stopped() {
                return Ok(ReaderEnd::Done);
            }
            let event = match tokio::time::timeout(Duration::from_millis(100), client.recv()).await {
                Err(_) => {
                    // Quiet: hand over what finished transactions left in the chunk.
                    if s.txn.is_none() && !s.outgoing.hand_over(out) {
                        return Ok(ReaderEnd::Done);
                    }
                    continue;
                }
                Ok(event) => event.map_err(replication)?,
            };
            let Some(event) = event else {
                return Err(PgError::Protocol {
                    what: "replication stream ended",
                }
                .into());
            };
            let go_on = match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    s.begin(final_lsn.as_u64(), xid, commit_time_micros);
                    true
                }
                ReplicationEvent::Commit { .. } => s.commit(out),
                ReplicationEvent::XLogData { data, wal_start, .. } => {
                    let message = pgoutput::decode(&data).map_err(|source| PgError::Decode {
                        lsn: wal_start.to_string(),
                        source,
                    })?;
                    self.change(message, &wal_start.to_string(), &seen, &mut s, out).await?
                }
                ReplicationEvent::Message {
                    prefix, lsn, content, ..
                } if prefix == "sluice" && s.txn.is_none() => {
                    // Every transaction committed before the marker has arrived.
                    if !s.outgoing.hand_over(out) {
                        return Ok(ReaderEnd::Done);
                    }
                    if self.o.once && content.as_ref() == end_marker.as_bytes() {
                        return Ok(ReaderEnd::Done);
                    }
                    // Nothing in flight: the WAL up to the marker holds nothing left to take.
                    if self.durable.load(Ordering::SeqCst) >= s.last_sent && lsn.as_u64() > s.acked {
                        client.update_applied_lsn(lsn);
                        s.acked = lsn.as_u64();
                    }
                    true
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(ReaderEnd::Done),
                _ => true,
            };
            if !go_on {
                return Ok(ReaderEnd::Done);
            }
        }
    }

    fn control(&self) -> &Client {
        self.control.as_ref().expect("connected in begin_pass")
    }

    /// Between messages: acknowledges what every sink committed, writes the heartbeat marker,
    /// and reports progress now and then.
    async fn keep_up(&self, client: &mut ReplicationClient, s: &mut StreamState, out: &ChunkSender) {
        let durable = self.durable.load(Ordering::SeqCst);
        if durable > s.acked {
            client.update_applied_lsn(Lsn::from_u64(durable));
            s.acked = durable;
        }
        let now = Instant::now();
        if now >= s.next_marker {
            s.next_marker = now + self.o.heartbeat;
            if let Err(e) = pg::emit_marker(self.control(), "heartbeat").await {
                warn!(error = %e, "could not write the heartbeat marker");
            }
        }
        if now >= s.next_report {
            s.next_report = now + Duration::from_secs(30);
            let slot = &self.o.settings.slot;
            let retained = pg::retained_wal(self.control(), slot).await.ok().flatten();
            let behind_ms = (s.last_commit_ms > 0).then(|| chrono::Utc::now().timestamp_millis() - s.last_commit_ms);
            if let Some(bytes) = retained {
                out.report_lag("postgres", bytes);
            }
            info!(
                slot = %slot,
                committed = %pg::lsn_text(durable),
                retained_wal_bytes = retained,
                last_commit_age_ms = behind_ms,
                skipped_seen_by_snapshot = s.skipped_seen,
                "replication progress"
            );
        }
    }

    /// One pgoutput message: a relation's columns, or row changes written as events. False
    /// when the sink loop is gone.
    async fn change(
        &mut self,
        message: Message<'_>,
        at: &str,
        seen: &HashMap<String, (Snapshot, u64)>,
        s: &mut StreamState,
        out: &mut ChunkSender,
    ) -> Result<bool, SourceError> {
        let (op, relation_ids, before, after) = match message {
            Message::Relation(r) => {
                let control = self.control.as_ref().expect("connected in begin_pass");
                relation(&mut self.types, &mut self.reported, control, r, seen, &mut s.relations).await?;
                return Ok(true);
            }
            Message::Insert { relation, new } => (b'c', vec![relation], None, Some(new)),
            Message::Update { relation, old, new } => (b'u', vec![relation], old, Some(new)),
            Message::Delete { relation, old } => (b'd', vec![relation], Some(old), None),
            Message::Truncate { relations } => (b't', relations, None, None),
            Message::Other => return Ok(true),
        };
        let Some(t) = s.txn.as_mut() else {
            return Err(PgError::Protocol {
                what: "a row change outside a transaction",
            }
            .into());
        };
        if t.done {
            return Ok(true);
        }
        for id in relation_ids {
            let rel = s.relations.get(&id).ok_or_else(|| PgError::UnknownRelation {
                relation: id,
                lsn: at.to_string(),
            })?;
            if rel
                .seen
                .as_ref()
                .is_some_and(|(snapshot, lsn)| t.lsn < *lsn && snapshot.saw(t.xid))
            {
                s.skipped_seen += 1;
                continue;
            }
            // An update that changes the row's key is a delete of the old row and an insert of
            // the new one, as Debezium writes it: whoever keeps rows by key (a current table)
            // must let go of the old key.
            let events: &[RowChange] = match (op, before.as_deref(), after.as_deref()) {
                (b'u', Some(old), Some(new)) if key_changed(&rel.key, old, new) => {
                    &[(b'd', Some(old), None), (b'c', None, Some(new))]
                }
                (op, before, after) => &[(op, before, after)],
            };
            for &(op, before, after) in events {
                let o = &mut s.outgoing;
                if (o.chunk.lines.len() >= s.cut_at || o.chunk.data.len() >= CHUNK_BYTES) && !o.hand_over(out) {
                    return Ok(false);
                }
                s.line.clear();
                let source = EventSource {
                    connector_name: &self.o.name,
                    database: &self.o.settings.database,
                    lsn: t.lsn,
                    xid: t.xid,
                    commit_ms: t.commit_ms,
                    snapshot: false,
                };
                let now_ms = chrono::Utc::now().timestamp_millis();
                write_event(&mut s.line, op, &rel.shape, before, after, &source, now_ms);
                o.chunk.push(
                    &s.line,
                    LineEnd {
                        end_offset: t.lsn,
                        len: s.line.len(),
                        terminated: true,
                    },
                );
                o.chunk.boundary = false;
                o.since.get_or_insert_with(Instant::now);
                t.emitted = true;
            }
        }
        Ok(true)
    }
}

/// An event's operation, before image and after image.
type RowChange<'a, 'b> = (u8, Option<&'a [Datum<'b>]>, Option<&'a [Datum<'b>]>);

/// Whether an update's old row (`K` key columns or an `O` full row) and new row differ in a
/// key column. An unchanged TOASTed value in the new row is unchanged.
fn key_changed(key: &[usize], old: &[Datum], new: &[Datum]) -> bool {
    key.iter().any(|&i| match (old.get(i), new.get(i)) {
        (Some(o), Some(n)) => *n != Datum::UnchangedToast && o != n,
        _ => false,
    })
}

/// A Relation message: the table's current columns (after DDL too).
pub(super) async fn relation(
    types: &mut TypeCatalog,
    reported: &mut HashSet<(String, String)>,
    control: &Client,
    r: pgoutput::Relation,
    seen: &HashMap<String, (Snapshot, u64)>,
    relations: &mut HashMap<u32, Relation>,
) -> Result<(), SourceError> {
    if r.columns.iter().any(|c| types.kind(c.type_oid).is_none()) {
        // A type created since start-up (an enum, a domain).
        *types = pg::load_types(control).await?;
    }
    let qualified = format!("{}.{}", r.namespace, r.name);
    let shape = TableShape {
            schema: r.namespace.clone(),
            table: r.name.clone(),
            columns: r
                .columns
                .iter()
                .map(|c| {
                    let kind = types.kind(c.type_oid).cloned().unwrap_or(pg::values::TypeKind::Unsupported);
                    if kind == pg::values::TypeKind::Unsupported && reported.insert((qualified.clone(), c.name.clone())) {
                        warn!(table = %qualified, column = %c.name, pg_type = types.name(c.type_oid), "column type has no mapping: events whose policy names it are quarantined");
                    }
                    (c.name.clone(), kind)
                })
                .collect(),
        };
    // The row's key: the replica identity's columns, but under REPLICA IDENTITY FULL (every
    // column flagged) the primary key's.
    let key = if r.replica_identity == b'f' {
        let names = pg::primary_key(control, &r.namespace, &r.name).await?;
        r.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| names.contains(&c.name))
            .map(|(i, _)| i)
            .collect()
    } else {
        r.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect()
    };
    if let Some(old) = relations.get(&r.id) {
        let names = |s: &TableShape| s.columns.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let (before, now) = (names(&old.shape), names(&shape));
        let added: Vec<&String> = now.iter().filter(|c| !before.contains(c)).collect();
        let removed: Vec<&String> = before.iter().filter(|c| !now.contains(c)).collect();
        if !added.is_empty() || !removed.is_empty() {
            info!(table = %qualified, ?added, ?removed, "table columns changed (new columns reach the lake only when a policy names them)");
        }
    }
    relations.insert(
        r.id,
        Relation {
            key,
            shape,
            seen: seen.get(&qualified).cloned(),
        },
    );
    Ok(())
}
