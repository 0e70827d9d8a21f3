//! What a running sluice shows its operators over HTTP (`[http] listen`): Prometheus metrics on
//! `/metrics`, liveness on `/health`, readiness on `/ready`. Label values are names only —
//! tables, columns, formats, quarantine reasons, source kinds — never a value of the data.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::summary::{shown_name, Summary};

/// The label sets, one type per set: a metric takes only its own labels.
mod labels {
    use prometheus_client::encoding::EncodeLabelSet;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Table {
        pub table: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct TableColumn {
        pub table: String,
        pub column: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct TableFormat {
        pub table: String,
        pub format: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Format {
        pub format: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Reason {
        pub reason: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Kind {
        pub kind: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Source {
        pub source: String,
    }
}
use labels::{Format, Kind, Reason, Table, TableColumn, TableFormat};

type HistogramFamily = Family<Format, Histogram, fn() -> Histogram>;

/// Distinct table/column names a label takes at most; later ones count as `(other)` (a schema
/// that drifts without end must not grow the scrape without end).
const MAX_LABELLED_NAMES: usize = 1000;
const OTHER: &str = "(other)";

pub struct Metrics {
    registry: Registry,
    events_read: Counter,
    rows_written: Family<Table, Counter>,
    vault_rows_written: Counter,
    quarantined: Family<Reason, Counter>,
    control_records: Family<Kind, Counter>,
    unknown_table_events: Family<Table, Counter>,
    dropped_fields: Family<TableColumn, Counter>,
    already_committed: Counter,
    erased_subject_rows: Counter,
    commits: Family<TableFormat, Counter>,
    commit_seconds: HistogramFamily,
    commit_rows: HistogramFamily,
    source_lag: Family<labels::Source, Gauge>,
    key_cache_hits: Counter,
    key_cache_misses: Counter,
    erased_subjects: Gauge,
    last_commit_seconds: Gauge,
    uncommitted_events: Gauge,
    names: Mutex<HashSet<(String, String)>>,
    /// Readiness: a pass has its sources and sinks open…
    connected: AtomicBool,
    /// …and the sink loop was idle or committed at this time (ms since epoch).
    fresh_ms: AtomicI64,
}

fn commit_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn commit_rows() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 12))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let m = Self {
            events_read: Counter::default(),
            rows_written: Family::default(),
            vault_rows_written: Counter::default(),
            quarantined: Family::default(),
            control_records: Family::default(),
            unknown_table_events: Family::default(),
            dropped_fields: Family::default(),
            already_committed: Counter::default(),
            erased_subject_rows: Counter::default(),
            commits: Family::default(),
            commit_seconds: Family::new_with_constructor(commit_seconds as fn() -> Histogram),
            commit_rows: Family::new_with_constructor(commit_rows as fn() -> Histogram),
            source_lag: Family::default(),
            key_cache_hits: Counter::default(),
            key_cache_misses: Counter::default(),
            erased_subjects: Gauge::default(),
            last_commit_seconds: Gauge::default(),
            uncommitted_events: Gauge::default(),
            names: Mutex::new(HashSet::new()),
            connected: AtomicBool::new(false),
            fresh_ms: AtomicI64::new(0),
            registry: Registry::default(),
        };
        // Name and help of each metric, in the order a scrape shows them.
        macro_rules! register {
            ($($field:ident => $name:literal, $help:literal;)*) => {
                $(registry.register($name, $help, m.$field.clone());)*
            };
        }
        register! {
            events_read => "events_read", "Events read from the source";
            rows_written => "rows_written", "Sanitized rows written, per target table";
            vault_rows_written => "vault_rows_written", "Rows written to the PII vault";
            quarantined => "quarantined", "Events quarantined, per reason";
            control_records => "control_records", "Records that are not row changes (transaction metadata, heartbeats, schema changes, messages), per kind";
            unknown_table_events => "unknown_table_events", "Events of tables no policy names, per source table";
            dropped_fields => "dropped_fields", "Values of columns no policy names, dropped (default deny), per source table and column";
            already_committed => "already_committed", "Rows re-read after a restart that the lake already held (skipped)";
            erased_subject_rows => "erased_subject_rows", "Rows of erased subjects dropped before sanitizing";
            commits => "commits", "Table commits, per table and format";
            commit_seconds => "commit_duration_seconds", "Time to write and commit a table's batch, per format";
            commit_rows => "commit_rows", "Rows per table commit, per format";
            source_lag => "source_lag", "How far the source is ahead of what was read (kafka: messages; kinesis: milliseconds; postgres: WAL bytes the slot retains)";
            key_cache_hits => "key_cache_hits", "Subject-key cache hits";
            key_cache_misses => "key_cache_misses", "Subject-key cache misses";
            erased_subjects => "erased_subjects", "Subjects erased (tombstones) this process knows of";
            last_commit_seconds => "last_commit_timestamp_seconds", "When the last table commit finished (Unix time)";
            uncommitted_events => "uncommitted_events", "Events read and written but not committed yet (read again after a crash)";
        }
        Self { registry, ..m }
    }

    /// The counters of a chunk just written, as the run's summary adds them up.
    pub fn record(&self, s: &Summary) {
        // Before the events are counted as read: a scrape that sees them read sees them
        // uncommitted until their commit.
        self.uncommitted_events.inc_by(s.events_read as i64);
        self.events_read.inc_by(s.events_read);
        for (table, n) in &s.rows_written {
            self.rows_written
                .get_or_create(&Table { table: table.clone() })
                .inc_by(*n);
        }
        self.vault_rows_written.inc_by(s.vault_rows_written);
        for (reason, n) in &s.quarantined {
            self.quarantined
                .get_or_create(&Reason { reason: reason.clone() })
                .inc_by(*n);
        }
        for (kind, n) in &s.control_records {
            self.control_records
                .get_or_create(&Kind { kind: kind.clone() })
                .inc_by(*n);
        }
        for (table, n) in &s.unknown_tables {
            let table = self.bounded(table, "");
            self.unknown_table_events
                .get_or_create(&Table { table: table.0 })
                .inc_by(*n);
        }
        for (table, columns) in &s.dropped_columns {
            for (column, n) in columns {
                let (table, column) = self.bounded(table, column);
                self.dropped_fields
                    .get_or_create(&TableColumn { table, column })
                    .inc_by(*n);
            }
        }
        self.already_committed.inc_by(s.already_committed);
        self.erased_subject_rows.inc_by(s.erased_subject_rows);
    }

    /// Names from the input (unknown tables, drifted columns) counted under their own label up
    /// to a bound, then as `(other)`.
    fn bounded(&self, table: &str, column: &str) -> (String, String) {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        // The worker shows names so already; a label is escaped by nothing else.
        let shown = |name: &str| {
            if name.is_empty() {
                String::new()
            } else {
                shown_name(name).into_owned()
            }
        };
        let key = (shown(table), shown(column));
        if names.contains(&key) || names.len() < MAX_LABELLED_NAMES {
            names.insert(key.clone());
            key
        } else {
            (
                OTHER.into(),
                if column.is_empty() { String::new() } else { OTHER.into() },
            )
        }
    }

    pub fn committed(&self, table: &str, format: &str, rows: usize, took: Duration) {
        self.commits
            .get_or_create(&TableFormat {
                table: table.to_string(),
                format: format.to_string(),
            })
            .inc();
        let format = Format {
            format: format.to_string(),
        };
        self.commit_seconds.get_or_create(&format).observe(took.as_secs_f64());
        self.commit_rows.get_or_create(&format).observe(rows as f64);
        let now = chrono::Utc::now().timestamp_millis();
        self.last_commit_seconds.set(now / 1000);
        self.fresh_ms.store(now, Ordering::Relaxed);
    }

    /// Everything read so far is committed (or was dropped with its pass).
    pub fn all_committed(&self) {
        self.uncommitted_events.set(0);
    }

    /// The key cache's hits and misses since the last call of this pass.
    pub fn key_cache(&self, hits: u64, misses: u64) {
        self.key_cache_hits.inc_by(hits);
        self.key_cache_misses.inc_by(misses);
    }

    pub fn erased_subjects(&self, known: usize) {
        self.erased_subjects.set(known as i64);
    }

    /// The lag gauge of a source kind: readers take it once and set it as often as they like
    /// (an atomic store, no label lookup).
    pub fn source_lag(&self, source: &'static str) -> Gauge {
        self.source_lag
            .get_or_create(&labels::Source {
                source: source.to_string(),
            })
            .clone()
    }

    /// Sources and sinks are open (a pass is running) or not.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        if connected {
            self.idle();
        }
    }

