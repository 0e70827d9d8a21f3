//! Amazon Kinesis Data Streams (or a compatible endpoint): shard listing, iterators and reads
//! with throttling handled, and a publisher of sanitized rows.
//!
//! Positions: a shard's stream is `kinesis/<stream>/<shard id>`; its offset counts the records
//! the lake has taken from the shard. A sequence number (up to 128 bits, written as up to 56
//! decimal digits) does not fit a Delta `txn` version, so it is committed beside the count in
//! the same commit, split into [`SEQUENCE_PARTS`] `txn` entries of 15 digits
//! ([`sequence_to_parts`]); so is the sequence number of the first record the lake took (the
//! base every count is relative to); a finished shard gets a `done` entry.

mod config;
mod source;
pub use config::KinesisSourceConfig;

use std::time::Duration;

use aws_sdk_kinesis::error::{DisplayErrorContext, SdkError};
use aws_sdk_kinesis::primitives::{Blob, DateTime};
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, Record, ShardIteratorType};
use aws_sdk_kinesis::Client;

#[derive(Debug, thiserror::Error)]
pub enum KinesisError {
    #[error("kinesis stream {stream}: {message}")]
    Api { stream: String, message: String },
    #[error("kinesis stream {stream}, shard {shard}: a sequence number of {digits} characters is not a decimal of at most 60 digits")]
    SequenceTooLong {
        stream: String,
        shard: String,
        digits: usize,
    },
    #[error("kinesis stream {stream}: {failed} records not accepted after retries")]
    Undelivered { stream: String, failed: usize },
}

/// Where to find the service.
#[derive(Debug, Clone, Default)]
pub struct KinesisSettings {
    /// When unset, the standard AWS chain (environment, profile) decides.
    pub region: Option<String>,
    /// An emulator or a VPC endpoint.
    pub endpoint: Option<String>,
}

/// A client with credentials from the standard AWS chain.
pub(crate) async fn client(settings: &KinesisSettings) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &settings.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &settings.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    Client::new(&loader.load().await)
}

/// The stream name of a shard (also the `txn` application id suffix).
pub(crate) fn stream_name(stream: &str, shard: &str) -> String {
    format!("kinesis/{stream}/{shard}")
}

pub(crate) const SEQUENCE_PARTS: usize = 4;
const PART_DIGITS: usize = 15;

/// The `txn` names kept beside a shard's count.
pub(crate) struct AttachedNames {
    /// The last record's sequence number, in parts.
    pub sequence: [String; SEQUENCE_PARTS],
    /// The first record's sequence number (count 1), in parts.
    pub base: [String; SEQUENCE_PARTS],
    /// 1 once the shard is closed and fully read.
    pub done: String,
}

impl AttachedNames {
    pub(crate) fn of(shard_stream: &str) -> Self {
        Self {
            sequence: std::array::from_fn(|i| format!("{shard_stream}@seq{i}")),
            base: std::array::from_fn(|i| format!("{shard_stream}@base{i}")),
            done: format!("{shard_stream}@done"),
        }
    }

    /// All of them: sequence parts, base parts, done.
    pub(crate) fn all(&self) -> impl Iterator<Item = &String> {
        self.sequence
            .iter()
            .chain(&self.base)
            .chain(std::iter::once(&self.done))
    }
}

/// A decimal sequence number as [`SEQUENCE_PARTS`] numbers of 15 digits (most significant
/// first); `None` if it is not decimal or longer than 60 digits.
pub(crate) fn sequence_to_parts(sequence: &str) -> Option<[i64; SEQUENCE_PARTS]> {
    let total = SEQUENCE_PARTS * PART_DIGITS;
    if sequence.is_empty() || sequence.len() > total || !sequence.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let padded = format!("{sequence:0>total$}");
    let mut parts = [0i64; SEQUENCE_PARTS];
    for (i, part) in parts.iter_mut().enumerate() {
        *part = padded[i * PART_DIGITS..(i + 1) * PART_DIGITS].parse().ok()?;
    }
    Some(parts)
}

pub(crate) fn parts_to_sequence(parts: &[i64; SEQUENCE_PARTS]) -> String {
    let joined: String = parts.iter().map(|p| format!("{p:0>PART_DIGITS$}")).collect();
    let trimmed = joined.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ShardInfo {
    pub id: String,
    pub parents: Vec<String>,
}

fn api_error<E: std::error::Error + 'static, R: std::fmt::Debug>(stream: &str, e: SdkError<E, R>) -> KinesisError {
    KinesisError::Api {
        stream: stream.to_string(),
        message: DisplayErrorContext(e).to_string(),
    }
}

/// Every shard of the stream, open or closed (within the retention period).
pub(crate) async fn list_shards(client: &Client, stream: &str) -> Result<Vec<ShardInfo>, KinesisError> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let request = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let out = request.send().await.map_err(|e| api_error(stream, e))?;
        for s in out.shards() {
            shards.push(ShardInfo {
                id: s.shard_id().to_string(),
                parents: s
                    .parent_shard_id()
                    .into_iter()
                    .chain(s.adjacent_parent_shard_id())
                    .map(str::to_string)
                    .collect(),
            });
        }
        token = out.next_token().map(str::to_string);
        if token.is_none() {
            return Ok(shards);
        }
    }
}

