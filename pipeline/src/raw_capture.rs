//! `sluice capture` with a `[raw_stream]`: the change events are pushed unsanitized into a Kafka
//! topic or Kinesis stream inside the trusted zone, for a separate worker pool (`sluice run`
//! on that topic) to sanitize. Nothing is written to the lake.
//!
//! Each message is one Debezium event keyed by `schema.table` and its primary-key values, so
//! the changes of one row stay in order on one partition (shard).
//!
//! At least once, as Kafka Connect source connectors are: messages are acknowledged by the
//! broker before the positions that cover them are checkpointed (an atomically replaced JSON
//! file) and before the slot is acknowledged; a crash in between sends them again. Each event
//! carries `source.lsn` and `source.txId` for de-duplication downstream.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError};
use sluice_connectors::SourcePosition;
use tracing::info;

use crate::config::PublishConfig;
use crate::publish::Publisher;
use crate::runtime::RunError;
use sluice_connectors::postgres::PostgresSource;
use sluice_connectors::source::Chunk;
use sluice_connectors::source::{ChunkSender, ReaderEnd, Source};

/// How often positions are checkpointed (after a broker flush), at most.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
const IN_FLIGHT_CHUNKS: usize = 8;

#[derive(Debug, Default)]
pub struct RawSummary {
    pub events: u64,
    pub checkpoints: u64,
}

/// Runs until the source is done (`--once`) or fails.
pub fn run_raw(source: &mut PostgresSource, target: &PublishConfig, checkpoint: &Path) -> Result<RawSummary, RunError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let publisher = rt.block_on(Publisher::open(target))?;
    let mut summary = RawSummary::default();
    loop {
        let streams = source.begin_pass()?;
        let mut positions = read_checkpoint(checkpoint)?;
        let start: HashMap<String, u64> = streams
            .iter()
            .filter_map(|s| positions.get(s).map(|&o| (s.clone(), o)))
            .collect();
        let keys = source.primary_keys.clone();
        let reporter = source.progress_reporter();
        let (chunk_tx, chunk_rx) = bounded::<Chunk>(IN_FLIGHT_CHUNKS);
        let (permit_tx, permit_rx) = bounded::<()>(IN_FLIGHT_CHUNKS);
        let stop = Arc::new(AtomicBool::new(false));
        let reading: &mut PostgresSource = &mut *source;
        let (result, reader) = std::thread::scope(|scope| {
            let mut out = ChunkSender::new(
                chunk_tx,
                permit_tx,
                Arc::new(AtomicBool::new(false)),
                stop.clone(),
                crate::runtime::source_hooks(),
            );
            let reader = std::thread::Builder::new()
                .name("sluice-reader".into())
                .spawn_scoped(scope, move || reading.read(&start, &mut out))
                .expect("spawn reader");
            let mut save = |positions: &BTreeMap<String, u64>| -> Result<(), RunError> {
                rt.block_on(publisher.flush())?;
                write_checkpoint(checkpoint, positions)?;
                if let Some(report) = &reporter {
                    let done: Vec<SourcePosition> = positions
                        .iter()
                        .map(|(stream, &offset)| SourcePosition {
                            stream: stream.clone(),
                            offset: offset as i64,
                        })
                        .collect();
                    report(&done);
                }
                summary.checkpoints += 1;
                Ok(())
            };
            let result = (|| {
                let (mut dirty, mut at_boundary, mut saved) = (false, true, Instant::now());
                loop {
                    match chunk_rx.recv_timeout(Duration::from_millis(200)) {
                        Ok(chunk) => {
                            let _ = permit_rx.try_recv();
                            let messages: Vec<(String, Vec<u8>)> = chunk
                                .lines
                                .iter()
                                .map(|&(s, e, _)| {
                                    let line = &chunk.data[s..e];
                                    (message_key(line, &keys), line.to_vec())
                                })
                                .collect();
                            summary.events += messages.len() as u64;
                            rt.block_on(publisher.publish_messages(messages))?;
                            positions.insert(chunk.stream.to_string(), chunk.last_offset());
                            (dirty, at_boundary) = (true, chunk.boundary);
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    // Positions are saved between transactions only (like the lake's commits).
                    if dirty && at_boundary && saved.elapsed() >= CHECKPOINT_EVERY {
                        save(&positions)?;
                        (dirty, saved) = (false, Instant::now());
                    }
                }
                if dirty && at_boundary {
                    save(&positions)?;
                }
                Ok::<_, RunError>(())
            })();
            stop.store(true, Ordering::SeqCst);
            drop(chunk_rx);
            (result, reader.join())
        });
        let end = reader.map_err(|_| RunError::WorkerLost)??;
        result?;
        if end == ReaderEnd::Done {
            source.finish();
            info!(events = summary.events, "raw capture finished");
            return Ok(summary);
        }
    }
}

/// `schema.table` and the primary-key values: `public.orders:[42]`.
fn message_key(line: &[u8], keys: &HashMap<String, Vec<String>>) -> String {
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(line) else {
        return String::new();
    };
    let table = format!(
        "{}.{}",
        event["source"]["schema"].as_str().unwrap_or_default(),
        event["source"]["table"].as_str().unwrap_or_default()
    );
    let image = if event["after"].is_object() {
        &event["after"]
    } else {
        &event["before"]
    };
    match keys.get(&table).filter(|k| !k.is_empty() && image.is_object()) {
        Some(columns) => {
            let values: Vec<&serde_json::Value> = columns.iter().map(|c| &image[c]).collect();
            format!(
                "{table}:{}",
                serde_json::Value::from(values.into_iter().cloned().collect::<Vec<_>>())
            )
        }
        None => table,
    }
}

fn read_checkpoint(path: &Path) -> Result<BTreeMap<String, u64>, RunError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RunError::Spool(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(RunError::Spool(format!("{}: {e}", path.display()))),
    }
}

fn write_checkpoint(path: &Path, positions: &BTreeMap<String, u64>) -> Result<(), RunError> {
    let fail = |e: std::io::Error| RunError::Spool(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, serde_json::to_vec(positions).expect("positions serialize")).map_err(fail)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_messages_are_keyed_by_table_and_primary_key() {
        let keys = HashMap::from([("public.orders".to_string(), vec!["id".to_string()])]);
        let insert =
            br#"{"op":"c","before":null,"after":{"id":42,"x":"a"},"source":{"schema":"public","table":"orders"}}"#;
        assert_eq!(message_key(insert, &keys), "public.orders:[42]");
        let delete =
            br#"{"op":"d","before":{"id":42,"x":"a"},"after":null,"source":{"schema":"public","table":"orders"}}"#;
        assert_eq!(message_key(delete, &keys), "public.orders:[42]");
        let truncate = br#"{"op":"t","before":null,"after":null,"source":{"schema":"public","table":"orders"}}"#;
        assert_eq!(message_key(truncate, &keys), "public.orders");
    }
}
