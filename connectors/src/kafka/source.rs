//! Kafka topics: a consumer group for the daemon, explicit partitions for replays.
//!
//! Exactly once across rebalances: partitions start where the lake says (see
//! `crate::kafka`); when the assignment changes, the pass is abandoned — its
//! uncommitted rows are dropped and re-read by whoever owns the partition now — and a commit
//! that races a new owner is refused by the Delta sink's fencing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka::{self as kc, GroupContext, KafkaSettings, Lag, StandaloneContext, StartAt, StartPositions};
use crate::lake::TableLocation;
use crate::SourcePosition;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Offset;
use tracing::{info, warn};

use crate::source::SourceError;
use crate::source::{Chunk, LineEnd};
use crate::source::{ChunkSender, ProgressReporter, ReaderEnd, ReplayFrom, ReplayTo, Sent, Source};

#[derive(Debug, Clone)]
pub(crate) struct ReplayRange {
    pub topics: Vec<String>,
    pub from: ReplayFrom,
    pub to: ReplayTo,
}

/// What the reader needs of a consumer's context: its assignment and its changes.
pub(crate) trait Membership {
    fn generation(&self) -> u64;
    fn take_failure(&self) -> Option<SourceError>;
    fn lag(&self) -> &Lag;
    /// Where the lake says each stream continues (group consumers only).
    fn lake_offsets(&self, streams: &[String]) -> Result<Vec<Offset>, SourceError>;
}

impl Membership for GroupContext {
    fn generation(&self) -> u64 {
        GroupContext::generation(self)
    }
    fn take_failure(&self) -> Option<SourceError> {
        GroupContext::take_failure(self).map(SourceError::from)
    }
    fn lag(&self) -> &Lag {
        &self.lag
    }
    fn lake_offsets(&self, streams: &[String]) -> Result<Vec<Offset>, SourceError> {
        Ok(self.start_offsets(streams)?)
    }
}

impl Membership for StandaloneContext {
    fn generation(&self) -> u64 {
        0
    }
    fn take_failure(&self) -> Option<SourceError> {
        StandaloneContext::take_failure(self).map(SourceError::from)
    }
    fn lag(&self) -> &Lag {
        &self.lag
    }
    fn lake_offsets(&self, streams: &[String]) -> Result<Vec<Offset>, SourceError> {
        Ok(vec![Offset::Beginning; streams.len()])
    }
}

/// Reads the lake's committed positions for a new assignment: per stream the lowest over every
/// sink (a sink that never committed the stream means: from the beginning).
pub(crate) struct LakePositions {
    pub tables: Vec<TableLocation>,
    pub app_prefix: String,
    pub start_at: StartAt,
}

impl StartPositions for LakePositions {
    fn start_offsets(&self, streams: &[String]) -> Result<Vec<Option<i64>>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let standings = rt
            .block_on(crate::lake::standings(&self.tables, &self.app_prefix, streams))
            .map_err(|e| e.to_string())?;
        // From the earliest, a table that never saw the stream (e.g. a new policy) gets it
        // all; from the latest, it starts where the others are.
        Ok(standings
            .into_iter()
            .map(|s| match self.start_at {
                StartAt::Earliest => s.resume_at(),
                _ => s.lowest,
            })
            .collect())
    }
}

struct Partition {
    topic: String,
    partition: i32,
    stream: Arc<str>,
    chunk: Chunk,
    /// Reached the end of the partition with nothing read since.
    at_end: bool,
    /// Replay: the end of the range is reached; further messages are ignored.
    done: bool,
    /// Replay from a time: the first message at or after it has been seen.
    started: bool,
}

enum Mode {
    Group,
    Replay { range: ReplayRange, topic_index: usize },
}

pub(crate) struct KafkaSource<C: ConsumerContext + Membership + 'static> {
    consumer: Arc<BaseConsumer<C>>,
    mode: Mode,
    max_event_bytes: usize,
    chunk_events: usize,
    once: bool,
    /// The assignment generation this pass reads under.
    generation: u64,
    /// The generation whose start offsets came from the lake (set in the rebalance callback):
    /// a later pass under the same generation must seek back to the committed positions.
    fresh_generation: Option<u64>,
    partitions: Vec<(String, i32)>,
    /// Events read (progress display).
    pub events: Arc<AtomicU64>,
}

/// The daemon's group consumer.
pub(crate) fn group_source(
    settings: &KafkaSettings,
    group: &kc::GroupSettings,
    positions: LakePositions,
    max_event_bytes: usize,
    chunk_events: usize,
    once: bool,
) -> Result<KafkaSource<GroupContext>, SourceError> {
    let consumer = kc::group_consumer(settings, group, Box::new(positions))?;
    Ok(KafkaSource::new(
        consumer,
        Mode::Group,
        max_event_bytes,
        chunk_events,
        once,
    ))
}

