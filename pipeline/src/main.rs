//! `sluice`: sanitize change events into a lakehouse without letting raw personal data out.

mod aggregate;
mod audit;
mod compact;
mod config;
mod config_env;
mod forget;
mod generate;
mod manifest;
mod observe;
mod progress;
mod publish;
mod quarantine;
mod raw_capture;
mod runtime;
mod shutdown;
mod sinks;
mod summary;
mod worker;

use sluice_connectors::lake::TableLocation;
use sluice_connectors::source;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

/// Batches allocate and free large buffers; glibc's allocator unmaps and re-faults them each
/// time (~8% of CPU in profiles), mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sanitize Debezium change events (files, Kafka, Kinesis) into Delta Lake tables and a PII vault"
)]
struct Cli {
    /// Log format on stderr (human is for a terminal; json for a log collector).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SLUICE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// What `run` and `capture` take.
#[derive(clap::Args)]
struct RunArgs {
    #[arg(long)]
    config: PathBuf,
    /// Stop at the end of the input (capture: once every change committed before the start is
    /// in the lake); otherwise keep running as a daemon.
    #[arg(long)]
    once: bool,
    /// Also write the run summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline: read events, sanitize, commit tables, vault and quarantine.
    Run(RunArgs),
    /// Capture a PostgreSQL database from beside it (`[source] kind = "postgres"`): snapshot
    /// the policy tables, then stream every committed change through logical replication.
    Capture(RunArgs),
    /// Re-read a range of the Kafka topics or the Kinesis stream into the live tables
    /// (idempotent: committed positions are skipped) or, with --into, into a fresh lake root.
    Replay {
        #[arg(long)]
        config: PathBuf,
        /// `earliest`, an offset (every partition; Kafka only), or an RFC 3339 time (the first
        /// message of each partition stamped at or after it; Kinesis: arrival time).
        #[arg(long)]
        from: String,
        /// `latest` (each partition's end when reached), an offset (exclusive), or an RFC 3339
        /// time (messages stamped after it are not read).
        #[arg(long, default_value = "latest")]
        to: String,
        /// Topics to replay (default: the configured ones; patterns are not replayable).
        #[arg(long, conflicts_with = "stream")]
        topic: Vec<String>,
        /// The Kinesis stream to replay (default: the configured one).
        #[arg(long)]
        stream: Option<String>,
        /// Write tables, vault and quarantine under this directory instead of the live lake.
        #[arg(long)]
        into: Option<PathBuf>,
        #[arg(long)]
        summary_json: Option<PathBuf>,
    },
    /// Right to be forgotten: destroy the subjects' keys, remove their rows from every table,
    /// the vault and the quarantine (files physically deleted), verify, and write a receipt to
    /// the audit table. Prints the receipt (JSON); exits 1 if the verification found anything,
    /// 3 if a subject matched no row anywhere (unless --allow-absent).
    /// Interrupted, the same command resumes the job.
    Forget {
        #[arg(long)]
        config: PathBuf,
        /// A subject id as the source has it (repeatable). It shows in the process list: for
        /// anything but a test prefer --subjects-file.
        #[arg(long = "subject")]
        subjects: Vec<String>,
        /// One subject id per line (a CSV's first column; a header `id`, `subject` or
        /// `subject_id` and lines starting with `#` are skipped).
        #[arg(long)]
        subjects_file: Option<PathBuf>,
        /// Token domain of the ids (default: the policies' one subject domain).
        #[arg(long)]
        domain: Option<String>,
        /// The request's reference (e.g. a ticket number): names the job, so rerunning it resumes.
        #[arg(long)]
        request_id: Option<String>,
        /// Who asked (recorded in the receipt).
        #[arg(long, default_value = "sluice forget")]
        requested_by: String,
        /// Show what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Succeed even when a subject matched nothing in any table (never ingested, erased
        /// before): without it such a job exits 3, as the id may be wrong (a typo, another
        /// --domain) and nothing of the person was found to erase.
        #[arg(long)]
        allow_absent: bool,
        /// Quarantined events that mention an id but cannot be attributed: `fail` keeps them,
        /// lists them and fails the verification; after looking at them, `delete` (they are the
        /// subjects') or `keep` (they are not).
        #[arg(long, value_enum, default_value = "fail")]
        unattributed: forget::Unattributed,
        /// Also write the receipt to this file.
        #[arg(long)]
        receipt_json: Option<PathBuf>,
        /// Milliseconds to wait after destroying the keys before rewriting the tables, so that
        /// running daemons see the tombstones and commit the rows they hold (default:
        /// keys.erasure_refresh_ms + batch.max_age_ms; 0 when no daemon writes this lake).
        #[arg(long)]
        settle_ms: Option<u64>,
    },
    /// Let an erased subject's id belong to someone new (a recycled account number, a person
    /// who registers again): events with a source time from --from (default: now) on are kept
    /// under a new key, earlier ones (the erased person's, on any replay) stay dropped. Without
    /// it, every event of an erased id is dropped for good. Recorded in the audit table.
    ReuseSubject {
        #[arg(long)]
        config: PathBuf,
        /// The subject id, as the source has it.
        #[arg(long)]
        subject: String,
        #[arg(long)]
        domain: Option<String>,
        /// RFC 3339 time from which the id's events are the new owner's (default: now).
        #[arg(long)]
        from: Option<String>,
        /// The request's reference (e.g. a ticket number).
        #[arg(long)]
        request_id: String,
        /// Who asked (recorded, as a keyed token).
        #[arg(long)]
        requested_by: String,
    },
    /// Compute the hourly pre-aggregations (`[[aggregates]]`): without --from/--to the hours
    /// that are due (new rows since the last computation, hour ended the lateness ago); with
    /// them every hour in [from, to), a backfill or recomputation. Prints a report (JSON).
    Aggregate {
        #[arg(long)]
        config: PathBuf,
        /// RFC 3339 time: the first hour to compute.
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// RFC 3339 time: hours before it are computed.
        #[arg(long, requires = "from")]
        to: Option<String>,
    },
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
    },
    /// Write deterministic demo/benchmark change events (a debt-collection domain).
    Generate {
        /// Number of events.
        #[arg(long, default_value_t = 1000)]
        events: u64,
        /// Output file (`.jsonl`, or `.jsonl.gz` to compress).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Wrap each event as `{"schema": …, "payload": …}` like the Kafka Connect JSON converter.
        #[arg(long)]
        wrapped: bool,
        /// Hours the events' times spread over, from 2024-01-01T00:00Z.
        #[arg(long, default_value_t = generate::DEFAULT_SPAN_HOURS)]
        span_hours: u64,
        /// Customers the book already holds (ids 0..N): changes, payments and contacts touch
        /// them at random, so subjects rarely repeat (benchmarks at realistic cardinality).
        /// Default 0: every customer is created by the events and they repeat a lot.
        #[arg(long, default_value_t = 0)]
        subjects: u64,
    },
    /// Scan files for known sensitive values (and their digit-only, base64, hex and unkeyed
    /// digest forms), decoding Parquet and gzip. Exits 1 if any is found.
    AuditLeaks {
        /// File with one sensitive value per line.
        #[arg(long)]
        values: PathBuf,
        /// Files or directories to scan.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn postgres_source(
    cfg: &config::Config,
    p: &config::PostgresSourceConfig,
    once: bool,
) -> anyhow::Result<sluice_connectors::postgres::PostgresSource> {
    // Raw mode writes no lake: its positions are its own checkpoint's.
    let snapshot_sinks = match cfg.raw_stream {
        Some(_) => Vec::new(),
        None => snapshot_sinks(cfg),
    };
    let keys = runtime::open_key_store(cfg, runtime::SMALL_KEY_STORE_MEMORY)?;
    let tables = cfg
        .policies
        .iter()
        .map(|policy| match policy.table.split_once('.') {
            Some((schema, table)) => (schema.to_string(), table.to_string()),
            None => ("public".to_string(), policy.table.clone()),
        })
        .collect();
    Ok(sluice_connectors::postgres::PostgresSource::new(
        sluice_connectors::postgres::PostgresOptions {
            settings: sluice_connectors::postgres::PgSettings {
                host: p.host.clone(),
                port: p.port,
                user: p.user.clone(),
                password: p.password()?,
                database: p.database.clone(),
                slot: p.slot.clone(),
                publication: p.publication.clone(),
            },
            name: cfg.name.clone(),
            tables,
            spool_dir: p.spool_dir.clone(),
            spool_key: keys.system_key("snapshot-spool")?,
            chunk_events: cfg.workers.chunk_events,
            heartbeat: Duration::from_millis(p.heartbeat_ms),
            once,
            snapshot_sinks,
            app_prefix: cfg.name.clone(),
        },
    )?)
}

/// Per policy table, the tables its rows can land in: its own (one per format), the vault, the
/// quarantine.
fn snapshot_sinks(cfg: &config::Config) -> Vec<Vec<TableLocation>> {
    let (locations, set) = (cfg.sink_locations(), cfg.sink_set());
    let (vault, quarantine) = (&locations[set.vault()], &locations[set.quarantine()]);
    cfg.policies
        .iter()
        .map(|p| {
            let mut l = cfg.table_locations(p);
            l.extend([vault.clone(), quarantine.clone()]);
            l
        })
        .collect()
}

fn kinesis_source(
    cfg: &config::Config,
    k: &config::KinesisSourceConfig,
    stream: String,
    replay: Option<(source::ReplayFrom, source::ReplayTo)>,
    once: bool,
) -> anyhow::Result<sluice_connectors::kinesis::KinesisSource> {
    Ok(sluice_connectors::kinesis::KinesisSource::new(
        sluice_connectors::kinesis::KinesisOptions {
            settings: k.settings.clone(),
            stream,
            worker_index: k.worker_index,
            worker_count: k.worker_count,
            start_at: k.start_at,
            replay,
            once,
            poll: Duration::from_millis(k.poll_ms),
            max_event_bytes: cfg.input.max_event_bytes,
            lake: cfg.sink_locations(),
            app_prefix: cfg.name.clone(),
        },
    )?)
}

/// Prints the summary and writes it as JSON if asked.
fn report(cfg: &config::Config, summary: &summary::Summary, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let root = match cfg.lake_root.local() {
        Some(p) => std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string(),
        None => cfg.lake_root.to_string(),
    };
    print!("{}", summary.render(&root));
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn parse_time(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// A replay bound: the keyword (`earliest`/`latest`), a non-negative offset or an RFC 3339 time.
enum Bound {
    Keyword,
    Offset(i64),
    Time(i64),
}

fn parse_bound(flag: &str, keyword: &str, text: &str) -> anyhow::Result<Bound> {
    if text == keyword {
        return Ok(Bound::Keyword);
    }
    match (text.parse::<i64>(), parse_time(text)) {
        (Ok(o), _) if o >= 0 => Ok(Bound::Offset(o)),
        (_, Some(ms)) => Ok(Bound::Time(ms)),
        _ => anyhow::bail!("{flag} {text}: expected {keyword}, an offset or an RFC 3339 time"),
    }
}

fn parse_from(text: &str) -> anyhow::Result<source::ReplayFrom> {
    use source::ReplayFrom;
    Ok(match parse_bound("--from", "earliest", text)? {
        Bound::Keyword => ReplayFrom::Earliest,
        Bound::Offset(o) => ReplayFrom::Offset(o),
        Bound::Time(ms) => ReplayFrom::Time(ms),
    })
}

fn parse_to(text: &str) -> anyhow::Result<source::ReplayTo> {
    use source::ReplayTo;
    Ok(match parse_bound("--to", "latest", text)? {
        Bound::Keyword => ReplayTo::Latest,
        Bound::Offset(o) => ReplayTo::Offset(o),
        Bound::Time(ms) => ReplayTo::Time(ms),
    })
}

/// Runs a replay with its progress line.
fn run_with_progress(
    cfg: &config::Config,
    source: &mut dyn source::Source,
    events: std::sync::Arc<std::sync::atomic::AtomicU64>,
    behind: progress::Behind,
) -> Result<summary::Summary, runtime::RunError> {
    let progress = progress::Progress::start(events, behind);
    let summary = runtime::run(cfg, source);
    progress.finish();
    summary
}

/// Transparent huge pages off for this process: mimalloc asks for them on its arenas, and every
/// buffer that grows into fresh memory then faults in and zeroes 2 MiB — a fifth of all CPU
/// time in the benchmark's profile, and ~80 MiB more peak RSS. With 4 KiB pages only what is
/// touched is zeroed.
fn no_huge_pages() {
    // SAFETY: prctl with an integer option and no pointers; a failure leaves THP as it was.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Freed memory goes back to the OS after 1 ms instead of mimalloc's 10: batches free large
/// buffers all the time, and memory waiting to be returned was a third of peak RSS (the
/// budget, `[workers] memory_mb`, bounds what is in use). Costs ~1 CPU-s per million events.
fn return_freed_memory_promptly() {
    /// `mi_option_purge_delay` in mimalloc.h (v3), which the bindings do not name.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an option value; called before any thread but this one exists.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1);
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    return_freed_memory_promptly();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    install_panic_hook();
    match execute(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, skipping a cause whose text the message already carries.
fn describe(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

/// A panic that nothing handles where it happens (a sanitizer panic is handled: its event is
/// quarantined) stops the process at once, exit code 70, with one error line: a supervisor
/// restarts it, and nothing half-done was committed (commits are atomic). A process that hung
/// on with a dead thread would look healthy while doing nothing. The panic's own message is
/// not shown: it could quote data.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let current = std::thread::current();
        let thread = current.name().unwrap_or("unnamed");
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if worker::panic_is_caught() {
            tracing::warn!(thread, at = %at, "panic while sanitizing a chunk: its events are done again one by one");
            return;
        }
        tracing::error!(thread, at = %at, "panic: stopping with exit code 70 (its message is not shown: it could quote data)");
        std::process::exit(70);
    }));
}

fn init_logging(format: LogFormat) {
    // The Delta kernel logs "no files in log segment" at error level while creating a table;
    // its real failures reach us as errors anyway.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| "info,deltalake=warn,deltalake_core=error,buoyant_kernel=off".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(RunArgs {
            config,
            once,
            summary_json,
        }) => {
            let cfg = config::Config::load(&config)?;
            start_service(&cfg)?;
            if !once {
                schedule_aggregation(&cfg);
                schedule_compaction(&cfg);
            }
            let summary = match &cfg.source {
                config::SourceConfig::File {
                    path,
                    poll_ms,
                    follow_symlinks,
                    fingerprints,
                } => {
                    let mut source = sluice_connectors::file::FileSource::new(
                        path.clone(),
                        cfg.input.max_event_bytes,
                        cfg.workers.chunk_events,
                        once,
                        Duration::from_millis(*poll_ms),
                    )
                    .with_files(*follow_symlinks, fingerprints.clone());
                    runtime::run(&cfg, &mut source)?
                }
                config::SourceConfig::Kafka(k) => {
                    let positions = sluice_connectors::kafka::LakePositions {
                        tables: cfg.sink_locations(),
                        app_prefix: cfg.name.clone(),
                        start_at: k.start_at,
                    };
                    let group = sluice_connectors::kafka::GroupSettings {
                        group_id: k.group_id.clone(),
                        topics: k.topics.clone(),
                        start_at: k.start_at,
                        session_timeout_ms: k.session_timeout_ms,
                    };
                    let mut source = sluice_connectors::kafka::group_source(
                        &k.settings,
                        &group,
                        positions,
                        cfg.input.max_event_bytes,
                        cfg.workers.chunk_events,
                        once,
                    )?;
                    runtime::run(&cfg, &mut source)?
                }
                config::SourceConfig::Kinesis(k) => {
                    let mut source = kinesis_source(&cfg, k, k.stream.clone(), None, once)?;
                    runtime::run(&cfg, &mut source)?
                }
                config::SourceConfig::Postgres(p) => runtime::run(&cfg, &mut postgres_source(&cfg, p, once)?)?,
            };
            if once && !shutdown::requested() {
                aggregate_due(&cfg)?;
            }
            report(&cfg, &summary, summary_json.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Capture(RunArgs {
            config,
            once,
            summary_json,
        }) => {
            let cfg = config::Config::load(&config)?;
            let config::SourceConfig::Postgres(p) = &cfg.source else {
                anyhow::bail!("{}: capture needs [source] kind = \"postgres\"", config.display());
            };
            start_service(&cfg)?;
            let mut source = postgres_source(&cfg, p, once)?;
            if let Some(target) = &cfg.raw_stream {
                let checkpoint = p.spool_dir.join(format!("{}.raw-positions.json", p.slot));
                let summary = raw_capture::run_raw(&mut source, target, &checkpoint)?;
                println!(
                    "sluice raw capture: {} events pushed unsanitized to the raw stream, {} checkpoints",
                    summary.events, summary.checkpoints
                );
                return Ok(ExitCode::SUCCESS);
            }
            if !once {
                schedule_aggregation(&cfg);
                schedule_compaction(&cfg);
            }
            let summary = runtime::run(&cfg, &mut source)?;
            if once && !shutdown::requested() {
                aggregate_due(&cfg)?;
            }
            report(&cfg, &summary, summary_json.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            from,
            to,
            topic,
            stream,
            into,
            summary_json,
        } => {
            let mut cfg = config::Config::load(&config)?;
            let (from, to) = (parse_from(&from)?, parse_to(&to)?);
            if let Some(root) = &into {
                cfg.redirect_lake(root);
            }
            start_service(&cfg)?;
            let summary = match cfg.source.clone() {
                config::SourceConfig::Kafka(k) => {
                    if stream.is_some() {
                        anyhow::bail!("{}: --stream is for a kinesis source", config.display());
                    }
                    let topics = if topic.is_empty() { k.topics.clone() } else { topic };
                    if let Some(t) = topics.iter().find(|t| t.starts_with('^')) {
                        anyhow::bail!("topic pattern {t}: name the topics to replay with --topic");
                    }
                    let range = sluice_connectors::kafka::ReplayRange { topics, from, to };
                    let mut source = sluice_connectors::kafka::replay_source(
                        &k.settings,
                        range,
                        cfg.input.max_event_bytes,
                        cfg.workers.chunk_events,
                    )?;
                    let behind = progress::Behind::Messages(source.lag());
                    let events = source.events.clone();
                    run_with_progress(&cfg, &mut source, events, behind)?
                }
                config::SourceConfig::Kinesis(k) => {
                    if !topic.is_empty() {
                        anyhow::bail!("{}: --topic is for a kafka source", config.display());
                    }
                    if matches!(from, source::ReplayFrom::Offset(_)) || matches!(to, source::ReplayTo::Offset(_)) {
                        anyhow::bail!("kinesis replays take earliest, latest or a time, not an offset");
                    }
                    let name = stream.unwrap_or_else(|| k.stream.clone());
                    let mut source = kinesis_source(&cfg, &k, name, Some((from, to)), true)?;
                    let behind = progress::Behind::Millis(source.behind_ms.clone());
                    let events = source.events.clone();
                    run_with_progress(&cfg, &mut source, events, behind)?
                }
                config::SourceConfig::File { .. } | config::SourceConfig::Postgres(_) => {
                    anyhow::bail!("{}: replay needs a kafka or kinesis source", config.display())
                }
            };
            report(&cfg, &summary, summary_json.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Aggregate { config, from, to } => {
            let cfg = config::Config::load(&config)?;
            let hours = match (from, to) {
                (Some(from), Some(to)) => {
                    let parse = |t: &str| {
                        chrono::DateTime::parse_from_rfc3339(t)
                            .map(|t| t.timestamp_micros())
                            .with_context(|| format!("`{t}`: expected an RFC 3339 time"))
                    };
                    aggregate::Hours::Range {
                        from_us: parse(&from)?,
                        to_us: parse(&to)?,
                    }
                }
                _ => aggregate::Hours::Due {
                    now_us: chrono::Utc::now().timestamp_micros(),
                },
            };
            let reports = aggregate::run(&cfg, hours)?;
            println!("{}", serde_json::to_string_pretty(&reports)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Compact { config } => {
            let cfg = config::Config::load(&config)?;
            let report = compact::compact_all(&cfg)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let cfg = config::Config::load(&config)?;
            print!("{}", manifest::render(&cfg));
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            events,
            out,
            seed,
            wrapped,
            span_hours,
            subjects,
        } => {
            let written = generate::write_events(&out, events, seed, wrapped, span_hours, subjects)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {written} events to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Forget {
            config,
            mut subjects,
            subjects_file,
            domain,
            request_id,
            requested_by,
            dry_run,
            allow_absent,
            unattributed,
            receipt_json,
            settle_ms,
        } => {
            let cfg = config::Config::load(&config)?;
            if let Some(file) = subjects_file {
                let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
                subjects.extend(subjects_from_lines(&text));
            }
            let receipt = forget::forget(
                &cfg,
                forget::ForgetRequest {
                    subjects,
                    domain,
                    request_id,
                    requested_by,
                    dry_run,
                    unattributed,
                    settle: match settle_ms {
                        Some(ms) => Duration::from_millis(ms),
                        None => cfg.erasure_refresh + Duration::from_millis(cfg.batch.max_age_ms),
                    },
                },
                &[Box::new(aggregate::AggregatesAfterErasure { config: &cfg })],
            )?;
            let text = serde_json::to_string_pretty(&receipt)?;
            println!("{text}");
            if let Some(path) = receipt_json {
                std::fs::write(&path, &text).with_context(|| path.display().to_string())?;
            }
            if !receipt.verification.passed && !dry_run {
                return Ok(ExitCode::from(1));
            }
            if receipt.subjects_without_rows > 0 && !allow_absent {
                eprintln!(
                    "error: {} of the {} subjects matched no row in any table (never ingested, erased before, or a wrong id or --domain); their keys, if any, are destroyed. Check the ids, or pass --allow-absent if this is expected",
                    receipt.subjects_without_rows,
                    receipt.subject_tokens.len()
                );
                return Ok(ExitCode::from(3));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ReuseSubject {
            config,
            subject,
            domain,
            from,
            request_id,
            requested_by,
        } => {
            let cfg = config::Config::load(&config)?;
            let from_ms = match from {
                Some(t) => chrono::DateTime::parse_from_rfc3339(&t)
                    .with_context(|| format!("--from {t}: not an RFC 3339 time"))?
                    .timestamp_millis(),
                None => chrono::Utc::now().timestamp_millis(),
            };
            let receipt = forget::release_for_reuse(
                &cfg,
                forget::ReuseRequest {
                    subject,
                    domain,
                    from_ms,
                    request_id,
                    requested_by,
                },
            )?;
            println!("{}", serde_json::to_string_pretty(&receipt)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::AuditLeaks { values, paths } => {
            let report = audit::scan(&values, &paths)?;
            print!("{}", report.render());
            Ok(if report.hits.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Computes the aggregates' due hours (the end of a `--once` run).
/// What every long-running command gets: graceful shutdown on SIGTERM/SIGINT and, when
/// `[http] listen` is set, `/metrics`, `/health` and `/ready`.
fn start_service(cfg: &config::Config) -> anyhow::Result<()> {
    shutdown::install(Duration::from_millis(cfg.shutdown.timeout_ms)).context("installing signal handlers")?;
    if let Some(listen) = &cfg.http.listen {
        observe::serve(listen, cfg.ready_max_age()).with_context(|| format!("http.listen {listen}"))?;
    }
    Ok(())
}

fn aggregate_due(cfg: &config::Config) -> Result<(), aggregate::AggregateError> {
    if !cfg.aggregates.is_empty() {
        aggregate::run(
            cfg,
            aggregate::Hours::Due {
                now_us: chrono::Utc::now().timestamp_micros(),
            },
        )?;
    }
    Ok(())
}

/// The daemon's hourly aggregation: at start, then each hour once the lateness has passed.
/// A failed pass is logged and retried at the next one (the tables are replaced per hour).
fn schedule_aggregation(cfg: &config::Config) {
    if cfg.aggregates.is_empty() {
        return;
    }
    let cfg = cfg.clone();
    let lateness = cfg.aggregates.iter().map(|a| a.lateness).min().unwrap_or_default();
    std::thread::Builder::new()
        .name("sluice-aggregate".into())
        .spawn(move || loop {
            let now = chrono::Utc::now().timestamp_micros();
            match aggregate::run(&cfg, aggregate::Hours::Due { now_us: now }) {
                Ok(reports) => {
                    let hours: usize = reports.iter().map(|r| r.hours.len()).sum();
                    tracing::info!(hours, "hourly aggregation done");
                }
                Err(e) => tracing::warn!("hourly aggregation failed, retried next hour: {e}"),
            }
            let hour = 3_600_000_000i64;
            let next = (now / hour + 1) * hour + lateness.as_micros() as i64;
            let wait = (next - chrono::Utc::now().timestamp_micros()).max(1_000_000);
            std::thread::sleep(Duration::from_micros(wait as u64));
        })
        .expect("spawn the aggregation thread");
}

/// The daemon's compaction, every `[compaction] interval_ms` (first after one interval). A
/// failed pass is logged and tried again at the next.
fn schedule_compaction(cfg: &config::Config) {
    if cfg.compaction.interval_ms == 0 {
        return;
    }
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("sluice-compact".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(cfg.compaction.interval_ms));
            if let Err(e) = compact::compact_all(&cfg) {
                tracing::warn!("compaction failed, tried again next time: {e}");
            }
        })
        .expect("spawn the compaction thread");
}

/// Subject ids from a file: one per line, a CSV's first column; comments and a header skipped.
fn subjects_from_lines(text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let cell = sluice_transforms::crypto::canonical_identifier(line.split(',').next().unwrap_or(""));
            let first = cell.trim_matches('"');
            let header = i == 0 && matches!(first.to_ascii_lowercase().as_str(), "id" | "subject" | "subject_id");
            (!first.is_empty() && !first.starts_with('#') && !header).then(|| first.to_string())
        })
        .collect()
}
