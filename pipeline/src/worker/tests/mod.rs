use super::*;
use crate::config::{ControlRecords, UnknownTables};
use arrow_array::BinaryArray;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use sluice_connectors::keystore::{KeyStoreLocation, MasterKey};
use sluice_connectors::source::LineEnd;
use sluice_transforms::crypto::Tokenizer;
use sluice_transforms::Policy;
use std::path::Path;
use std::sync::OnceLock;

const POLICY: &str = include_str!("../../../../fixtures/test-policies/people-router.toml");

fn router_of(policy: &str, input: InputSettings) -> (tempfile::TempDir, Router) {
    router_of_all(&[policy], input)
}

fn router_of_all(policies: &[&str], input: InputSettings) -> (tempfile::TempDir, Router) {
    let dir = tempfile::tempdir().unwrap();
    let master = MasterKey::from_hex(&"ab".repeat(32)).unwrap();
    let keys = Arc::new(KeyStore::open(&KeyStoreLocation::Sqlite(dir.path().join("keys.db")), master, 100).unwrap());
    let transforms: Vec<TableTransform> = policies
        .iter()
        .map(|p| {
            let policy = Policy::from_toml(Path::new("policy.toml"), p).unwrap();
            TableTransform::new(policy, &Tokenizer::new(&[1; 32]))
        })
        .collect();
    let quarantine_key = keys.system_key("quarantine").unwrap();
    let currents = (0..transforms.len())
        .filter(|&t| transforms[t].policy().current)
        .collect();
    let set = crate::sinks::SinkSet::new(transforms.len(), 1, currents);
    let router = Router::new(
        transforms,
        keys,
        quarantine_key,
        input,
        None,
        vec![HashMap::new(); set.count()],
        set,
    );
    (dir, router)
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<(tempfile::TempDir, Router)> = OnceLock::new();
    &ROUTER.get_or_init(|| router_of(POLICY, InputSettings::default())).1
}

fn chunk(lines: &[String]) -> Chunk {
    let mut data = Vec::new();
    let mut spans = Vec::new();
    for l in lines {
        let start = data.len();
        data.extend_from_slice(l.as_bytes());
        spans.push((
            start,
            data.len(),
            LineEnd {
                end_offset: data.len() as u64,
                len: l.len(),
                terminated: true,
            },
        ));
    }
    Chunk {
        seq: 0,
        stream: Arc::from("s.jsonl"),
        data,
        lines: spans,
        attached: Vec::new(),
        boundary: true,
    }
}

fn contains(batch: &RecordBatch, needle: &str) -> bool {
    batch.columns().iter().any(|c| {
        if let Some(s) = c.as_any().downcast_ref::<StringArray>() {
            s.iter().flatten().any(|v| v.contains(needle))
        } else if let Some(b) = c.as_any().downcast_ref::<BinaryArray>() {
            b.iter()
                .flatten()
                .any(|v| v.windows(needle.len()).any(|w| w == needle.as_bytes()))
        } else {
            false
        }
    })
}

