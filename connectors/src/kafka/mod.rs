//! Kafka: a consumer-group source whose positions live in the lake, and a publisher of
//! sanitized rows.
//!
//! Positions: a partition's stream is `kafka/<topic>/<partition>` and its offset the next Kafka
//! offset to read. On every assignment the consumer starts each partition at the position the
//! lake holds ([`StartPositions`]), not at Kafka's committed offset — that one is written after
//! the lake commit, for lag monitoring only.

mod config;
mod source;
pub use config::KafkaSourceConfig;
pub(crate) use source::ReplayRange;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::secret::{Secret, SecretError};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    #[error("kafka: {0}")]
    Client(#[from] KafkaError),
    #[error("kafka: reading start positions from the lake for {streams}: {message}")]
    Positions { streams: String, message: String },
    #[error("kafka: publishing sanitized rows to topic {topic}: {failed} messages not delivered")]
    Undelivered { topic: String, failed: u64 },
    /// The broker refused the credentials or the TLS handshake failed: retrying cannot help.
    #[error("kafka: {setting}: {reason}")]
    Security { setting: String, reason: String },
    #[error("kafka: {0}")]
    Secret(#[from] SecretError),
}

/// The stream name of a partition (also the `txn` application id suffix).
pub(crate) fn stream_name(topic: &str, partition: i32) -> String {
    format!("kafka/{topic}/{partition}")
}

/// Where the lake says each stream continues, asked on every assignment. `None`: never
/// committed (start per the `start` setting).
pub(crate) trait StartPositions: Send + Sync + 'static {
    fn start_offsets(&self, streams: &[String]) -> Result<Vec<Option<i64>>, String>;
}

/// Where a partition with no committed position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Earliest,
    Latest,
}

/// Client settings shared by the source and the publisher.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    /// Extra librdkafka properties (e.g. `fetch.max.bytes`), applied last; the ones sluice
    /// manages (security among them) are refused by the config loader.
    pub properties: BTreeMap<String, String>,
    pub security: KafkaSecurity,
}

/// TLS and SASL. Credentials are named (an environment variable, a file), never written in the
/// configuration, and read when a client is created.
#[derive(Debug, Clone, Default)]
pub struct KafkaSecurity {
    /// The config section these come from (`source`, `publish`, `raw_stream`), for errors.
    pub section: String,
    pub tls: Option<TlsSettings>,
    pub sasl: Option<SaslSettings>,
}

#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// PEM CA certificate(s) the broker's certificate must chain to (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS: the client's PEM certificate and private key.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The environment variable holding the private key's passphrase, if it has one.
    pub key_password_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    pub const NAMES: &'static [&'static str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "PLAIN" => Self::Plain,
            "SCRAM-SHA-256" => Self::ScramSha256,
            "SCRAM-SHA-512" => Self::ScramSha512,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SaslSettings {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: PasswordSource,
}

/// Where a password is read from.
#[derive(Debug, Clone)]
pub enum PasswordSource {
    Env(String),
    File(PathBuf),
}

impl KafkaSettings {
    /// Plain settings (no TLS, no SASL).
    pub fn plain(brokers: &str) -> Self {
        Self {
            brokers: brokers.to_string(),
            properties: BTreeMap::new(),
            security: KafkaSecurity::default(),
        }
    }

    fn client_config(&self) -> Result<ClientConfig, KafkaSourceError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set_log_level(RDKafkaLogLevel::Warning);
        let security = &self.security;
        let protocol = match (&security.tls, &security.sasl) {
            (None, None) => "plaintext",
            (Some(_), None) => "ssl",
            (None, Some(_)) => "sasl_plaintext",
            (Some(_), Some(_)) => "sasl_ssl",
        };
        config.set("security.protocol", protocol);
        if let Some(tls) = &security.tls {
            let path = |p: &PathBuf| p.display().to_string();
            if let Some(ca) = &tls.ca_file {
                config.set("ssl.ca.location", path(ca));
            }
            if let Some(cert) = &tls.cert_file {
                config.set("ssl.certificate.location", path(cert));
            }
            if let Some(key) = &tls.key_file {
                config.set("ssl.key.location", path(key));
            }
            if let Some(var) = &tls.key_password_env {
                config.set(
                    "ssl.key.password",
                    Secret::from_env(var, "tls.key_password_env")?.expose(),
                );
            }
        }
        if let Some(sasl) = &security.sasl {
            let password = match &sasl.password {
                PasswordSource::Env(var) => Secret::from_env(var, "sasl.password_env")?,
                PasswordSource::File(path) => Secret::from_file(path, "sasl.password_file")?,
            };
            config
                .set("sasl.mechanism", sasl.mechanism.name())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", password.expose());
        }
        Ok(config)
    }

    /// A failure no retry can mend, from librdkafka's error callback: refused credentials, or a
    /// TLS handshake the broker's or our certificate fails. Names the settings to look at.
    fn security_failure(&self, error: &KafkaError, reason: &str) -> Option<KafkaSourceError> {
        let section = &self.security.section;
        let setting = match error.rdkafka_error_code()? {
            RDKafkaErrorCode::Authentication => {
                format!("{section}.sasl (mechanism, username, password_env/password_file)")
            }
            RDKafkaErrorCode::SSL if reason.contains("handshake") || reason.contains("certificate") => {
                format!("{section}.tls (ca_file; cert_file and key_file for mutual TLS)")
            }
            _ => return None,
        };
        Some(KafkaSourceError::Security {
            setting,
            reason: reason.to_string(),
        })
    }

    fn apply_properties(&self, config: &mut ClientConfig) {
        for (k, v) in &self.properties {
            config.set(k, v);
        }
    }
}

