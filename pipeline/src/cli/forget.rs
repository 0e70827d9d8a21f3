//! `sluice forget` (right to be forgotten) and `sluice reuse-subject`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::args::{ForgetArgs, ReuseSubjectArgs};
use crate::{aggregate, config, forget};

pub fn forget(args: ForgetArgs) -> anyhow::Result<ExitCode> {
    let ForgetArgs {
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
    } = args;
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

pub fn reuse_subject(args: ReuseSubjectArgs) -> anyhow::Result<ExitCode> {
    let ReuseSubjectArgs {
        config,
        subject,
        domain,
        from,
        request_id,
        requested_by,
    } = args;
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

/// Subject ids from a file: one per line, a CSV's first column; comments and a header skipped.
pub(super) fn subjects_from_lines(text: &str) -> Vec<String> {
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
