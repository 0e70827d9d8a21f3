//! The command line's arguments: every subcommand and its flags.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{forget, generate};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sanitize Debezium change events (files, Kafka, Kinesis) into Delta Lake tables and a PII vault"
)]
pub struct Cli {
    /// Log format on stderr (human is for a terminal; json for a log collector).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SLUICE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// What `run` and `capture` take.
#[derive(clap::Args)]
pub struct RunArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Stop at the end of the input (capture: once every change committed before the start is
    /// in the lake); otherwise keep running as a daemon.
    #[arg(long)]
    pub once: bool,
    /// Also write the run summary as JSON to this file.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the pipeline: read events, sanitize, commit tables, vault and quarantine.
    Run(RunArgs),
    /// Capture a PostgreSQL database from beside it (`[source] kind = "postgres"`): snapshot
    /// the policy tables, then stream every committed change through logical replication.
    Capture(RunArgs),
    /// Re-read a range of the Kafka topics or the Kinesis stream into the live tables
    /// (idempotent: committed positions are skipped) or, with --into, into a fresh lake root.
    Replay(ReplayArgs),
    /// Right to be forgotten: destroy the subjects' keys, remove their rows from every table,
    /// the vault and the quarantine (files physically deleted), verify, and write a receipt to
    /// the audit table. Prints the receipt (JSON); exits 1 if the verification found anything,
    /// 3 if a subject matched no row anywhere (unless --allow-absent).
    /// Interrupted, the same command resumes the job.
    Forget(ForgetArgs),
    /// Let an erased subject's id belong to someone new (a recycled account number, a person
    /// who registers again): events with a source time from --from (default: now) on are kept
    /// under a new key, earlier ones (the erased person's, on any replay) stay dropped. Without
    /// it, every event of an erased id is dropped for good. Recorded in the audit table.
    ReuseSubject(ReuseSubjectArgs),
    /// Compute the hourly pre-aggregations (`[[aggregates]]`): without --from/--to the hours
    /// that are due (new rows since the last computation, hour ended the lateness ago); with
    /// them every hour in [from, to), a backfill or recomputation. Prints a report (JSON).
    Aggregate(AggregateArgs),
    /// Compact every table (policy tables in each format, aggregates, vault, quarantine): small
    /// files bin-packed to `[compaction] target_file_mb`. Prints a report (JSON). A daemon does
    /// this every `[compaction] interval_ms`.
    Compact {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate the configuration and print the release manifest: every output column of every
    /// table, the action that produced it, and what is dropped.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Also read each existing table and say what the next run does to its columns (adds,
        /// or refuses a removed or retyped one: exit 1). Reads the lake, so it needs the lake's
        /// credentials; without it, check reads nothing but the config.
        #[arg(long)]
        tables: bool,
        /// Print, instead of the manifest, a JSON document of every table's columns: class,
        /// tags, action, source column and type (for a job that applies them as catalog tags).
        #[arg(long, conflicts_with = "tables")]
        tags_json: bool,
    },
    /// Re-identification with approval: request (who, why, which subjects and encrypt/vault
    /// columns), approve (others than the requester), run (once, before it expires: the values
    /// to a file, never the lake). Every step is a row of the audit table.
    #[command(subcommand)]
    Reveal(RevealCommand),
    /// Remove rows past their policy's `retention_days` (an aggregate's own) from its tables,
    /// current tables, vault rows and quarantined events, with the history that held them;
    /// record a receipt in the audit table. Prints the report (JSON). A daemon does this every
    /// `[retention] interval_ms`.
    Retain {
        #[arg(long)]
        config: PathBuf,
        /// Count what would be removed; change and record nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the audit table: erasures, subject reuses, re-identification steps, retention
    /// runs (tokens and counts, never values), oldest first.
    Audit {
        #[arg(long)]
        config: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write deterministic demo/benchmark change events (a debt-collection domain).
    Generate(GenerateArgs),
    /// Scan files for known sensitive values (and their digit-only, base64, hex and unkeyed
    /// digest forms), decoding Parquet and gzip. Exits 1 if any is found.
    AuditLeaks(AuditLeaksArgs),
}

#[derive(Subcommand)]
pub enum RevealCommand {
    /// Record a request; prints its id (approvers and the run name it).
    Request {
        #[arg(long)]
        config: PathBuf,
        /// A subject id as the source has it (repeatable; tokenized at once, kept nowhere).
        #[arg(long = "subject")]
        subjects: Vec<String>,
        /// One subject id per line (as `sluice forget --subjects-file`).
        #[arg(long)]
        subjects_file: Option<PathBuf>,
        /// Token domain of the ids (default: the policies' one subject domain).
        #[arg(long)]
        domain: Option<String>,
        /// Columns to reveal: `table.column` (a policy's target and an encrypt or vault
        /// column), comma-separated or repeated.
        #[arg(long, value_delimiter = ',', required = true)]
        columns: Vec<String>,
        /// Why (a court order's reference, a case review): kept with the request in the key
        /// store, not in the lake.
        #[arg(long)]
        reason: String,
        #[arg(long)]
        requested_by: String,
    },
    /// Approve a request (not the requester's own; each approver once).
    Approve {
        #[arg(long)]
        config: PathBuf,
        request: String,
        #[arg(long)]
        approved_by: String,
    },
    /// Run an approved request once, before it expires: JSON lines of the subjects' values to
    /// --out (a new file, mode 0600, outside the lake; `-` for stdout).
    Run {
        #[arg(long)]
        config: PathBuf,
        request: String,
        #[arg(long)]
        run_by: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a request: subjects (tokens), columns, reason, approvals, status.
    Show {
        #[arg(long)]
        config: PathBuf,
        request: String,
    },
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// `earliest`, an offset (every partition; Kafka only), or an RFC 3339 time (the first
    /// message of each partition stamped at or after it; Kinesis: arrival time).
    #[arg(long)]
    pub from: String,
    /// `latest` (each partition's end when reached), an offset (exclusive), or an RFC 3339
    /// time (messages stamped after it are not read).
    #[arg(long, default_value = "latest")]
    pub to: String,
    /// Topics to replay (default: the configured ones; patterns are not replayable).
    #[arg(long, conflicts_with = "stream")]
    pub topic: Vec<String>,
    /// The Kinesis stream to replay (default: the configured one).
    #[arg(long)]
    pub stream: Option<String>,
    /// Write tables, vault and quarantine under this directory instead of the live lake.
    #[arg(long)]
    pub into: Option<PathBuf>,
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ForgetArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// A subject id as the source has it (repeatable). It shows in the process list: for
    /// anything but a test prefer --subjects-file.
    #[arg(long = "subject")]
    pub subjects: Vec<String>,
    /// One subject id per line (a CSV's first column; a header `id`, `subject` or
    /// `subject_id` and lines starting with `#` are skipped).
    #[arg(long)]
    pub subjects_file: Option<PathBuf>,
    /// Token domain of the ids (default: the policies' one subject domain).
    #[arg(long)]
    pub domain: Option<String>,
    /// The request's reference (e.g. a ticket number): names the job, so rerunning it resumes.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Who asked (recorded in the receipt).
    #[arg(long, default_value = "sluice forget")]
    pub requested_by: String,
    /// Show what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Succeed even when a subject matched nothing in any table (never ingested, erased
    /// before): without it such a job exits 3, as the id may be wrong (a typo, another
    /// --domain) and nothing of the person was found to erase.
    #[arg(long)]
    pub allow_absent: bool,
    /// Quarantined events that mention an id but cannot be attributed: `fail` keeps them,
    /// lists them and fails the verification; after looking at them, `delete` (they are the
    /// subjects') or `keep` (they are not).
    #[arg(long, value_enum, default_value = "fail")]
    pub unattributed: forget::Unattributed,
    /// Also write the receipt to this file.
    #[arg(long)]
    pub receipt_json: Option<PathBuf>,
    /// Milliseconds to wait after destroying the keys before rewriting the tables, so that
    /// running daemons see the tombstones and commit the rows they hold (default:
    /// keys.erasure_refresh_ms + batch.max_age_ms; 0 when no daemon writes this lake).
    #[arg(long)]
    pub settle_ms: Option<u64>,
}

#[derive(clap::Args)]
pub struct ReuseSubjectArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// The subject id, as the source has it.
    #[arg(long)]
    pub subject: String,
    #[arg(long)]
    pub domain: Option<String>,
    /// RFC 3339 time from which the id's events are the new owner's (default: now).
    #[arg(long)]
    pub from: Option<String>,
    /// The request's reference (e.g. a ticket number).
    #[arg(long)]
    pub request_id: String,
    /// Who asked (recorded, as a keyed token).
    #[arg(long)]
    pub requested_by: String,
}

#[derive(clap::Args)]
pub struct AggregateArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// RFC 3339 time: the first hour to compute.
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// RFC 3339 time: hours before it are computed.
    #[arg(long, requires = "from")]
    pub to: Option<String>,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Number of events.
    #[arg(long, default_value_t = 1000)]
    pub events: u64,
    /// Output file (`.jsonl`, or `.jsonl.gz` to compress).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Wrap each event as `{"schema": …, "payload": …}` like the Kafka Connect JSON converter.
    #[arg(long)]
    pub wrapped: bool,
    /// Hours the events' times spread over, from 2024-01-01T00:00Z.
    #[arg(long, default_value_t = generate::DEFAULT_SPAN_HOURS)]
    pub span_hours: u64,
    /// Customers the book already holds (ids 0..N): changes, payments and contacts touch
    /// them at random, so subjects rarely repeat (benchmarks at realistic cardinality).
    /// Default 0: every customer is created by the events and they repeat a lot.
    #[arg(long, default_value_t = 0)]
    pub subjects: u64,
}

#[derive(clap::Args)]
pub struct AuditLeaksArgs {
    /// File with one sensitive value per line.
    #[arg(long)]
    pub values: PathBuf,
    /// Files or directories to scan.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}