#[test]
fn names_from_the_input_are_shown_plain_or_hashed_in_the_summary_and_the_quarantine() {
    let forged = "x\\\"} 1\\nsluice_erased_subjects 424242\\n";
    let long = "c".repeat(300);
    let lines = [
        format!(
            r#"{{"op":"c","after":{{"id":1,"{forged}":1,"{long}":2,"plain_extra":3}},"source":{{"schema":"public","table":"people","ts_ms":1}}}}"#
        ),
        format!(
            r#"{{"op":"c","after":{{"id":2,"{forged}":1}},"source":{{"schema":"public","table":"people","ts_ms":1}}}}"#
        ),
        format!(r#"{{"op":"c","after":{{"id":3}},"source":{{"schema":"public","table":"{forged}","ts_ms":1}}}}"#),
    ];
    let (_dir, router) = router_of(
        POLICY,
        InputSettings {
            unknown_tables: UnknownTables::Quarantine,
            ..InputSettings::default()
        },
    );
    let out = router.process(&chunk(&lines), 0).unwrap();
    let dropped = &out.summary.dropped_columns["public.people"];
    assert_eq!(dropped.len(), 3, "{dropped:?}");
    assert_eq!(dropped["plain_extra"], 1);
    let hashed: Vec<_> = dropped.iter().filter(|(k, _)| k.starts_with('~')).collect();
    assert_eq!(hashed.len(), 2);
    assert!(
        hashed.iter().any(|(_, n)| **n == 2),
        "one forged name counted twice: {hashed:?}"
    );
    let unknown: Vec<&String> = out.summary.unknown_tables.keys().collect();
    assert!(
        unknown.len() == 1 && unknown[0].starts_with('~') && unknown[0].len() == 17,
        "{unknown:?}"
    );
    let quarantine = &out
        .outputs
        .iter()
        .find(|(sink, _)| *sink == router.quarantine_sink())
        .unwrap()
        .1;
    assert!(!contains(quarantine, "424242") && contains(quarantine, unknown[0]));
}

#[test]
fn a_refused_event_binds_no_database_to_its_table() {
    let (_dir, router) = router_of(POLICY, InputSettings::default());
    let event = |db: &str, ts: &str| {
        format!(
            r#"{{"op":"c","after":{{"id":1,"balance":3}},"source":{{"db":"{db}","schema":"public","table":"people"{ts}}}}}"#
        )
    };
    // No event time: refused, from database `a`; then a good event from database `b`.
    let out = router
        .process(&chunk(&[event("a", ""), event("b", r#","ts_ms":1"#)]), 0)
        .unwrap();
    assert_eq!(out.summary.quarantined.get("bad_timestamp"), Some(&1));
    assert_eq!(
        out.summary.quarantined.get("ambiguous_table"),
        None,
        "{:?}",
        out.summary
    );
    assert_eq!(out.summary.rows_written.get("people"), Some(&1));
}

#[test]
fn a_quarantined_event_is_sealed_under_its_subjects_key_and_an_erased_subjects_goes_nowhere() {
    let (_dir, router) = router_of(POLICY, InputSettings::default());
    let people = |id: u32, row: &str, extra: &str| {
        format!(r#"{{"op":"u","after":{{"id":{id},{row}}},"source":{{"schema":"public","table":"people"{extra}}}}}"#)
    };
    let lines = [
        // Unavailable, a lone surrogate, no event time: each quarantined before the engine.
        people(7, r#""balance":3"#, r#","ts_ms":1,"sluice_unavailable":["email"]"#),
        people(7, r#""email":"\ud800","balance":3"#, r#","ts_ms":1"#),
        people(7, r#""balance":3"#, ""),
        // A value error found by the engine.
        people(7, r#""balance":"three""#, r#","ts_ms":1"#),
        // Not JSON at all: nobody's, under the system key.
        r#"{"op":"c","after":{"id":7,"#.to_string(),
    ];
    let token = router.transforms[0].subject_token("7").unwrap();
    let out = router.process(&chunk(&lines), 0).unwrap();
    let quarantine = &out
        .outputs
        .iter()
        .find(|(sink, _)| *sink == router.quarantine_sink())
        .unwrap()
        .1;
    assert_eq!(quarantine.num_rows(), 5);
    let text = |name: &str| {
        quarantine
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone()
    };
    let (subjects, positions) = (text("_subject"), text("_position"));
    let events = quarantine
        .column_by_name("event_enc")
        .unwrap()
        .as_any()
        .downcast_ref::<BinaryArray>()
        .unwrap();
    let subject_key = router
        .keys
        .subject_keys(&[token.as_str()])
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    let unreadable = format!("s.jsonl:{}", lines.iter().map(|l| l.len()).sum::<usize>());
    for i in 0..5 {
        let aad = crate::quarantine::event_aad(positions.value(i));
        if positions.value(i) == unreadable {
            assert!(subjects.is_null(i));
            assert!(router.quarantine_key.open(events.value(i), &aad).is_ok());
            continue;
        }
        assert_eq!(subjects.value(i), token.as_str(), "row {i}");
        assert!(
            subject_key.open(events.value(i), &aad).is_ok(),
            "row {i}: sealed under the subject's key"
        );
        assert!(router.quarantine_key.open(events.value(i), &aad).is_err(), "row {i}");
    }

    router
        .keys
        .erase_subjects("job", &[token.as_str().to_string()], 0)
        .unwrap();
    let out = router.process(&chunk(&lines), 0).unwrap();
    assert_eq!(out.summary.erased_subject_rows, 4, "{:?}", out.summary);
    assert_eq!(out.summary.quarantined_total(), 1, "only the unreadable one");
}

#[test]
fn a_policy_column_the_capture_could_not_carry_quarantines_the_event_and_truncates_land() {
    let lines = [
        // `email` is named by the policy but was unavailable: never a row with it missing.
        r#"{"op":"u","after":{"id":7,"balance":3},"source":{"schema":"public","table":"people","ts_ms":1,"sluice_unavailable":["email"]}}"#.to_string(),
        // An unavailable column no policy names changes nothing.
        r#"{"op":"u","after":{"id":8,"email":"c@d.test","balance":4},"source":{"schema":"public","table":"people","ts_ms":1,"sluice_unavailable":["geom"]}}"#.to_string(),
        r#"{"op":"t","before":null,"after":null,"source":{"schema":"public","table":"people","ts_ms":1}}"#.to_string(),
    ];
    let out = router().process(&chunk(&lines), 0).unwrap();
    assert_eq!(out.summary.quarantined["unavailable_value"], 1);
    let table = out
        .outputs
        .iter()
        .find(|(sink, _)| *sink == 0)
        .map(|(_, b)| b)
        .expect("table rows");
    let ops = table
        .column_by_name("_op")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    assert_eq!(ops.iter().flatten().collect::<Vec<_>>(), vec!["u", "t"]);
    let subjects = table
        .column_by_name("_subject")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    assert_eq!(subjects.value(1), "", "a truncate has no subject");
}

const ORDERS: &str = r#"
table = "inventory.orders"
target = "orders"
subject = "customer"
token_domain = "customer"
[columns.customer]
action = "tokenize"
[columns.price]
action = "keep"
type = "decimal(10,2)"
[columns.order_date]
action = "keep"
type = "date"
[columns.placed_at]
action = "keep"
type = "timestamp"
[columns.legacy_ms]
action = "keep"
type = "timestamp"
unit = "ms"
[columns.doc]
action = "keep"
type = "string"
[columns.notes]
action = "drop"
"#;

fn table_of(out: &Processed) -> &RecordBatch {
    out.outputs
        .iter()
        .find(|(sink, _)| *sink == 0)
        .map(|(_, b)| b)
        .expect("table rows")
}

/// A column's values as text (Arrow's display form).
fn text_column(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let column = batch.column_by_name(name).unwrap();
    let formatter =
        sluice_connectors::arrow::util::display::ArrayFormatter::try_new(column.as_ref(), &Default::default()).unwrap();
    (0..column.len())
        .map(|i| column.is_valid(i).then(|| formatter.value(i).to_string()))
        .collect()
}

const ORDERS_SCHEMA: &str = r#"{"type":"struct","name":"s.inventory.orders.Envelope","fields":[{"type":"struct","optional":true,"field":"before","fields":[]},{"type":"struct","optional":true,"field":"after","name":"s.inventory.orders.Value","fields":[{"type":"int32","field":"customer"},{"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2","connect.decimal.precision":"10"},"field":"price"},{"type":"int32","name":"io.debezium.time.Date","field":"order_date"},{"type":"int64","name":"io.debezium.time.MicroTimestamp","field":"placed_at"},{"type":"int64","name":"io.debezium.time.MicroTimestamp","field":"legacy_ms"},{"type":"string","field":"doc"}]}]}"#;

fn wrapped(payload: &str) -> String {
    format!(r#"{{"schema":{ORDERS_SCHEMA},"payload":{payload}}}"#)
}

#[test]
fn wrapped_events_are_read_by_their_schema() {
    let (_dir, router) = router_of(ORDERS, InputSettings::default());
    let lines = [
        wrapped(
            r#"{"op":"c","after":{"customer":1,"price":"MDk=","order_date":19905,"placed_at":1719835200123456,"doc":"x"},"source":{"db":"inventory","table":"orders","ts_ms":1719835200000}}"#,
        ),
        // The policy's `unit = "ms"` contradicts the schema's microseconds: never guessed.
        wrapped(
            r#"{"op":"c","after":{"customer":2,"legacy_ms":1719835200123456},"source":{"db":"inventory","table":"orders","ts_ms":1719835200000}}"#,
        ),
        // Base64 that is not a decimal's bytes.
        wrapped(
            r#"{"op":"c","after":{"customer":3,"price":"12.50"},"source":{"db":"inventory","table":"orders","ts_ms":1719835200000}}"#,
        ),
    ];
    let out = router.process(&chunk(&lines), 0).unwrap();
    let table = table_of(&out);
    assert_eq!(table.num_rows(), 1);
    assert_eq!(text_column(table, "price"), vec![Some("123.45".into())]);
    assert_eq!(text_column(table, "order_date"), vec![Some("2024-07-01".into())]);
    assert_eq!(
        text_column(table, "placed_at"),
        vec![Some("2024-07-01T12:00:00.123456Z".into())]
    );
    assert_eq!(out.summary.quarantined["schema_mismatch"], 1);
    assert_eq!(out.summary.quarantined["type_mismatch"], 1);
}

#[test]
fn placeholders_digit_strings_control_records_and_bad_times() {
    let (_dir, router) = router_of(ORDERS, InputSettings::default());
    let event = |after: &str, before: &str| {
        format!(
            r#"{{"op":"u","before":{before},"after":{after},"source":{{"db":"inventory","table":"orders","ts_ms":1719835200000}}}}"#
        )
    };
    let lines = [
        // Unchanged TOAST value: taken from the before image…
        event(
            r#"{"customer":1,"doc":"__debezium_unavailable_value"}"#,
            r#"{"customer":1,"doc":"old text"}"#,
        ),
        // …or, without one, quarantined — never written as if it were the value.
        event(r#"{"customer":2,"doc":"__debezium_unavailable_value"}"#, "null"),
        // A binary column's placeholder is its base64; an array's holds the placeholder.
        event(
            r#"{"customer":3,"doc":"X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="}"#,
            "null",
        ),
        event(r#"{"customer":3,"doc":["__debezium_unavailable_value"]}"#, "null"),
        // A column the policy drops without deriving anything: its placeholder harms nothing.
        event(r#"{"customer":3,"notes":"__debezium_unavailable_value"}"#, "null"),
        // A 16-digit string in a date column is not an epoch.
        event(r#"{"customer":4,"order_date":"4111111111111111"}"#, "null"),
        // A number there is (days, by magnitude), and a date text is a date.
        event(r#"{"customer":5,"order_date":19905}"#, "null"),
        event(r#"{"customer":6,"order_date":"2024-07-01"}"#, "null"),
        // Far-future values are refused, not written into the log's statistics.
        event(r#"{"customer":7,"placed_at":"+55969-09-28T00:00:00Z"}"#, "null"),
        r#"{"status":"BEGIN","id":"571","ts_ms":1}"#.to_string(),
        r#"{"ts_ms":1588252618953}"#.to_string(),
        r#"{"op":"c","after":{"customer":8},"source":{"db":"inventory","table":"orders","ts_ms":1704067200000000000}}"#
            .to_string(),
        // Two values for one column: readers disagree on which counts.
        event(r#"{"customer":9,"doc":"a","doc":"b"}"#, "null"),
        r#"{"op":"c","op":"d","after":{"customer":10},"source":{"db":"inventory","table":"orders","ts_ms":1}}"#
            .to_string(),
    ];
    let out = router.process(&chunk(&lines), 0).unwrap();
    let table = table_of(&out);
    assert_eq!(text_column(table, "doc")[0], Some("old text".into()));
    assert_eq!(
        text_column(table, "order_date")[2..],
        [Some("2024-07-01".into()), Some("2024-07-01".into())]
    );
    assert_eq!(table.num_rows(), 4);
    assert_eq!(out.summary.quarantined["unavailable_value"], 3);
    assert_eq!(out.summary.quarantined["type_mismatch"], 2);
    assert_eq!(out.summary.quarantined["bad_timestamp"], 1);
    assert_eq!(out.summary.quarantined["malformed_json"], 2);
    assert_eq!(out.summary.control_records["transaction_begin"], 1);
    assert_eq!(out.summary.control_records["heartbeat"], 1);
    assert!(!out.summary.quarantined.contains_key("control_record"));

    let (_dir, router) = router_of(
        ORDERS,
        InputSettings {
            control_records: ControlRecords::Quarantine,
            ..InputSettings::default()
        },
    );
    let out = router.process(&chunk(&lines[9..11]), 0).unwrap();
    assert_eq!(out.summary.quarantined["control_record"], 2);
}

#[test]
fn databases_are_told_apart_and_never_merged_silently() {
    let qualified = POLICY
        .replace("table = \"public.people\"", "table = \"crm.public.people\"")
        .replace("target = \"people\"", "target = \"crm_people\"");
    let (_dir, router) = router_of_all(&[&qualified, POLICY], InputSettings::default());
    let event = |db: &str, id: u32| {
        format!(
            r#"{{"op":"c","after":{{"id":{id},"balance":1}},"source":{{"db":"{db}","schema":"public","table":"people","ts_ms":1}}}}"#
        )
    };
    let lines = [
        event("crm", 1),
        event("billing", 2),
        event("billing", 3),
        // Another database for the table named without one: not merged in.
        event("archive", 4),
    ];
    let out = router.process(&chunk(&lines), 0).unwrap();
    assert_eq!(out.summary.rows_written["crm_people"], 1);
    assert_eq!(out.summary.rows_written["people"], 2);
    assert_eq!(out.summary.quarantined["ambiguous_table"], 1);
    let people = out.outputs.iter().find(|(sink, _)| *sink == 1).map(|(_, b)| b).unwrap();
    assert_eq!(text_column(people, "_source_db"), vec![Some("billing".into()); 2]);
    // A table the lake already holds rows of keeps its database after a restart.
    let (_dir, router) = router_of_all(&[POLICY], InputSettings::default());
    router.bind_databases([(0, "archive".to_string())]);
    let out = router.process(&chunk(&lines[1..]), 0).unwrap();
    assert_eq!(out.summary.rows_written["people"], 1);
    assert_eq!(out.summary.quarantined["ambiguous_table"], 2);
    // A schema named like its database is still a schema (PostgreSQL db `public`).
    let (_dir, router) = router_of_all(&[POLICY], InputSettings::default());
    let out = router
        .process(&chunk(&[event("public", 5), event("other", 6)]), 0)
        .unwrap();
    assert_eq!(out.summary.rows_written["people"], 1);
    assert_eq!(out.summary.quarantined["ambiguous_table"], 1);
}

#[test]
fn is_present_is_unknown_where_the_image_does_not_say() {
    let event = |op: &str, image: &str| {
        let (before, after) = if op == "d" { (image, "null") } else { ("null", image) };
        format!(
            r#"{{"op":"{op}","before":{before},"after":{after},"source":{{"schema":"public","table":"people","ts_ms":1}}}}"#
        )
    };
    let lines = [
        event("c", r#"{"id":1,"email":"a@b.test","balance":1}"#),
        event("c", r#"{"id":2,"email":null,"balance":1}"#),
        // The image lacks the column: unknown, not absent.
        event("u", r#"{"id":3,"balance":1}"#),
        // A key-only delete image (PostgreSQL's default replica identity): unknown.
        event("d", r#"{"id":4,"email":null,"balance":null}"#),
        event("d", r#"{"id":5,"email":"e@b.test","balance":1}"#),
    ];
    let out = router().process(&chunk(&lines), 0).unwrap();
    let table = table_of(&out);
    let has_email = table
        .column_by_name("has_email")
        .unwrap()
        .as_any()
        .downcast_ref::<BooleanArray>()
        .unwrap();
    let got: Vec<Option<bool>> = has_email.iter().collect();
    assert_eq!(got, vec![Some(true), Some(false), None, None, Some(true)]);
}

#[test]
fn an_event_that_panics_is_quarantined_and_the_rest_goes_on() {
    let lines = [
        r#"{"op":"c","after":{"id":1,"balance":1},"source":{"schema":"public","table":"people","ts_ms":1}}"#
            .to_string(),
        format!(
            r#"{{"op":"c","after":{{"id":2,"balance":2,"x":"{PANIC_FOR_TESTS}"}},"source":{{"schema":"public","table":"people","ts_ms":1}}}}"#
        ),
        r#"{"op":"c","after":{"id":3,"balance":3},"source":{"schema":"public","table":"people","ts_ms":1}}"#
            .to_string(),
    ];
    let chunk = chunk(&lines);
    assert!(catching(|| router().process(&chunk, 0)).is_err());
    let out = router().process_isolating(&chunk, 0).unwrap();
    assert_eq!(out.summary.events_read, 3);
    assert_eq!(out.summary.quarantined["internal_error"], 1);
    assert_eq!(out.summary.rows_written["people"], 2);
    assert_eq!(out.last_offset, chunk.last_offset());
}

mod robustness;
