//! `[governance]`: the classes policies may give their columns (the documented ones and the
//! pipeline's own), and how re-identification (`sluice reveal`) is approved; `[retention]`:
//! how rows past their policy's `retention_days` are removed.

use std::path::PathBuf;

use serde::Deserialize;
use sluice_transforms::policy::CLASSES;
use sluice_transforms::{ConfigError, Policy};
use toml::Spanned;

use super::LoadError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGovernance {
    /// Classes beyond the documented ones (`criminal_offence`, `child_data`, …).
    #[serde(default)]
    classes: Vec<Spanned<String>>,
    #[serde(default)]
    reveal: Option<Spanned<RevealConfig>>,
}

/// How a re-identification request is approved.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RevealConfig {
    /// Distinct approvals a request needs, none of them the requester's.
    #[serde(default = "default_approvals")]
    pub approvals: u32,
    /// A request not run within this many hours of being made can no longer be run.
    #[serde(default = "default_expiry_hours")]
    pub expiry_hours: u32,
}

impl Default for RevealConfig {
    fn default() -> Self {
        RevealConfig {
            approvals: default_approvals(),
            expiry_hours: default_expiry_hours(),
        }
    }
}

fn default_approvals() -> u32 {
    1
}

fn default_expiry_hours() -> u32 {
    72
}

/// `sluice retain`, and a daemon's schedule of it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// A daemon removes rows past their retention this often (milliseconds; 0: never). Runs
    /// only when a policy or aggregate sets `retention_days`.
    pub interval_ms: u64,
    /// Also crypto-shred the keys of subjects none of whose rows remain in any table or the
    /// vault (their later events get a new key).
    pub shred_keys: bool,
    /// Quarantined events of any table (or none) older than this many days are removed too.
    pub quarantine_days: Option<u32>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            interval_ms: 24 * 3600 * 1000,
            shred_keys: false,
            quarantine_days: None,
        }
    }
}

/// The shortest interval between a daemon's retention runs (each rewrites what it removes from).
const MIN_RETENTION_INTERVAL_MS: u64 = 100;

/// `[retention]`, checked: an interval of 0 (never) or at least [`MIN_RETENTION_INTERVAL_MS`],
/// a quarantine limit of 1 day to a century.
pub(super) fn retention_config(
    raw: RetentionConfig,
    text: &str,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<RetentionConfig, LoadError> {
    let at = |key: &str| {
        let section = text.find("[retention]").unwrap_or(0);
        text[section..].find(key).map_or(section, |i| section + i)
    };
    if raw.interval_ms != 0 && raw.interval_ms < MIN_RETENTION_INTERVAL_MS {
        return Err(invalid(
            at("interval_ms"),
            "retention.interval_ms",
            format!("must be 0 (never) or at least {MIN_RETENTION_INTERVAL_MS}"),
        ));
    }
    if let Some(days) = raw.quarantine_days {
        if !(1..=sluice_transforms::policy::MAX_RETENTION_DAYS).contains(&days) {
            return Err(invalid(
                at("quarantine_days"),
                "retention.quarantine_days",
                format!(
                    "must be 1 to {} (days a quarantined event is kept)",
                    sluice_transforms::policy::MAX_RETENTION_DAYS
                ),
            ));
        }
    }
    Ok(raw)
}

/// The most approvals a request may need, and the longest a request may stay open (90 days).
const MAX_APPROVALS: u32 = 10;
const MAX_EXPIRY_HOURS: u32 = 90 * 24;

#[derive(Debug, Clone, Default)]
pub struct GovernanceConfig {
    /// Every class a policy may use: the documented ones, then the pipeline's own.
    pub classes: Vec<String>,
    pub reveal: RevealConfig,
}

pub(super) fn governance_config(
    raw: &RawGovernance,
    text: &str,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<GovernanceConfig, LoadError> {
    let mut classes: Vec<String> = CLASSES.iter().map(|(name, _)| name.to_string()).collect();
    for class in &raw.classes {
        let name = class.get_ref();
        if !sluice_transforms::policy::is_class_name(name) {
            return Err(invalid(
                class.span().start,
                "governance.classes",
                format!("`{name}` is not a lower-case name (letters, digits and _)"),
            ));
        }
        if !classes.contains(name) {
            classes.push(name.clone());
        }
    }
    let reveal = match &raw.reveal {
        None => RevealConfig::default(),
        Some(r) => {
            // The key's own line, within the section.
            let section = r.span();
            let at = |key: &str| {
                text.get(section.clone())
                    .and_then(|s| s.find(key))
                    .map_or(section.start, |i| section.start + i)
            };
            let reveal = r.get_ref().clone();
            if !(1..=MAX_APPROVALS).contains(&reveal.approvals) {
                return Err(invalid(
                    at("approvals"),
                    "governance.reveal.approvals",
                    format!("must be 1 to {MAX_APPROVALS}: approvals by people other than the requester"),
                ));
            }
            if !(1..=MAX_EXPIRY_HOURS).contains(&reveal.expiry_hours) {
                return Err(invalid(
                    at("expiry_hours"),
                    "governance.reveal.expiry_hours",
                    format!("must be 1 to {MAX_EXPIRY_HOURS} (90 days)"),
                ));
            }
            reveal
        }
    };
    Ok(GovernanceConfig { classes, reveal })
}

/// Every class a policy gives a column or a derived column is a known one; the error names the
/// policy file, the line of the class and the field.
pub(super) fn classes_known(
    policies: &[Policy],
    texts: &[(PathBuf, String)],
    known: &[String],
) -> Result<(), LoadError> {
    for (policy, (file, text)) in policies.iter().zip(texts) {
        for rule in &policy.rules {
            let classes = std::iter::once((rule.class.as_ref(), format!("columns.{}.class", rule.column))).chain(
                rule.derive
                    .iter()
                    .map(|d| (d.class.as_ref(), format!("columns.{}.derive.class", rule.column))),
            );
            for (class, field) in classes {
                let Some(class) = class.filter(|c| !known.contains(c)) else {
                    continue;
                };
                let section = text.find(&format!("[columns.{}]", rule.column)).unwrap_or(0);
                let at = text[section..]
                    .find(&format!("\"{class}\""))
                    .map(|i| section + i)
                    .unwrap_or(section);
                return Err(ConfigError::new(
                    file,
                    text,
                    at,
                    field,
                    format!(
                        "unknown class `{class}`: one of {} (add others under [governance] classes in the pipeline config)",
                        known.join(", ")
                    ),
                )
                .into());
            }
        }
    }
    Ok(())
}