    /// The sink loop holds nothing uncommitted right now.
    pub fn idle(&self) {
        self.fresh_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Ready: a pass runs and its sink loop committed or was idle within `max_age`.
    pub fn ready(&self, max_age: Duration) -> Result<(), String> {
        if !self.connected.load(Ordering::Relaxed) {
            return Err("sources and sinks are not open".into());
        }
        let age_ms = chrono::Utc::now().timestamp_millis() - self.fresh_ms.load(Ordering::Relaxed);
        if age_ms > max_age.as_millis() as i64 {
            return Err(format!("no commit for {} s with rows waiting", age_ms / 1000));
        }
        Ok(())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Serves `/metrics`, `/health` and `/ready` on `listen` from a thread of its own; returns the
/// address bound (port 0 picks one).
pub fn serve(listen: &str, ready_max_age: Duration) -> std::io::Result<SocketAddr> {
    let server = tiny_http::Server::http(listen).map_err(std::io::Error::other)?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("not an IP address"))?;
    info!(address = %addr, "serving /metrics, /health and /ready");
    std::thread::Builder::new().name("sluice-http".into()).spawn(move || {
        for request in server.incoming_requests() {
            let (status, content_type, body) = match request.url().split('?').next().unwrap_or("") {
                "/metrics" => (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics().render(),
                ),
                "/health" => (200, "text/plain", "ok\n".to_string()),
                "/ready" => match metrics().ready(ready_max_age) {
                    Ok(()) => (200, "text/plain", "ready\n".to_string()),
                    Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
                },
                _ => (404, "text/plain", "not found\n".to_string()),
            };
            let header = tiny_http::Header::from_bytes("Content-Type", content_type).expect("a valid header");
            let response = tiny_http::Response::from_string(body)
                .with_status_code(status)
                .with_header(header);
            if let Err(e) = request.respond(response) {
                warn!(error = %e, "could not answer an HTTP request");
            }
        }
    })?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_follow_the_summary_and_bound_input_names() {
        let m = Metrics::new();
        let mut s = Summary {
            events_read: 7,
            vault_rows_written: 2,
            ..Default::default()
        };
        s.rows_written.insert("payments".into(), 5);
        s.quarantined.insert("malformed_json".into(), 1);
        s.dropped_columns
            .entry("public.customers".into())
            .or_default()
            .insert("ssn".into(), 3);
        m.record(&s);
        m.record(&s);
        m.committed("payments", "delta", 5, Duration::from_millis(20));
        let text = m.render();
        for line in [
            "sluice_events_read_total 14",
            "sluice_rows_written_total{table=\"payments\"} 10",
            "sluice_vault_rows_written_total 4",
            "sluice_quarantined_total{reason=\"malformed_json\"} 2",
            "sluice_dropped_fields_total{table=\"public.customers\",column=\"ssn\"} 6",
            "sluice_commits_total{table=\"payments\",format=\"delta\"} 1",
            "sluice_commit_duration_seconds_count{format=\"delta\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        // A name that would forge a sample if printed raw into a label.
        let mut forged = Summary::default();
        forged
            .dropped_columns
            .entry("t".into())
            .or_default()
            .insert("x\"} 1\nsluice_erased_subjects 424242\n# ".into(), 1);
        forged
            .unknown_tables
            .insert("y\"} 7\nsluice_events_read_total 99".into(), 1);
        m.record(&forged);
        let text = m.render();
        assert!(
            !text.contains("424242") && !text.lines().any(|l| l.starts_with("sluice_events_read_total 99")),
            "{text}"
        );
        assert!(text.contains("column=\"~"), "shown by its hash: {text}");
        for i in 0..MAX_LABELLED_NAMES + 5 {
            m.bounded("t", &format!("c{i}"));
        }
        assert_eq!(m.bounded("t", "new"), (OTHER.to_string(), OTHER.to_string()));
        assert!(m.ready(Duration::from_secs(60)).is_err(), "not connected yet");
        m.set_connected(true);
        assert!(m.ready(Duration::from_secs(60)).is_ok());
    }
}