/// Consumer lag (messages between what was read and the partitions' high watermarks, summed
/// over the partitions being fetched), from librdkafka's statistics: the watermarks come with
/// every fetch, so this needs no extra request. -1 while unknown.
#[derive(Clone)]
pub struct Lag(Arc<AtomicI64>);

impl Default for Lag {
    fn default() -> Self {
        Self(Arc::new(AtomicI64::new(-1)))
    }
}

impl Lag {
    pub fn get(&self) -> Option<u64> {
        u64::try_from(self.0.load(Ordering::Relaxed)).ok()
    }

    fn record(&self, statistics: &Statistics) {
        // Behind what this consumer has read (high watermark − next offset to hand out), over
        // the partitions it is fetching now; Kafka's own `consumer_lag` needs committed offsets,
        // which replays never write.
        let lags: Vec<i64> = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.fetch_state == "active")
            .filter_map(|p| {
                if p.hi_offset >= 0 && p.app_offset >= 0 {
                    Some((p.hi_offset - p.app_offset).max(0))
                } else {
                    (p.consumer_lag >= 0).then_some(p.consumer_lag)
                }
            })
            .collect();
        let lag = if lags.is_empty() { -1 } else { lags.iter().sum() };
        self.0.store(lag, Ordering::Relaxed);
    }
}

/// How often librdkafka reports statistics (the lag).
const STATISTICS_INTERVAL_MS: &str = "1000";

/// A consumer outside any group: its lag only.
/// librdkafka's logs and errors through `tracing`, and its statistics into the context's `lag`
/// (the same for every consumer context; a macro because `ClientContext` is not ours).
macro_rules! client_context_with_lag {
    ($context:ty) => {
        impl ClientContext for $context {
            fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
                log_librdkafka(level, fac, message);
            }

            fn error(&self, error: KafkaError, reason: &str) {
                if let Some(failure) = self.settings.security_failure(&error, reason) {
                    self.security_failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(failure);
                }
                log_client_error(error, reason);
            }

            fn stats(&self, statistics: Statistics) {
                self.lag.record(&statistics);
            }
        }
    };
}

pub(crate) struct StandaloneContext {
    pub lag: Lag,
    settings: KafkaSettings,
    security_failure: Mutex<Option<KafkaSourceError>>,
}

impl StandaloneContext {
    /// Refused credentials or a failed TLS handshake, once librdkafka has reported one.
    pub(crate) fn take_failure(&self) -> Option<KafkaSourceError> {
        self.security_failure.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

client_context_with_lag!(StandaloneContext);

impl ConsumerContext for StandaloneContext {}

// librdkafka's own log lines carry broker names and error codes, never message contents.
fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            error!(facility = fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Warning => warn!(facility = fac, "librdkafka: {message}"),
        _ => debug!(facility = fac, "librdkafka: {message}"),
    }
}

fn log_client_error(error: KafkaError, reason: &str) {
    // The end of a partition arrives here too: not a problem.
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
        debug!("kafka client: {reason}");
        return;
    }
    // Broker down, connection refused…: librdkafka retries with backoff by itself.
    warn!(error = %error, "kafka client: {reason}");
}

/// Rebalance handling: every assignment starts at the lake's positions, and every change of
/// assignment bumps a generation the reader watches (it then abandons its uncommitted work).
pub(crate) struct GroupContext {
    positions: Box<dyn StartPositions>,
    start_at: StartAt,
    generation: AtomicU64,
    failure: Mutex<Option<KafkaSourceError>>,
    settings: KafkaSettings,
    security_failure: Mutex<Option<KafkaSourceError>>,
    pub lag: Lag,
}

