//! Kinesis streams: this daemon's share of the shards, read from the positions the lake holds.
//!
//! Several daemons: shards are split by a static rule, `worker_index` of `worker_count` — a
//! shard belongs to the worker whose index is SHA-256(shard id) mod count. Every daemon of the
//! pipeline runs with the same count and its own index; no two can own one shard, whatever
//! shards they see, and no coordination is needed (changing the count needs every daemon
//! stopped first).
//!
//! Resharding: a child shard is read only once all its parents are finished — their end is
//! committed to the lake (`done`), read here, or they are gone from the stream — so the events
//! of one key stay in order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka::StartAt;
use crate::kinesis::{self as kn, AttachedNames, Fetched, ShardInfo, StartingPoint, SEQUENCE_PARTS};
use crate::lake::{StreamStanding, TableLocation};
use crate::SourcePosition;
use aws_sdk_kinesis::Client;
use tracing::info;

use crate::source::SourceError;
use crate::source::{Chunk, LineEnd};
use crate::source::{ChunkSender, ReaderEnd, ReplayFrom, ReplayTo, Source};

pub(crate) struct KinesisSource {
    rt: tokio::runtime::Runtime,
    client: Client,
    stream: String,
    worker_index: u32,
    worker_count: u32,
    start_at: StartAt,
    /// A replay into a fresh lake root: where shards start and end.
    replay: Option<(ReplayFrom, ReplayTo)>,
    once: bool,
    poll: Duration,
    max_event_bytes: usize,
    lake: Vec<TableLocation>,
    app_prefix: String,
    /// Every shard listed at the start of this pass, and the ones this worker owns.
    all: Vec<ShardInfo>,
    owned: Vec<ShardInfo>,
    pub events: Arc<AtomicU64>,
    /// `MillisBehindLatest`, the largest over this worker's shards (-1: not read yet).
    pub behind_ms: Arc<AtomicI64>,
}

pub(crate) struct KinesisOptions {
    pub settings: kn::KinesisSettings,
    pub stream: String,
    pub worker_index: u32,
    pub worker_count: u32,
    pub start_at: StartAt,
    pub replay: Option<(ReplayFrom, ReplayTo)>,
    pub once: bool,
    pub poll: Duration,
    pub max_event_bytes: usize,
    pub lake: Vec<TableLocation>,
    pub app_prefix: String,
}

