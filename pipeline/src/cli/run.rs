//! `sluice run` and `sluice capture`: the daemon (or a `--once` pass) on the configured source.

use std::process::ExitCode;

use super::args::RunArgs;
use super::service::{
    aggregate_due, report, schedule_aggregation, schedule_compaction, schedule_retention, start_service,
};
use crate::sources;
use crate::{config, raw_capture, runtime, shutdown};

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::Config::load(&args.config)?;
    start_service(&cfg)?;
    if !args.once {
        schedule_aggregation(&cfg);
        schedule_compaction(&cfg);
        schedule_retention(&cfg);
    }
    let mut source = sources::build(&cfg, args.once)?;
    let summary = runtime::run(&cfg, source.as_mut())?;
    if args.once && !shutdown::requested() {
        aggregate_due(&cfg)?;
    }
    report(&cfg, &summary, args.summary_json.as_deref())?;
    Ok(ExitCode::SUCCESS)
}

pub fn capture(args: RunArgs) -> anyhow::Result<ExitCode> {
    let RunArgs {
        config,
        once,
        summary_json,
    } = args;
    let cfg = config::Config::load(&config)?;
    let config::SourceConfig::Postgres(p) = &cfg.source else {
        anyhow::bail!("{}: capture needs [source] kind = \"postgres\"", config.display());
    };
    start_service(&cfg)?;
    let mut source = sources::postgres_source(&cfg, p, once)?;
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
        schedule_retention(&cfg);
    }
    let summary = runtime::run(&cfg, &mut source)?;
    if once && !shutdown::requested() {
        aggregate_due(&cfg)?;
    }
    report(&cfg, &summary, summary_json.as_deref())?;
    Ok(ExitCode::SUCCESS)
}