impl GroupContext {
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// An error raised inside a rebalance callback, where it cannot be returned, or refused
    /// credentials or a failed TLS handshake reported by librdkafka.
    pub(crate) fn take_failure(&self) -> Option<KafkaSourceError> {
        let failure = self.failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        failure.or_else(|| self.security_failure.lock().unwrap_or_else(|p| p.into_inner()).take())
    }

    fn fail(&self, e: KafkaSourceError) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    /// Where each stream starts per the lake (as on assignment), for a pass that must seek back.
    pub(crate) fn start_offsets(&self, streams: &[String]) -> Result<Vec<Offset>, KafkaSourceError> {
        let offsets = self
            .positions
            .start_offsets(streams)
            .map_err(|message| KafkaSourceError::Positions {
                streams: streams.join(", "),
                message,
            })?;
        Ok(offsets
            .into_iter()
            .map(|o| o.map(Offset::Offset).unwrap_or(self.default_offset()))
            .collect())
    }

    fn default_offset(&self) -> Offset {
        match self.start_at {
            StartAt::Earliest => Offset::Beginning,
            StartAt::Latest => Offset::End,
        }
    }
}

client_context_with_lag!(GroupContext);

impl ConsumerContext for GroupContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                let streams: Vec<String> = parts.iter().map(|(t, p)| stream_name(t, *p)).collect();
                match self.positions.start_offsets(&streams) {
                    Ok(offsets) => {
                        for ((topic, partition), offset) in parts.iter().zip(offsets) {
                            let offset = offset.map(Offset::Offset).unwrap_or(self.default_offset());
                            if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                                self.fail(e.into());
                            }
                        }
                    }
                    // The partitions are still taken (the protocol requires it); the reader
                    // sees the failure before reading anything.
                    Err(message) => self.fail(KafkaSourceError::Positions {
                        streams: streams.join(", "),
                        message,
                    }),
                }
                if let Err(e) = consumer.assign(tpl) {
                    self.fail(e.into());
                }
                info!(partitions = %streams.join(", "), "kafka: partitions assigned");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if let Err(e) = consumer.unassign() {
                    warn!(error = %e, "kafka: unassign failed");
                }
                info!("kafka: partitions revoked");
            }
            other => {
                warn!(code = ?other, "kafka: rebalance error");
                let _ = consumer.unassign();
            }
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Consumer-group settings.
pub(crate) struct GroupSettings {
    pub group_id: String,
    /// Topic names, or regular expressions starting with `^`.
    pub topics: Vec<String>,
    pub start_at: StartAt,
    pub session_timeout_ms: u32,
}

/// Joins the group and subscribes. The consumer is polled by one thread; the context reports
/// assignments.
pub(crate) fn group_consumer(
    settings: &KafkaSettings,
    group: &GroupSettings,
    positions: Box<dyn StartPositions>,
) -> Result<BaseConsumer<GroupContext>, KafkaSourceError> {
    let mut config = settings.client_config()?;
    config
        .set("group.id", &group.group_id)
        // The lake holds the positions; Kafka's committed offsets only report lag.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // A lake position outside the log (retention deleted unread events, or the topic was
        // recreated) must stop the pipeline, not silently jump.
        .set("auto.offset.reset", "error")
        .set("session.timeout.ms", group.session_timeout_ms.to_string())
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        .set("partition.assignment.strategy", "range,roundrobin");
    bounded_prefetch(&mut config);
    settings.apply_properties(&mut config);
    let context = GroupContext {
        positions,
        start_at: group.start_at,
        generation: AtomicU64::new(0),
        failure: Mutex::new(None),
        settings: settings.clone(),
        security_failure: Mutex::new(None),
        lag: Lag::default(),
    };
    let consumer: BaseConsumer<GroupContext> = config.create_with_context(context)?;
    let topics: Vec<&str> = group.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Prefetch is bounded: memory stays bounded however far behind the pipeline is. When it was
/// full (the workers behind: backpressure), the next fetch goes out 10 ms later, not after
/// librdkafka's default second: with it, the Kafka benchmark's workers idled half the time
/// (54,000–56,000 → 74,000–86,000 events/s end to end).
fn bounded_prefetch(config: &mut ClientConfig) {
    config
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.queue.backoff.ms", "10");
}

/// A consumer outside any group, for replays: partitions are assigned explicitly.
pub(crate) fn standalone_consumer(
    settings: &KafkaSettings,
) -> Result<BaseConsumer<StandaloneContext>, KafkaSourceError> {
    let mut config = settings.client_config()?;
    config
        .set("group.id", "sluice-replay")
        .set("auto.offset.reset", "error")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    bounded_prefetch(&mut config);
    settings.apply_properties(&mut config);
    Ok(config.create_with_context(StandaloneContext {
        lag: Lag::default(),
        settings: settings.clone(),
        security_failure: Mutex::new(None),
    })?)
}

/// The partitions of `topic`, from the broker's metadata.
pub(crate) fn partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, KafkaSourceError> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut out = Vec::new();
    for t in metadata.topics() {
        if let Some(e) = t.error() {
            return Err(KafkaError::MetadataFetch(e.into()).into());
        }
        out.extend(t.partitions().iter().map(|p| p.id()));
    }
    out.sort_unstable();
    Ok(out)
}