/// Records per `GetRecords` call (the service allows 10,000 and 2 MB/s per shard).
const RECORDS_PER_CALL: i32 = 2000;
const RELIST_EVERY: Duration = Duration::from_secs(30);
const LAG_LOG_EVERY: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Which worker owns a shard: stable whatever else the stream holds.
pub(crate) fn owner(shard_id: &str, worker_count: u32) -> u32 {
    let digest = ring::digest::digest(&ring::digest::SHA256, shard_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    (u64::from_be_bytes(first) % u64::from(worker_count.max(1))) as u32
}

/// What the lake holds for a shard: the count of records taken, the sequence numbers of the
/// last and of the first one, whether the shard was finished. From the sink that stands lowest.
#[derive(Debug, Clone, Default, PartialEq)]
struct LakeShard {
    count: i64,
    sequence: Option<String>,
    base: Option<String>,
    done: bool,
    /// Some sink holds nothing of the shard while another does (a crash during the shard's
    /// first commit, or a table added later): it must be fed from the base.
    missing_somewhere: bool,
}

struct ShardState {
    info: ShardInfo,
    stream: Arc<str>,
    names: AttachedNames,
    count: i64,
    /// Where reading starts when nothing was read in this pass yet.
    initial: StartingPoint,
    last_sequence: Option<String>,
    base: Option<String>,
    iterator: Option<String>,
    /// Commit only the shard's end (it closed without records).
    end_only: bool,
    finished: bool,
    caught_up: bool,
    next_call: Instant,
    backoff: Duration,
    lag_ms: i64,
}

impl KinesisSource {
    pub(crate) fn new(options: KinesisOptions) -> Result<Self, SourceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(SourceError::Runtime)?;
        let client = rt.block_on(kn::client(&options.settings));
        Ok(Self {
            rt,
            client,
            stream: options.stream,
            worker_index: options.worker_index,
            worker_count: options.worker_count,
            start_at: options.start_at,
            replay: options.replay,
            once: options.once || options.replay.is_some(),
            poll: options.poll.max(Duration::from_millis(200)),
            max_event_bytes: options.max_event_bytes,
            lake: options.lake,
            app_prefix: options.app_prefix,
            all: Vec::new(),
            owned: Vec::new(),
            events: Arc::new(AtomicU64::new(0)),
            behind_ms: Arc::new(AtomicI64::new(-1)),
        })
    }

    fn shard_stream(&self, shard: &str) -> String {
        kn::stream_name(&self.stream, shard)
    }

    /// The lake's state of each shard: the entries of the sink that stands lowest (by count,
    /// [`StreamStanding`]), and whether some sink holds none of it.
    fn lake_state(&self, shards: &[String]) -> Result<HashMap<String, LakeShard>, SourceError> {
        let mut names = Vec::new();
        for s in shards {
            let stream = self.shard_stream(s);
            names.push(stream.clone());
            names.extend(AttachedNames::of(&stream).all().cloned());
        }
        let per = 2 + 2 * SEQUENCE_PARTS;
        let parts = |v: &[Option<i64>]| -> Option<String> {
            let mut parts = [0i64; SEQUENCE_PARTS];
            for (p, value) in parts.iter_mut().zip(v) {
                *p = (*value)?;
            }
            Some(kn::parts_to_sequence(&parts))
        };
        let mut per_table = Vec::with_capacity(self.lake.len());
        for table in &self.lake {
            per_table.push(self.rt.block_on(table.read_positions(&self.app_prefix, &names))?);
        }
        let mut out: HashMap<String, LakeShard> = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let entries: Vec<&[Option<i64>]> = per_table.iter().map(|v| &v[i * per..(i + 1) * per]).collect();
            let standing = StreamStanding::over(entries.iter().map(|v| v[0]));
            let Some(lowest) = entries.iter().find(|v| v[0].is_some() && v[0] == standing.lowest) else {
                continue;
            };
            // The base is the same in every sink that has one.
            let base = entries
                .iter()
                .find_map(|v| parts(&v[1 + SEQUENCE_PARTS..1 + 2 * SEQUENCE_PARTS]));
            out.insert(
                shard.clone(),
                LakeShard {
                    count: standing.lowest.unwrap_or(0),
                    sequence: parts(&lowest[1..=SEQUENCE_PARTS]),
                    base: parts(&lowest[1 + SEQUENCE_PARTS..1 + 2 * SEQUENCE_PARTS]).or(base),
                    done: lowest[per - 1] == Some(1),
                    missing_somewhere: standing.missing_somewhere,
                },
            );
        }
        Ok(out)
    }

    /// A parent not owned here: finished when the lake says so in every sink, or when the
    /// stream no longer lists it (expired).
    fn parent_finished_elsewhere(&self, parent: &str) -> Result<bool, SourceError> {
        if !self.all.iter().any(|s| s.id == parent) {
            return Ok(true);
        }
        let name = format!("{}@done", self.shard_stream(parent));
        for table in &self.lake {
            let v = self
                .rt
                .block_on(table.read_positions(&self.app_prefix, std::slice::from_ref(&name)))?;
            if v[0] != Some(1) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn starting_point(&self, state: &ShardState) -> StartingPoint {
        match &state.last_sequence {
            Some(seq) => StartingPoint::After(seq.clone()),
            None => state.initial.clone(),
        }
    }

    /// Where a shard the lake never saw starts.
    fn fresh_start(&self) -> StartingPoint {
        match self.replay {
            Some((ReplayFrom::Time(ms), _)) => StartingPoint::AtTimestamp(ms),
            Some(_) => StartingPoint::TrimHorizon,
            None => match self.start_at {
                StartAt::Earliest => StartingPoint::TrimHorizon,
                StartAt::Latest => StartingPoint::Latest,
            },
        }
    }

    /// One `GetRecords` round on a shard; returns a chunk to send, if any.
    fn poll_shard(&self, state: &mut ShardState) -> Result<Option<Chunk>, SourceError> {
        if state.end_only {
            let chunk = Chunk::new(state.stream.clone(), 1);
            return self.end_of_shard(state, chunk).map(Some);
        }
        if state.iterator.is_none() {
            let start = self.starting_point(state);
            state.iterator =
                self.rt
                    .block_on(kn::shard_iterator(&self.client, &self.stream, &state.info.id, &start))?;
            if state.iterator.is_none() {
                let chunk = Chunk::new(state.stream.clone(), 1);
                return self.end_of_shard(state, chunk).map(Some);
            }
        }
        let iterator = state.iterator.clone().unwrap_or_default();
        let fetched = self
            .rt
            .block_on(kn::get_records(&self.client, &self.stream, &iterator, RECORDS_PER_CALL))?;
        match fetched {
            Fetched::Throttled => {
                state.backoff = (state.backoff * 2).clamp(Duration::from_millis(200), MAX_BACKOFF);
                state.next_call = Instant::now() + state.backoff;
                Ok(None)
            }
            Fetched::Expired => {
                state.iterator = None;
                Ok(None)
            }
            Fetched::Records {
                records,
                next,
                millis_behind_latest,
            } => {
                state.backoff = Duration::ZERO;
                state.lag_ms = millis_behind_latest.unwrap_or(0);
                // At the end as of now: 0 ms behind, and not a full page (more may be waiting).
                state.caught_up = state.lag_ms == 0 && records.len() < RECORDS_PER_CALL as usize;
                if records.is_empty() {
                    state.next_call = Instant::now() + self.poll;
                } else {
                    // At most 5 reads per second per shard.
                    state.next_call = Instant::now() + Duration::from_millis(200);
                }
                let mut chunk = Chunk::new(state.stream.clone(), records.len());
                for record in &records {
                    if let Some((_, ReplayTo::Time(end))) = self.replay {
                        let arrival = record
                            .approximate_arrival_timestamp()
                            .map(|t| t.to_millis().unwrap_or(0));
                        if arrival.is_some_and(|t| t > end) {
                            state.finished = true;
                            break;
                        }
                    }
                    if state.count == 0 {
                        if let StartingPoint::At(base) = &state.initial {
                            // Counts only line up if the re-read starts exactly at the base.
                            if record.sequence_number() != base {
                                return Err(SourceError::Kinesis(kn::KinesisError::Api {
                                    stream: self.stream.clone(),
                                    message: format!(
                                        "shard {}: the records a table lacks have expired from the stream; rebuild it with `sluice replay --into`",
                                        state.info.id
                                    ),
                                }));
                            }
                        }
                    }
                    state.count += 1;
                    state.last_sequence = Some(record.sequence_number().to_string());
                    if state.count == 1 {
                        // The record every count is relative to.
                        state.base = state.last_sequence.clone();
                    }
                    let data = record.data().as_ref();
                    let kept = &data[..data.len().min(self.max_event_bytes + 1)];
                    chunk.push(
                        kept,
                        LineEnd {
                            end_offset: state.count as u64,
                            len: data.len(),
                            terminated: true,
                        },
                    );
                    self.events.fetch_add(1, Ordering::Relaxed);
                }
                state.iterator = next;
                if state.finished {
                    // The end of a replay's range, not of the shard.
                    return if chunk.lines.is_empty() {
                        Ok(None)
                    } else {
                        self.attach(state, chunk, false).map(Some)
                    };
                }
                if state.iterator.is_none() {
                    // Closed and fully read: the end is committed with the last records.
                    return self.end_of_shard(state, chunk).map(Some);
                }
                if chunk.lines.is_empty() {
                    return Ok(None);
                }
                self.attach(state, chunk, false).map(Some)
            }
        }
    }

    /// Closes a shard in the lake: one position past its last record, marked done.
    fn end_of_shard(&self, state: &mut ShardState, mut chunk: Chunk) -> Result<Chunk, SourceError> {
        state.finished = true;
        state.count += 1;
        chunk.push(
            b"",
            LineEnd {
                end_offset: state.count as u64,
                len: 0,
                terminated: true,
            },
        );
        self.attach(state, chunk, true)
    }

    /// The sequence numbers (and end) committed beside the count.
    fn attach(&self, state: &ShardState, mut chunk: Chunk, done: bool) -> Result<Chunk, SourceError> {
        let to_parts = |sequence: &str| {
            kn::sequence_to_parts(sequence).ok_or_else(|| kn::KinesisError::SequenceTooLong {
                stream: self.stream.clone(),
                shard: state.info.id.clone(),
                digits: sequence.len(),
            })
        };
        for (names, sequence) in [
            (&state.names.sequence, &state.last_sequence),
            (&state.names.base, &state.base),
        ] {
            if let Some(sequence) = sequence {
                for (name, value) in names.iter().zip(to_parts(sequence)?) {
                    chunk.attached.push(SourcePosition {
                        stream: name.clone(),
                        offset: value,
                    });
                }
            }
        }
        chunk.attached.push(SourcePosition {
            stream: state.names.done.clone(),
            offset: i64::from(done),
        });
        Ok(chunk)
    }
}

impl KinesisSource {
    /// Where each owned shard starts this pass, from what the lake holds of it: a shard some
    /// table lacks is read again from its first record (each sink keeps only what it lacks).
    fn shard_states(&self, lake: &HashMap<String, LakeShard>) -> Result<Vec<ShardState>, SourceError> {
        let mut shards: Vec<ShardState> = Vec::with_capacity(self.owned.len());
        for info in &self.owned {
            let at = lake.get(&info.id).cloned().unwrap_or_default();
            let stream = self.shard_stream(&info.id);
            let mut state = ShardState {
                info: info.clone(),
                stream: Arc::from(stream.as_str()),
                names: AttachedNames::of(&stream),
                count: at.count,
                initial: self.fresh_start(),
                last_sequence: at.sequence.clone(),
                base: at.base.clone(),
                iterator: None,
                end_only: false,
                finished: at.done,
                caught_up: false,
                next_call: Instant::now(),
                backoff: Duration::ZERO,
                lag_ms: 0,
            };
            let refill = at.missing_somewhere && (self.start_at == StartAt::Earliest || self.replay.is_some());
            if refill && at.done && at.base.is_none() {
                // A shard that closed without a record: only its end is missing.
                state.count = 0;
                state.finished = false;
                state.last_sequence = None;
                state.end_only = true;
            } else if refill || (at.count > 0 && at.sequence.is_none() && !at.done) {
                // Counts are relative to the shard's first record: re-read from it, and every
                // sink keeps only what it lacks. (With `start = "latest"` a table that lacks a
                // shard starts where the others are, as with Kafka.)
                let Some(base) = at.base else {
                    return Err(SourceError::Kinesis(kn::KinesisError::Api {
                    stream: self.stream.clone(),
                    message: format!(
                        "shard {}: a table lacks records the lake's other tables hold, and the lake has no base sequence number to re-read them from",
                        info.id
                    ),
                }));
                };
                info!(shard = %info.id, "kinesis: a table is behind on this shard: re-reading it from its first record");
                state.count = 0;
                state.finished = false;
                state.last_sequence = None;
                state.initial = StartingPoint::At(base);
            }
            shards.push(state);
        }
        Ok(shards)
    }
}

impl Source for KinesisSource {
    fn begin_pass(&mut self) -> Result<Vec<String>, SourceError> {
        self.all = self.rt.block_on(kn::list_shards(&self.client, &self.stream))?;
        self.owned = self
            .all
            .iter()
            .filter(|s| owner(&s.id, self.worker_count) == self.worker_index)
            .cloned()
            .collect();
        info!(
            stream = %self.stream,
            shards = self.all.len(),
            owned = self.owned.len(),
            worker = self.worker_index,
            of = self.worker_count,
            "kinesis: shards of this worker"
        );
        Ok(self.owned.iter().map(|s| self.shard_stream(&s.id)).collect())
    }

    fn read(&mut self, _start: &HashMap<String, u64>, out: &mut ChunkSender) -> Result<ReaderEnd, SourceError> {
        let ids: Vec<String> = self.owned.iter().map(|s| s.id.clone()).collect();
        let lake = self.lake_state(&ids)?;
        let mut shards = self.shard_states(&lake)?;
        let owned_ids: HashSet<String> = ids.into_iter().collect();
        let mut parents_ready: HashSet<String> = HashSet::new();
        let mut listed = Instant::now();
        let mut lag_logged = Instant::now();
        let mut finished_before = shards.iter().filter(|s| s.finished).count();
        loop {
            if out.stopped() {
                return Ok(ReaderEnd::Done);
            }
            let mut sent_any = false;
            for i in 0..shards.len() {
                if shards[i].finished || shards[i].next_call > Instant::now() {
                    continue;
                }
                let id = shards[i].info.id.clone();
                if !parents_ready.contains(&id) {
                    let mut ready = true;
                    for parent in &shards[i].info.parents {
                        let done_here = shards.iter().any(|s| &s.info.id == parent && s.finished);
                        if !(done_here || (!owned_ids.contains(parent) && self.parent_finished_elsewhere(parent)?)) {
                            ready = false;
                        }
                    }
                    if !ready {
                        shards[i].next_call = Instant::now() + self.poll.max(Duration::from_secs(1));
                        continue;
                    }
                    parents_ready.insert(id);
                }
                let was_finished = shards[i].finished;
                let polled = self.poll_shard(&mut shards[i])?;
                if shards[i].finished && !was_finished {
                    // Its children need not wait for their next turn.
                    let parent = shards[i].info.id.clone();
                    for child in shards.iter_mut().filter(|c| c.info.parents.contains(&parent)) {
                        child.next_call = Instant::now();
                    }
                }
                if let Some(chunk) = polled {
                    sent_any = true;
                    // Blocking here is the backpressure: no `GetRecords` until the workers
                    // take more; the stream keeps the backlog.
                    if !out.send(chunk) {
                        return Ok(ReaderEnd::Done);
                    }
                }
            }
            let lag = shards
                .iter()
                .filter(|s| !s.finished)
                .map(|s| s.lag_ms)
                .max()
                .unwrap_or(0);
            self.behind_ms.store(lag, Ordering::Relaxed);
            out.report_lag("kinesis", lag);
            if lag_logged.elapsed() >= LAG_LOG_EVERY {
                lag_logged = Instant::now();
                info!(stream = %self.stream, millis_behind_latest = lag, "kinesis lag");
            }
            // A shard that finished may have children this pass has not listed (resharding).
            let finished_now = shards.iter().filter(|s| s.finished).count();
            if finished_now > finished_before || listed.elapsed() >= RELIST_EVERY {
                finished_before = finished_now;
                listed = Instant::now();
                let now = self.rt.block_on(kn::list_shards(&self.client, &self.stream))?;
                let known: HashSet<&str> = self.all.iter().map(|s| s.id.as_str()).collect();
                if now.iter().any(|s| !known.contains(s.id.as_str())) {
                    info!(stream = %self.stream, "kinesis: new shards (resharding): starting a new pass");
                    return Ok(ReaderEnd::NewPass);
                }
            }
            if self.once && caught_up(&shards, &parents_ready, &owned_ids) {
                return Ok(ReaderEnd::Done);
            }
            if !sent_any {
                // Nothing came: wait for the earliest shard's next allowed call.
                let next = shards
                    .iter()
                    .filter(|s| !s.finished)
                    .map(|s| s.next_call)
                    .min()
                    .unwrap_or_else(|| Instant::now() + self.poll);
                std::thread::sleep(next.saturating_duration_since(Instant::now()).min(self.poll));
            }
        }
    }
}

/// `--once`: done when every open shard is caught up, or waits on a parent another worker
/// owns. A shard whose parents all finished here is about to be read: not done.
fn caught_up(shards: &[ShardState], parents_ready: &HashSet<String>, owned_ids: &HashSet<String>) -> bool {
    let finished_here = |p: &String| shards.iter().any(|x| &x.info.id == p && x.finished);
    shards.iter().filter(|s| !s.finished).all(|s| {
        if parents_ready.contains(&s.info.id) {
            s.caught_up
        } else {
            s.info.parents.iter().any(|p| !owned_ids.contains(p)) && !s.info.parents.iter().all(finished_here)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::owner;

    #[test]
    fn every_shard_has_exactly_one_owner_and_work_is_spread() {
        let shards: Vec<String> = (0..200).map(|i| format!("shardId-{i:012}")).collect();
        for count in [1, 2, 3, 5] {
            let mut per_worker = vec![0; count as usize];
            for s in &shards {
                let o = owner(s, count);
                assert!(o < count);
                assert_eq!(o, owner(s, count), "stable");
                per_worker[o as usize] += 1;
            }
            assert!(
                per_worker.iter().all(|n| *n >= 200 / count as usize / 2),
                "{per_worker:?}"
            );
        }
    }
}