/// Where a shard iterator starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartingPoint {
    TrimHorizon,
    Latest,
    At(String),
    After(String),
    /// Milliseconds since the epoch.
    AtTimestamp(i64),
}

pub(crate) async fn shard_iterator(
    client: &Client,
    stream: &str,
    shard: &str,
    start: &StartingPoint,
) -> Result<Option<String>, KinesisError> {
    let request = client.get_shard_iterator().stream_name(stream).shard_id(shard);
    let request = match start {
        StartingPoint::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        StartingPoint::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
        StartingPoint::At(seq) => request
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .starting_sequence_number(seq),
        StartingPoint::After(seq) => request
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(seq),
        StartingPoint::AtTimestamp(ms) => request
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(DateTime::from_millis(*ms)),
    };
    let out = request.send().await.map_err(|e| api_error(stream, e))?;
    Ok(out.shard_iterator().map(str::to_string))
}

/// One `GetRecords` answer.
pub(crate) enum Fetched {
    Records {
        records: Vec<Record>,
        /// `None`: the shard is closed and fully read.
        next: Option<String>,
        millis_behind_latest: Option<i64>,
    },
    /// Over the shard's read limit: back off and retry the same iterator.
    Throttled,
    /// The iterator is older than five minutes: get a new one.
    Expired,
}

pub(crate) async fn get_records(
    client: &Client,
    stream: &str,
    iterator: &str,
    limit: i32,
) -> Result<Fetched, KinesisError> {
    match client.get_records().shard_iterator(iterator).limit(limit).send().await {
        Ok(out) => Ok(Fetched::Records {
            next: out.next_shard_iterator().map(str::to_string),
            millis_behind_latest: out.millis_behind_latest(),
            records: out.records,
        }),
        Err(e) => match e.as_service_error() {
            Some(s) if s.is_provisioned_throughput_exceeded_exception() || s.is_kms_throttling_exception() => {
                Ok(Fetched::Throttled)
            }
            Some(s) if s.is_expired_iterator_exception() => Ok(Fetched::Expired),
            _ => Err(api_error(stream, e)),
        },
    }
}

/// Publishes sanitized rows to a stream (`PutRecords`, 500 per call), partition key = subject
/// token. At least once, like the Kafka publisher: every call is complete (failed records
/// retried) before it returns, hence before the lake commit.
pub struct KinesisPublisher {
    client: Client,
    stream: String,
}

const PUT_BATCH: usize = 500;
const PUT_RETRIES: u32 = 8;

impl KinesisPublisher {
    /// A publisher to `stream`, with credentials from the standard AWS chain.
    pub async fn connect(settings: &KinesisSettings, stream: &str) -> Self {
        Self {
            client: client(settings).await,
            stream: stream.to_string(),
        }
    }

    pub async fn put(&self, rows: Vec<(String, Vec<u8>)>) -> Result<(), KinesisError> {
        let mut entries: Vec<PutRecordsRequestEntry> = Vec::with_capacity(rows.len());
        for (key, payload) in rows {
            // Kinesis wants a partition key of 1–256 characters.
            let key = if key.is_empty() { "-".to_string() } else { key };
            let entry = PutRecordsRequestEntry::builder()
                .data(Blob::new(payload))
                .partition_key(key)
                .build()
                .map_err(|e| KinesisError::Api {
                    stream: self.stream.clone(),
                    message: e.to_string(),
                })?;
            entries.push(entry);
        }
        for batch in entries.chunks(PUT_BATCH) {
            self.put_batch(batch.to_vec()).await?;
        }
        Ok(())
    }

    async fn put_batch(&self, mut batch: Vec<PutRecordsRequestEntry>) -> Result<(), KinesisError> {
        let mut backoff = Duration::from_millis(100);
        for _ in 0..PUT_RETRIES {
            let out = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(batch.clone()))
                .send()
                .await;
            match out {
                Ok(out) if out.failed_record_count().unwrap_or(0) == 0 => return Ok(()),
                Ok(out) => {
                    // Keep only the records that failed (throttled shards), in order.
                    batch = batch
                        .into_iter()
                        .zip(out.records())
                        .filter(|(_, r)| r.error_code().is_some())
                        .map(|(e, _)| e)
                        .collect();
                }
                Err(e) => match e.as_service_error() {
                    Some(s) if s.is_provisioned_throughput_exceeded_exception() => {}
                    _ => return Err(api_error(&self.stream, e)),
                },
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        Err(KinesisError::Undelivered {
            stream: self.stream.clone(),
            failed: batch.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_round_trip_through_txn_parts() {
        for seq in [
            "49680444788786226373483267109757749180473080852286275586",
            "1",
            "0",
            "100000000000000000000000000000",
            &"9".repeat(60),
        ] {
            let parts = sequence_to_parts(seq).unwrap();
            assert!(parts.iter().all(|p| (0..10i64.pow(15)).contains(p)));
            assert_eq!(parts_to_sequence(&parts), seq);
        }
        assert!(sequence_to_parts(&"1".repeat(61)).is_none());
        assert!(sequence_to_parts("12a").is_none());
        assert!(sequence_to_parts("").is_none());
    }
}
