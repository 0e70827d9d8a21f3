//! The exactly-once core, in process: a run that crashes between the commits of its sinks (a
//! failpoint panics right after one sink committed, before the next), then runs again from the
//! lake, ends with every table, the vault and the quarantine holding exactly what one clean run
//! writes — nothing lost, nothing twice. Runs with `--features failpoints`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use sluice::config::Config;
use sluice::{failpoints, generate, runtime};
use sluice_connectors::datafusion::prelude::SessionContext;
use sluice_connectors::lake::Catalogs;

const EVENTS: u64 = 4_000;
/// Rows per commit, and events per chunk (commits fall between chunks): a run commits every
/// sink many times.
const MAX_ROWS: usize = 300;
const CHUNK_EVENTS: usize = 100;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A pipeline over the demo policies reading `events` (a copy of one generated file).
fn pipeline(dir: &Path, events: &Path) -> Config {
    let input = dir.join("events");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::copy(events, input.join("events.jsonl")).unwrap();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "it"
policies = ["{policies}"]
unknown_tables = "quarantine"

[source]
kind = "file"
path = "events"

[lake]
root = "lake"

[keys]
store = "keys/keystore.db"
master_key_file = "{key}"

[batch]
max_rows = {MAX_ROWS}

[workers]
chunk_events = {CHUNK_EVENTS}
"#,
            policies = repo().join("schemas/demo").display(),
            key = repo().join("fixtures/keys/TEST-ONLY-master.key").display(),
        ),
    )
    .unwrap();
    Config::load(&config).unwrap()
}

fn run_once(config: &Config) -> Result<sluice::summary::Summary, runtime::RunError> {
    let mut source = sluice::sources::build(config, true).unwrap();
    runtime::run(config, source.as_mut())
}

/// Per sink (tables in each format, vault, quarantine): rows, and distinct `_position`s where a
/// position is one row (not in the vault: a row per vaulted column).
fn contents(config: &Config) -> Vec<(String, i64, Option<i64>)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut catalogs = Catalogs::default();
        let mut out = Vec::new();
        for (i, location) in config.sink_locations().into_iter().enumerate() {
            let session = SessionContext::new();
            let name = format!("sink{i}");
            if !location.register(&mut catalogs, &session, &name, "t").await.unwrap() {
                out.push((location.describe(), 0, None));
                continue;
            }
            let one_row_per_event = i != config.sink_set().vault();
            let has_position = one_row_per_event
                && session
                    .table("t")
                    .await
                    .unwrap()
                    .schema()
                    .has_column_with_unqualified_name("_position");
            let sql = if has_position {
                "SELECT count(*), count(DISTINCT _position) FROM t"
            } else {
                "SELECT count(*) AS n, count(*) AS d FROM t"
            };
            let batches = session.sql(sql).await.unwrap().collect().await.unwrap();
            let value = |c: usize| {
                batches[0]
                    .column(c)
                    .as_any()
                    .downcast_ref::<sluice_connectors::arrow::array::Int64Array>()
                    .unwrap()
                    .value(0)
            };
            out.push((location.describe(), value(0), has_position.then(|| value(1))));
        }
        out
    })
}

fn relative(rows: Vec<(String, i64, Option<i64>)>, root: &Path) -> Vec<(String, i64, Option<i64>)> {
    let root = root.display().to_string();
    rows.into_iter()
        .map(|(name, n, d)| (name.replace(&root, ""), n, d))
        .collect()
}

#[test]
fn a_run_that_crashes_between_sink_commits_resumes_to_exactly_the_clean_result() {
    let scratch = tempfile::tempdir().unwrap();
    let events = scratch.path().join("events.jsonl");
    generate::write_events(&events, EVENTS, 7, false, 24, 0).unwrap();
    // A bad event every few hundred: the quarantine commits throughout too.
    let text = std::fs::read_to_string(&events).unwrap();
    let mut mixed = String::new();
    for (i, line) in text.lines().enumerate() {
        mixed.push_str(line);
        mixed.push('\n');
        if i % 400 == 399 {
            mixed.push_str("{\"payload\": {\"op\": \"c\", \"after\": \n");
        }
    }
    std::fs::write(&events, mixed).unwrap();

    let clean_dir = scratch.path().join("clean");
    let clean = pipeline(&clean_dir, &events);
    run_once(&clean).unwrap();
    let expected = relative(contents(&clean), &clean_dir);
    let sinks = expected.len();
    assert!(sinks >= 3, "tables, vault and quarantine: {expected:?}");
    for (name, rows, distinct) in &expected {
        assert!(*rows > 0, "{name} is empty in the clean run");
        if let Some(d) = distinct {
            assert_eq!(d, rows, "{name}: a position twice in the clean run");
        }
    }

    // Crash right after the first sink's third commit (the others have not committed that
    // round), then right after the last sink's first commit of the next run, then finish.
    let crashed_dir = scratch.path().join("crashed");
    let crashed = pipeline(&crashed_dir, &events);
    for (sink, skip) in [(0, 2), (sinks - 1, 0)] {
        failpoints::arm(&format!("after-commit:{sink}"), skip);
        let outcome = catch_unwind(AssertUnwindSafe(|| run_once(&crashed)));
        assert!(
            outcome.is_err(),
            "the run reached the failpoint after sink {sink}'s commit"
        );
    }
    run_once(&crashed).unwrap();
    let got = relative(contents(&crashed), &crashed_dir);
    assert_eq!(got, expected, "after two crashes and a rerun: as one clean run");
}
