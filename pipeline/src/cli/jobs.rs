//! The one-shot jobs and tools: `aggregate`, `compact`, `check`, `generate`, `audit-leaks`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use sluice_connectors::lake::SchemaChange;

use super::args::{AggregateArgs, AuditLeaksArgs, GenerateArgs};
use crate::{aggregate, audit, compact, config, generate, manifest};

pub fn aggregate(args: AggregateArgs) -> anyhow::Result<ExitCode> {
    let AggregateArgs { config, from, to } = args;
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

pub fn compact(config: &Path) -> anyhow::Result<ExitCode> {
    let cfg = config::Config::load(config)?;
    let report = compact::compact_all(&cfg)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

pub fn check(config: &Path, tables: bool, tags_json: bool) -> anyhow::Result<ExitCode> {
    let cfg = config::Config::load(config)?;
    if tags_json {
        println!("{}", serde_json::to_string_pretty(&manifest::tags_json(&cfg))?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", manifest::render(&cfg));
    if !tables {
        return Ok(ExitCode::SUCCESS);
    }
    println!("\nTables (what the next run does to each one's columns):");
    let mut refused = false;
    for (label, change) in crate::sinks::schema_changes(&cfg)? {
        match change {
            Ok(change) => {
                refused |= matches!(change, SchemaChange::Refused { .. });
                println!("  {label}: {change}");
            }
            Err(e) => println!("  {label}: not read ({e})"),
        }
    }
    Ok(if refused { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

pub fn retain(config: &Path, dry_run: bool) -> anyhow::Result<ExitCode> {
    let cfg = config::Config::load(config)?;
    if !crate::retain::configured(&cfg) {
        eprintln!("no policy or aggregate sets retention_days (nor [retention] quarantine_days): nothing to remove, nothing recorded");
        return Ok(ExitCode::SUCCESS);
    }
    let report = crate::retain::retain(&cfg, dry_run)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let GenerateArgs {
        events,
        out,
        seed,
        wrapped,
        span_hours,
        subjects,
    } = args;
    let written = generate::write_events(&out, events, seed, wrapped, span_hours, subjects)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {written} events to {}", out.display());
    Ok(ExitCode::SUCCESS)
}

pub fn audit_leaks(args: AuditLeaksArgs) -> anyhow::Result<ExitCode> {
    let AuditLeaksArgs { values, paths } = args;
    let report = audit::scan(&values, &paths)?;
    print!("{}", report.render());
    Ok(if report.hits.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