/// A replay of `range`, one topic per pass.
pub(crate) fn replay_source(
    settings: &KafkaSettings,
    range: ReplayRange,
    max_event_bytes: usize,
    chunk_events: usize,
) -> Result<KafkaSource<StandaloneContext>, SourceError> {
    let consumer = kc::standalone_consumer(settings)?;
    Ok(KafkaSource::new(
        consumer,
        Mode::Replay { range, topic_index: 0 },
        max_event_bytes,
        chunk_events,
        true,
    ))
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
/// Partial chunks are handed on at least this often, so a quiet topic still commits.
const FLUSH_EVERY: Duration = Duration::from_millis(250);
const LAG_LOG_EVERY: Duration = Duration::from_secs(30);
/// How long the reader may wait for the workers before pausing its partitions and polling on.
const PAUSE_AFTER: Duration = Duration::from_secs(5);

impl<C: ConsumerContext + Membership + 'static> KafkaSource<C> {
    fn new(consumer: BaseConsumer<C>, mode: Mode, max_event_bytes: usize, chunk_events: usize, once: bool) -> Self {
        Self {
            consumer: Arc::new(consumer),
            mode,
            max_event_bytes,
            chunk_events: chunk_events.max(1),
            once,
            generation: 0,
            fresh_generation: None,
            partitions: Vec::new(),
            events: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Where the reading of a pass begins: replays assign explicitly; a group pass under an
    /// assignment already read from seeks back to the committed positions.
    fn position_partitions(&mut self, start: &HashMap<String, u64>) -> Result<(), SourceError> {
        let committed = |topic: &str, partition: i32| start.get(&kc::stream_name(topic, partition)).map(|&o| o as i64);
        match &self.mode {
            Mode::Replay { range, .. } => {
                // Where the lake (live, or an interrupted `--into`) already holds a position,
                // the replay continues from it: starting later would leave a gap, earlier is
                // filtered anyway.
                let parts: Vec<(String, i32, Offset)> = self
                    .partitions
                    .iter()
                    .map(|(t, p)| {
                        let offset = match (committed(t, *p), range.from) {
                            (Some(c), _) => Offset::Offset(c),
                            (None, ReplayFrom::Offset(o)) => Offset::Offset(o),
                            (None, ReplayFrom::Earliest | ReplayFrom::Time(_)) => Offset::Beginning,
                        };
                        (t.clone(), *p, offset)
                    })
                    .collect();
                kc::assign(&self.consumer, &parts).map_err(SourceError::from_kafka)?;
            }
            Mode::Group => {
                if self.fresh_generation == Some(self.generation) {
                    // The rebalance callback just started these partitions at the lake's positions.
                    self.fresh_generation = None;
                    return Ok(());
                }
                // The same rule as on assignment (a stream some table lacks starts where the
                // lake says, not at an offset of ours).
                let streams: Vec<String> = self.partitions.iter().map(|(t, p)| kc::stream_name(t, *p)).collect();
                let offsets = self.consumer.context().lake_offsets(&streams)?;
                for ((topic, partition), offset) in self.partitions.iter().zip(offsets) {
                    self.consumer
                        .seek(topic, *partition, offset, Duration::from_secs(10))
                        .map_err(SourceError::from_kafka)?;
                }
            }
        }
        Ok(())
    }

    fn new_partition(&self, topic: &str, partition: i32, resumed: bool) -> Partition {
        let stream: Arc<str> = Arc::from(kc::stream_name(topic, partition));
        Partition {
            topic: topic.to_string(),
            partition,
            chunk: Chunk::new(stream.clone(), self.chunk_events),
            stream,
            at_end: false,
            done: false,
            // A replay from a time skips to the first message at or after it, unless it resumes
            // from a committed position (the filter was applied before that).
            started: resumed
                || !matches!(
                    self.mode,
                    Mode::Replay {
                        range: ReplayRange {
                            from: ReplayFrom::Time(_),
                            ..
                        },
                        ..
                    }
                ),
        }
    }

    /// Adds a message to its partition's chunk; returns the chunk when full.
    fn take_message<M: Message>(&self, parts: &mut [Partition], m: &M) -> Option<Chunk> {
        // A consumer holds few partitions: a scan, comparing numbers first, costs less per
        // message than building a key to hash.
        let part = parts
            .iter_mut()
            .find(|p| p.partition == m.partition() && p.topic == m.topic())?;
        part.at_end = false;
        if part.done {
            return None;
        }
        if let Mode::Replay { range, .. } = &self.mode {
            let ts = m.timestamp().to_millis();
            if let (ReplayFrom::Time(from), false) = (range.from, part.started) {
                if ts.is_none_or(|t| t < from) {
                    return None;
                }
                part.started = true;
            }
            let past = match range.to {
                ReplayTo::Offset(end) => m.offset() >= end,
                ReplayTo::Time(end) => ts.is_some_and(|t| t > end),
                ReplayTo::Latest => false,
            };
            if past {
                part.done = true;
                return (!part.chunk.lines.is_empty())
                    .then(|| std::mem::replace(&mut part.chunk, Chunk::new(part.stream.clone(), self.chunk_events)));
            }
        }
        self.events.fetch_add(1, Ordering::Relaxed);
        // A tombstone (no payload) is an empty line: skipped, but its position still advances.
        let payload = m.payload().unwrap_or_default();
        let kept = &payload[..payload.len().min(self.max_event_bytes + 1)];
        part.chunk.push(
            kept,
            LineEnd {
                end_offset: (m.offset() + 1) as u64,
                len: payload.len(),
                terminated: true,
            },
        );
        if let ReplayTo::Offset(end) = self.mode_to() {
            part.done |= m.offset() + 1 >= end;
        }
        let full = part.chunk.lines.len() >= self.chunk_events || part.chunk.data.len() >= crate::file::CHUNK_BYTES;
        (full || part.done)
            .then(|| std::mem::replace(&mut part.chunk, Chunk::new(part.stream.clone(), self.chunk_events)))
    }

    fn mode_to(&self) -> ReplayTo {
        match &self.mode {
            Mode::Replay { range, .. } => range.to,
            Mode::Group => ReplayTo::Latest,
        }
    }

    fn finished(&self, parts: &[Partition]) -> bool {
        if !self.once || parts.is_empty() {
            return false;
        }
        parts.iter().all(|p| p.done || p.at_end)
    }
}

impl<C: ConsumerContext + Membership + 'static> Source for KafkaSource<C> {
    fn begin_pass(&mut self) -> Result<Vec<String>, SourceError> {
        match &mut self.mode {
            Mode::Group => {
                let context = self.consumer.context();
                let generation = context.generation();
                if generation != self.generation {
                    self.fresh_generation = Some(generation);
                }
                self.generation = generation;
                self.partitions = assigned(&self.consumer);
            }
            Mode::Replay { range, topic_index } => {
                let Some(topic) = range.topics.get(*topic_index).cloned() else {
                    self.partitions.clear();
                    return Ok(Vec::new());
                };
                self.partitions = kc::partitions(&self.consumer, &topic, METADATA_TIMEOUT)?
                    .into_iter()
                    .map(|p| (topic.clone(), p))
                    .collect();
                info!(topic = %topic, partitions = self.partitions.len(), "replaying topic");
            }
        }
        Ok(self.partitions.iter().map(|(t, p)| kc::stream_name(t, *p)).collect())
    }

    fn read(&mut self, start: &HashMap<String, u64>, out: &mut ChunkSender) -> Result<ReaderEnd, SourceError> {
        if let Mode::Replay { range, topic_index } = &self.mode {
            if *topic_index >= range.topics.len() {
                return Ok(ReaderEnd::Done);
            }
        }
        self.position_partitions(start)?;
        let mut parts: Vec<Partition> = self
            .partitions
            .iter()
            .map(|(t, p)| self.new_partition(t, *p, start.contains_key(&kc::stream_name(t, *p))))
            .collect();
        let mut ready: VecDeque<Chunk> = VecDeque::new();
        // A pass that ended while paused leaves librdkafka's pause in place across assignments.
        if let Err(e) = kc::set_paused(&self.consumer, false) {
            warn!(error = %e, "kafka: resume failed");
        }
        let mut paused = false;
        let mut last_flush = Instant::now();
        let mut lag_logged = Instant::now();
        let mut last_error: Option<Instant> = None;
        loop {
            if let Some(e) = self.consumer.context().take_failure() {
                return Err(e);
            }
            if out.stopped() {
                return Ok(ReaderEnd::Done);
            }
            // Hand ready chunks on. While the workers are behind, not polling is the
            // backpressure: librdkafka stops fetching when its bounded prefetch is full. A stall
            // longer than PAUSE_AFTER pauses the partitions instead (the broker keeps the
            // backlog) so that polling, and with it the group membership, can go on. Pausing
            // at once would throw the prefetch away and wait for a new fetch each time.
            let deadline = Instant::now() + if paused { POLL } else { PAUSE_AFTER };
            while let Some(chunk) = ready.pop_front() {
                match out.send_within(chunk, deadline.saturating_duration_since(Instant::now())) {
                    Sent::Yes => {}
                    Sent::Closed => return Ok(ReaderEnd::Done),
                    Sent::Full(chunk) => {
                        ready.push_front(chunk);
                        break;
                    }
                }
            }
            if ready.is_empty() == paused {
                paused = !paused;
                if let Err(e) = kc::set_paused(&self.consumer, paused) {
                    warn!(error = %e, "kafka: pause/resume failed");
                }
            }
            if ready.is_empty() && self.finished(&parts) {
                let any_left = parts.iter().any(|p| !p.chunk.lines.is_empty());
                if !any_left {
                    return Ok(self.next_topic());
                }
            }
            let polled = self.consumer.poll(if paused { Duration::ZERO } else { POLL });
            // A rebalance is served inside `poll`, which then returns no message.
            if self.consumer.context().generation() != self.generation {
                info!("kafka: assignment changed; dropping uncommitted work, it is re-read from the lake's positions");
                out.abandon();
                return Ok(ReaderEnd::Abandon);
            }
            match polled {
                Some(Ok(m)) => ready.extend(self.take_message(&mut parts, &m)),
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    // librdkafka names the partition only; with several topics the same number
                    // can be ambiguous, which at worst ends `--once` early (nothing is lost).
                    let replay_to_end = self.mode_to() == ReplayTo::Latest && !matches!(self.mode, Mode::Group);
                    for part in parts.iter_mut().filter(|p| p.partition == partition) {
                        part.at_end = true;
                        part.done |= replay_to_end;
                    }
                    flush_all(&mut parts, &mut ready, self.chunk_events);
                }
                // A position outside the log, or batches this build cannot decode: reading on
                // would skip events, so stop.
                Some(Err(e))
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::AutoOffsetReset
                                | RDKafkaErrorCode::NotImplemented
                                | RDKafkaErrorCode::BadCompression
                                | RDKafkaErrorCode::UnsupportedCompressionType
                        )
                    ) =>
                {
                    return Err(SourceError::from_kafka(e));
                }
                Some(Err(e)) => {
                    // Broker unavailable and the like: librdkafka reconnects with backoff.
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        warn!(error = %e, "kafka: consume error (retrying)");
                        last_error = Some(Instant::now());
                    }
                }
                None => flush_all(&mut parts, &mut ready, self.chunk_events),
            }
            if last_flush.elapsed() >= FLUSH_EVERY {
                flush_all(&mut parts, &mut ready, self.chunk_events);
                last_flush = Instant::now();
            }
            if lag_logged.elapsed() >= LAG_LOG_EVERY {
                lag_logged = Instant::now();
                if let Some(lag) = self.consumer.context().lag().get() {
                    info!(messages_behind = lag, "kafka lag");
                }
            }
            if let Some(lag) = self.consumer.context().lag().get() {
                out.report_lag("kafka", lag as i64);
            }
        }
    }

    fn progress_reporter(&self) -> Option<Arc<ProgressReporter>> {
        if !matches!(self.mode, Mode::Group) {
            return None;
        }
        let consumer = self.consumer.clone();
        Some(Arc::new(move |positions: &[SourcePosition]| {
            let parsed: Vec<(String, i32, i64)> = positions
                .iter()
                .filter_map(|p| {
                    let rest = p.stream.strip_prefix("kafka/")?;
                    let (topic, partition) = rest.rsplit_once('/')?;
                    Some((topic.to_string(), partition.parse().ok()?, p.offset))
                })
                .collect();
            kc::report_progress(&consumer, &parsed);
        }))
    }
}

impl<C: ConsumerContext + Membership + 'static> KafkaSource<C> {
    /// Messages behind the high watermarks of this consumer's partitions.
    pub(crate) fn lag(&self) -> Lag {
        self.consumer.context().lag().clone()
    }

    /// A replay moves to its next topic (a new pass); everything else is done.
    fn next_topic(&mut self) -> ReaderEnd {
        match &mut self.mode {
            Mode::Replay { range, topic_index } => {
                *topic_index += 1;
                if *topic_index < range.topics.len() {
                    ReaderEnd::NewPass
                } else {
                    ReaderEnd::Done
                }
            }
            Mode::Group => ReaderEnd::Done,
        }
    }
}

fn flush_all(parts: &mut [Partition], ready: &mut VecDeque<Chunk>, events: usize) {
    for part in parts.iter_mut() {
        if !part.chunk.lines.is_empty() {
            ready.push_back(std::mem::replace(
                &mut part.chunk,
                Chunk::new(part.stream.clone(), events),
            ));
        }
    }
}

fn assigned<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Vec<(String, i32)> {
    consumer
        .assignment()
        .map(|tpl| {
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect()
        })
        .unwrap_or_default()
}