/// Assigns `(topic, partition, offset)` explicitly (replays).
pub(crate) fn assign<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    parts: &[(String, i32, Offset)],
) -> KafkaResult<()> {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in parts {
        tpl.add_partition_offset(topic, *partition, *offset)?;
    }
    consumer.assign(&tpl)
}

/// Pauses or resumes every assigned partition (backpressure: stop fetching rather than buffer).
pub(crate) fn set_paused<C: ConsumerContext>(consumer: &BaseConsumer<C>, paused: bool) -> KafkaResult<()> {
    let assignment = consumer.assignment()?;
    if assignment.count() == 0 {
        return Ok(());
    }
    if paused {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    }
}

/// Writes the lake's positions to Kafka's offset store after a lake commit, so the usual lag
/// tools see the group's progress. Failures (e.g. a partition moved on) only cost monitoring.
pub(crate) fn report_progress<C: ConsumerContext>(consumer: &BaseConsumer<C>, positions: &[(String, i32, i64)]) {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in positions {
        if tpl
            .add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .is_err()
        {
            return;
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            debug!(error = %e, "kafka: offset commit for lag monitoring failed");
        }
    }
}

/// Counts deliveries that failed, and keeps a refusal of the credentials or certificates;
/// checked before every lake commit.
pub(crate) struct DeliveryTracker {
    failed: AtomicU64,
    settings: KafkaSettings,
    security_failure: Mutex<Option<KafkaSourceError>>,
}

impl ClientContext for DeliveryTracker {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(failure) = self.settings.security_failure(&error, reason) {
            self.security_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(failure);
        }
        warn!(error = %error, "kafka publisher: {reason}");
    }
}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            // The message is not shown: it is sanitized, but errors stay free of row data.
            warn!(error = %e, "kafka publisher: delivery failed");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Publishes sanitized rows to one topic, keyed by subject token. At least once: the rows of
/// a batch are flushed (acknowledged by the broker) before the lake commit that covers them,
/// so a crash in between republishes them; consumers de-duplicate on `_table` + `_position`.
pub struct KafkaPublisher {
    topic: String,
    producer: ThreadedProducer<DeliveryTracker>,
}

impl KafkaPublisher {
    pub fn new(settings: &KafkaSettings, topic: &str) -> Result<Self, KafkaSourceError> {
        let mut config = settings.client_config()?;
        config
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("queue.buffering.max.kbytes", "65536")
            .set("linger.ms", "20");
        settings.apply_properties(&mut config);
        Ok(Self {
            topic: topic.to_string(),
            producer: config.create_with_context(DeliveryTracker {
                failed: AtomicU64::new(0),
                settings: settings.clone(),
                security_failure: Mutex::new(None),
            })?,
        })
    }

    /// Queues one message; waits (backpressure) while the local queue is full.
    pub fn send(&self, key: &[u8], payload: &[u8]) -> Result<(), KafkaSourceError> {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                // The producer's own thread drains the queue; wait for room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Waits until every queued message is acknowledged; fails if any was not delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaSourceError> {
        let flushed = self.producer.flush(timeout);
        let context = self.producer.context();
        if let Some(failure) = context
            .security_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(failure);
        }
        flushed?;
        let failed = self.producer.context().failed.swap(0, Ordering::Relaxed);
        if failed > 0 {
            return Err(KafkaSourceError::Undelivered {
                topic: self.topic.clone(),
                failed,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_prefetch_is_fetched_again_as_soon_as_the_workers_drain_it() {
        let mut config = ClientConfig::new();
        bounded_prefetch(&mut config);
        assert_eq!(config.get("queued.max.messages.kbytes"), Some("16384"));
        // librdkafka's default waits a whole second before fetching a partition whose prefetch
        // was full, leaving the workers idle once they have caught up.
        let backoff: u64 = config
            .get("fetch.queue.backoff.ms")
            .expect("set")
            .parse()
            .expect("a number");
        assert!(backoff <= 20, "{backoff} ms");
    }
}
