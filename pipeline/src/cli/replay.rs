//! `sluice replay`: a range of the Kafka topics or the Kinesis stream, into the live lake or a
//! fresh root.

use std::process::ExitCode;

use sluice_connectors::source;

use super::args::ReplayArgs;
use super::service::{report, start_service};
use crate::sources;
use crate::{config, progress, runtime, summary};

pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let ReplayArgs {
        config,
        from,
        to,
        topic,
        stream,
        into,
        summary_json,
    } = args;
    let mut cfg = config::Config::load(&config)?;
    let (from, to) = (parse_from(&from)?, parse_to(&to)?);
    if let Some(root) = &into {
        cfg.redirect_lake(root);
    }
    start_service(&cfg)?;
    // The flags' checks are the CLI's; the connector builds the reader.
    let (topics, stream) = match &cfg.source {
        config::SourceConfig::Kafka(k) => {
            if stream.is_some() {
                anyhow::bail!("{}: --stream is for a kinesis source", config.display());
            }
            let topics = if topic.is_empty() { k.topics.clone() } else { topic };
            if let Some(t) = topics.iter().find(|t| t.starts_with('^')) {
                anyhow::bail!("topic pattern {t}: name the topics to replay with --topic");
            }
            (topics, String::new())
        }
        config::SourceConfig::Kinesis(k) => {
            if !topic.is_empty() {
                anyhow::bail!("{}: --topic is for a kafka source", config.display());
            }
            if matches!(from, source::ReplayFrom::Offset(_)) || matches!(to, source::ReplayTo::Offset(_)) {
                anyhow::bail!("kinesis replays take earliest, latest or a time, not an offset");
            }
            (Vec::new(), stream.unwrap_or_else(|| k.stream.clone()))
        }
        config::SourceConfig::File(_) | config::SourceConfig::Postgres(_) => {
            anyhow::bail!("{}: replay needs a kafka or kinesis source", config.display())
        }
    };
    let replay = source::Replay {
        from,
        to,
        topics,
        stream,
    };
    let Some(mut replaying) = sources::replay(&cfg, replay)? else {
        anyhow::bail!("{}: replay needs a kafka or kinesis source", config.display())
    };
    let summary = run_with_progress(&cfg, replaying.source.as_mut(), replaying.progress)?;
    report(&cfg, &summary, summary_json.as_deref())?;
    Ok(ExitCode::SUCCESS)
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
    read: source::ReadProgress,
) -> Result<summary::Summary, runtime::RunError> {
    let progress = progress::Progress::start(read.events, read.behind);
    let summary = runtime::run(cfg, source);
    progress.finish();
    summary
}
