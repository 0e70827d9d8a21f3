//! The stream sink: sanitized analytic rows pushed out as JSON, one message per row keyed by
//! subject token, so downstream consumers (Firehose, Snowpipe, another lake) never see raw data.
//! Only what the policies let into the analytic tables is published: never the vault or the
//! quarantine.
//!
//! At least once: a batch's messages are acknowledged before the lake commit that covers them;
//! a crash in between publishes them again. Each message carries `_table` and `_position`, the
//! de-duplication key.

use std::time::Duration;

use arrow_array::{Array, RecordBatch, StringArray};
use sluice_connectors::kafka::KafkaPublisher;
use sluice_connectors::kinesis::KinesisPublisher;

use crate::config::PublishConfig;
use crate::runtime::RunError;

pub enum Publisher {
    Kafka(KafkaPublisher),
    Kinesis(KinesisPublisher),
}

const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

impl Publisher {
    pub async fn open(config: &PublishConfig) -> Result<Self, RunError> {
        Ok(match config {
            PublishConfig::Kafka { settings, topic } => Publisher::Kafka(KafkaPublisher::new(settings, topic)?),
            PublishConfig::Kinesis { settings, stream } => {
                Publisher::Kinesis(KinesisPublisher::connect(settings, stream).await)
            }
        })
    }

    /// Queues the rows of `batch` (a sanitized table's rows).
    pub async fn publish(&self, table: &str, batch: &RecordBatch) -> Result<(), RunError> {
        self.publish_messages(rows_as_json(table, batch)?).await
    }

    /// Queues (key, payload) messages as they are.
    pub async fn publish_messages(&self, messages: Vec<(String, Vec<u8>)>) -> Result<(), RunError> {
        match self {
            Publisher::Kafka(p) => {
                for (key, payload) in &messages {
                    p.send(key.as_bytes(), payload)?;
                }
            }
            // Each call returns once every record is accepted: nothing left to flush.
            Publisher::Kinesis(p) => p.put(messages).await?,
        }
        Ok(())
    }

    /// Waits until everything queued is acknowledged.
    pub async fn flush(&self) -> Result<(), RunError> {
        match self {
            Publisher::Kafka(p) => p.flush(FLUSH_TIMEOUT)?,
            Publisher::Kinesis(_) => {}
        }
        Ok(())
    }
}

/// (subject token, `{"_table": …, <columns>…}`) per row.
fn rows_as_json(table: &str, batch: &RecordBatch) -> Result<Vec<(String, Vec<u8>)>, RunError> {
    let mut lines = Vec::with_capacity(batch.num_rows() * 256);
    {
        // Explicit nulls: every row is a non-empty object, whatever is null in it.
        let mut writer = arrow_json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow_json::writer::LineDelimited>(&mut lines);
        writer.write(batch).map_err(RunError::Encode)?;
        writer.finish().map_err(RunError::Encode)?;
    }
    let subjects = batch
        .column_by_name("_subject")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
    let prefix = format!("{{\"_table\":{},", serde_json::Value::from(table));
    let mut out = Vec::with_capacity(batch.num_rows());
    for (row, line) in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()).enumerate() {
        let mut payload = Vec::with_capacity(prefix.len() + line.len());
        payload.extend_from_slice(prefix.as_bytes());
        payload.extend_from_slice(&line[1..]);
        let key = subjects
            .as_ref()
            .filter(|s| !s.is_null(row))
            .map(|s| s.value(row).to_string())
            .unwrap_or_default();
        out.push((key, payload));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Int64Array;
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn one_json_message_per_row_keyed_by_subject() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("amount", DataType::Int64, true),
            Field::new("_subject", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(5), None])),
                Arc::new(StringArray::from(vec![Some("tok1"), None])),
            ],
        )
        .unwrap();
        let rows = rows_as_json("payments", &batch).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0, "tok1");
        let first: serde_json::Value = serde_json::from_slice(&rows[0].1).unwrap();
        assert_eq!(
            first,
            serde_json::json!({"_table": "payments", "amount": 5, "_subject": "tok1"})
        );
        // An all-null row is still one message of its own.
        assert_eq!(rows[1].0, "");
        let second: serde_json::Value = serde_json::from_slice(&rows[1].1).unwrap();
        assert_eq!(
            second,
            serde_json::json!({"_table": "payments", "amount": null, "_subject": null})
        );
    }
}
