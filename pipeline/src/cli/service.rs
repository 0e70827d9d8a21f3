//! What every long-running command shares: signals, the HTTP endpoints, the daemon's scheduled
//! jobs, and the run summary.

use std::time::Duration;

use anyhow::Context;

use crate::{aggregate, compact, config, observe, shutdown, summary};

/// Prints the summary and writes it as JSON if asked.
pub fn report(cfg: &config::Config, summary: &summary::Summary, json: Option<&std::path::Path>) -> anyhow::Result<()> {
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

/// What every long-running command gets: graceful shutdown on SIGTERM/SIGINT and, when
/// `[http] listen` is set, `/metrics`, `/health` and `/ready`.
pub fn start_service(cfg: &config::Config) -> anyhow::Result<()> {
    shutdown::install(Duration::from_millis(cfg.shutdown.timeout_ms)).context("installing signal handlers")?;
    if let Some(listen) = &cfg.http.listen {
        observe::serve(listen, cfg.ready_max_age()).with_context(|| format!("http.listen {listen}"))?;
    }
    Ok(())
}

/// Computes the aggregates' due hours (the end of a `--once` run).
pub fn aggregate_due(cfg: &config::Config) -> Result<(), aggregate::AggregateError> {
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
pub fn schedule_aggregation(cfg: &config::Config) {
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

/// The daemon's retention runs, every `[retention] interval_ms` (the first at once: rows past
/// their retention should not wait a day), when a policy or aggregate sets `retention_days`. A
/// failed run is logged and finished by the next.
pub fn schedule_retention(cfg: &config::Config) {
    if cfg.retention.interval_ms == 0 || !crate::retain::configured(cfg) {
        return;
    }
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("sluice-retain".into())
        .spawn(move || loop {
            match crate::retain::retain(&cfg, false) {
                Ok(report) => {
                    let rows: u64 = report.tables.values().map(|t| t.rows_removed).sum();
                    tracing::info!(run = %report.run_id, rows, keys = report.keys_shredded, "retention run finished");
                }
                Err(e) => tracing::warn!("retention run failed, finished next time: {e}"),
            }
            std::thread::sleep(Duration::from_millis(cfg.retention.interval_ms));
        })
        .expect("spawn the retention thread");
}

/// The daemon's compaction, every `[compaction] interval_ms` (first after one interval). A
/// failed pass is logged and tried again at the next.
pub fn schedule_compaction(cfg: &config::Config) {
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
