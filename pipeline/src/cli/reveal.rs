//! `sluice reveal` (re-identification with approval) and `sluice audit` (the audit table).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use super::args::RevealCommand;
use crate::reveal::{self, NewRequest, Output, RevealError};
use crate::{audit_table, config};

pub fn reveal(command: RevealCommand) -> anyhow::Result<ExitCode> {
    let refused = |e: RevealError| -> anyhow::Result<ExitCode> {
        match e {
            RevealError::Refused(why) => {
                eprintln!("refused: {why}");
                Ok(ExitCode::from(1))
            }
            other => Err(other.into()),
        }
    };
    match command {
        RevealCommand::Request {
            config,
            mut subjects,
            subjects_file,
            domain,
            columns,
            reason,
            requested_by,
        } => {
            let cfg = config::Config::load(&config)?;
            if let Some(file) = subjects_file {
                let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
                subjects.extend(super::forget::subjects_from_lines(&text));
            }
            match reveal::request(
                &cfg,
                NewRequest {
                    subjects,
                    domain,
                    columns,
                    reason,
                    requested_by,
                },
            ) {
                Ok(request) => {
                    println!("{}", serde_json::to_string_pretty(&shown(&request))?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refused(e),
            }
        }
        RevealCommand::Approve {
            config,
            request,
            approved_by,
        } => {
            let cfg = config::Config::load(&config)?;
            match reveal::approve(&cfg, &request, &approved_by) {
                Ok(request) => {
                    println!("{}", serde_json::to_string_pretty(&shown(&request))?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refused(e),
            }
        }
        RevealCommand::Run {
            config,
            request,
            run_by,
            out,
        } => {
            let cfg = config::Config::load(&config)?;
            let output = if out.as_os_str() == "-" {
                Output::Stdout
            } else {
                Output::File(out)
            };
            match reveal::run(&cfg, &request, &run_by, output) {
                Ok(summary) => {
                    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refused(e),
            }
        }
        RevealCommand::Show { config, request } => {
            let cfg = config::Config::load(&config)?;
            match reveal::show(&cfg, &request) {
                Ok(request) => {
                    println!("{}", serde_json::to_string_pretty(&shown(&request))?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refused(e),
            }
        }
    }
}

/// A request as printed: its state and its status now.
fn shown(request: &reveal::RevealRequest) -> serde_json::Value {
    let mut value = serde_json::to_value(request).expect("request serializes");
    value["status"] = request.status(chrono::Utc::now()).into();
    value
}

pub fn audit(config: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = config::Config::load(config)?;
    let rows = audit_table::read(&cfg)?;
    for row in &rows {
        if json {
            println!("{}", serde_json::Value::Object(row.clone()));
            continue;
        }
        let text = |name: &str| row.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let event = match text("event") {
            e if !e.is_empty() => e,
            _ if text("job_id").starts_with("reuse-") => audit_table::event::SUBJECT_REUSE.to_string(),
            _ => audit_table::event::ERASURE.to_string(),
        };
        let columns = row
            .get("columns")
            .and_then(|c| c.as_array())
            .map(|c| c.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        let outcome = match text("outcome") {
            o if !o.is_empty() => o,
            _ => format!(
                "verified: {}",
                row.get("verified").and_then(|v| v.as_bool()).unwrap_or(false)
            ),
        };
        println!(
            "{}  {:<15} {:<22} by {:<24} {} subjects{}  {}",
            text("finished_at"),
            event,
            if text("request_id").is_empty() {
                text("job_id")
            } else {
                text("request_id")
            },
            match text("actor") {
                a if !a.is_empty() => a,
                _ => text("requested_by").chars().take(16).collect(),
            },
            row.get("subjects").and_then(|v| v.as_i64()).unwrap_or(0),
            if columns.is_empty() {
                String::new()
            } else {
                format!(" [{columns}]")
            },
            outcome
        );
    }
    if !json {
        eprintln!("{} audit rows", rows.len());
    }
    Ok(ExitCode::SUCCESS)
}
