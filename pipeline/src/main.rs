//! `sluice`: sanitize change events into a lakehouse without letting raw personal data out.

mod audit;
mod config;
mod generate;
mod manifest;
mod quarantine;
mod runtime;
mod summary;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

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
    about = "Sanitize Debezium change events into Delta Lake tables and a PII vault"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline: read events, sanitize, commit tables, vault and quarantine.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Stop at the end of the input (otherwise keep polling for new events).
        #[arg(long)]
        once: bool,
        /// Also write the run summary as JSON to this file.
        #[arg(long)]
        summary_json: Option<PathBuf>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
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

fn init_logging(format: LogFormat) {
    // The Delta kernel logs "no files in log segment" at error level while creating a table;
    // its real failures reach us as errors anyway.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| "info,deltalake=warn,deltalake_core=error,buoyant_kernel=off".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            once,
            summary_json,
        } => {
            let cfg = config::Config::load(&config)?;
            let summary = runtime::run(&cfg, &runtime::RunOptions { once })?;
            let root = cfg
                .tables_root
                .parent()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
                .unwrap_or_default();
            let root = root.display().to_string();
            print!("{}", summary.render(&root));
            if let Some(path) = summary_json {
                std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
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
        } => {
            let written = generate::write_events(&out, events, seed, wrapped)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {written} events to {}", out.display());
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
