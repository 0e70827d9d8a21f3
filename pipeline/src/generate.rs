//! Deterministic demo and benchmark events for a consumer-credit debt-collection firm:
//! customers, accounts, payments and contact attempts, in Debezium's PostgreSQL envelope.
//! All people are synthetic; the values only look realistic.

use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Value};

const FIRST: &[&str] = &[
    "Amelia", "Oliver", "Isla", "George", "Ava", "Noah", "Mia", "Arthur", "Ivy", "Leo", "Freya", "Oscar", "Lily",
    "Harry", "Grace", "Jack",
];
const LAST: &[&str] = &[
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel", "Wright", "Walker",
    "Evans", "Khan", "Hughes",
];
const STREETS: &[&str] = &[
    "Mill Lane",
    "Church Road",
    "Station Road",
    "Victoria Street",
    "Park Avenue",
    "High Street",
    "Kings Road",
    "Queens Walk",
];
const AREAS: &[&str] = &["LS", "M", "B", "G", "EH", "CF", "BS", "NE", "SW", "E"];
const PRODUCTS: &[&str] = &["credit_card", "personal_loan", "overdraft", "store_card"];
const STATUSES: &[&str] = &["current", "arrears", "default", "payment_plan", "settled"];
const PAY_CHANNELS: &[&str] = &["card", "bank_transfer", "direct_debit", "cash"];
const CONTACT_CHANNELS: &[&str] = &["phone", "sms", "email", "letter"];
const OUTCOMES: &[&str] = &[
    "no_answer",
    "promise_to_pay",
    "refused",
    "wrong_number",
    "callback",
    "paid",
];
const VULNERABILITIES: &[&str] = &["bereavement", "mental_health", "serious_illness", "job_loss"];

/// SplitMix64: tiny, fast and deterministic; quality is ample for fake data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// 2024-01-01T00:00:00Z.
const START_MS: i64 = 1_704_067_200_000;
/// Events spread over 30 days by default.
pub const DEFAULT_SPAN_HOURS: u64 = 30 * 24;

struct Generator {
    seed: u64,
    rng: Rng,
    /// Owner of each account, so updates keep it.
    account_owner: Vec<u64>,
    customers: u64,
    /// Customers the book holds before the first event (ids `0..pool`): events touch them at
    /// random, as a day of changes touches a large book (`--subjects`).
    pool: u64,
    accounts: u64,
    payments: u64,
    contacts: u64,
    target_customers: u64,
    lsn: u64,
    span_ms: i64,
}

impl Generator {
    /// A customer's stable attributes come from their own stream, so updates keep them.
    fn stable(&self, kind: u64, id: u64) -> Rng {
        Rng(self.seed ^ kind.wrapping_mul(0xA076_1D64_78BD_642F) ^ (id + 1).wrapping_mul(0xE703_7ED1_A0B4_28DB))
    }

    fn customer(&mut self, id: u64) -> Value {
        let r = &mut self.stable(1, id);
        let (first, last) = (r.pick(FIRST), r.pick(LAST));
        let born_year = 1940 + r.below(66);
        let vulnerable = r.chance(8);
        json!({
            "id": id,
            "full_name": format!("{first} {last}"),
            "email": if r.chance(85) { Value::from(format!("{}.{}{}@{}", first.to_lowercase(), last.to_lowercase(), id, ["example-mail.test", "post.example", "inbox.example"][r.below(3) as usize])) } else { Value::Null },
            "phone": format!("+44 7{:03} {:06}", r.below(1000), r.below(1_000_000)),
            "national_id": format!("{}{}{:06}{}", (b'A' + r.below(26) as u8) as char, (b'A' + r.below(26) as u8) as char, r.below(1_000_000), ["A", "B", "C", "D"][r.below(4) as usize]),
            "date_of_birth": format!("{born_year}-{:02}-{:02}", 1 + r.below(12), 1 + r.below(28)),
            "street_address": format!("{} {}", 1 + r.below(250), r.pick(STREETS)),
            "postcode": format!("{}{} {}{}{}", r.pick(AREAS), 1 + r.below(20), r.below(10), (b'A' + r.below(26) as u8) as char, (b'A' + r.below(26) as u8) as char),
            "vulnerability_flag": vulnerable,
            "vulnerability_note": if vulnerable { Value::from(format!("{first} disclosed {} on a call", r.pick(VULNERABILITIES))) } else { Value::Null },
            "notes": format!("Spoke to {first} {last} about the balance"),
            "mothers_maiden_name": r.pick(LAST),
            "created_at": START_MS,
        })
    }

    fn account(&mut self, id: u64) -> Value {
        if id as usize == self.account_owner.len() {
            let owner = self.rng.below(self.pool + self.customers);
            self.account_owner.push(owner);
        }
        let customer = self.account_owner[id as usize];
        let r = &mut self.stable(2, id);
        json!({
            "id": id,
            "customer_id": customer,
            "product": r.pick(PRODUCTS),
            "iban": format!("GB{:02}DEMO{:014}", r.below(100), r.below(100_000_000_000_000)),
            "opened_on": format!("{}-{:02}-{:02}", 2010 + r.below(14), 1 + r.below(12), 1 + r.below(28)),
            "balance_pence": r.below(2_000_000) as i64,
            "arrears_pence": r.below(300_000) as i64,
            "credit_limit_pence": 100_000 * (1 + r.below(50)) as i64,
            "status": r.pick(STATUSES),
        })
    }

    fn event(&mut self, i: u64, n: u64) -> Value {
        let ts = START_MS + (i as i64) * (self.span_ms / n.max(1) as i64).max(1);
        let roll = self.rng.below(100);
        let (table, op, before, after) = if self.customers == 0 || (roll < 8 && self.customers < self.target_customers)
        {
            let id = self.pool + self.customers;
            self.customers += 1;
            ("customers", "c", Value::Null, self.customer(id))
        } else if self.accounts == 0 || (roll < 16 && self.accounts < self.target_customers * 6 / 5) {
            let id = self.accounts;
            self.accounts += 1;
            ("accounts", "c", Value::Null, self.account(id))
        } else if roll < 19 {
            // A customer moves, or changes email or phone.
            let id = self.rng.below(self.pool + self.customers);
            let mut after = self.customer(id);
            let r = &mut self.rng;
            match r.below(3) {
                0 => {
                    after["email"] = json!(format!(
                        "new.address{}@{}",
                        r.below(1_000_000),
                        ["example-mail.test", "post.example"][r.below(2) as usize]
                    ))
                }
                1 => after["phone"] = json!(format!("+44 7{:03} {:06}", r.below(1000), r.below(1_000_000))),
                _ => {
                    after["street_address"] = json!(format!("{} {}", 1 + r.below(250), r.pick(STREETS)));
                    after["postcode"] = json!(format!(
                        "{}{} {}{}{}",
                        r.pick(AREAS),
                        1 + r.below(20),
                        r.below(10),
                        (b'A' + r.below(26) as u8) as char,
                        (b'A' + r.below(26) as u8) as char
                    ));
                }
            }
            ("customers", "u", Value::Null, after)
        } else if roll < 23 {
            // Balances and arrears move; the account's identity does not.
            let id = self.rng.below(self.accounts);
            let mut after = self.account(id);
            let r = &mut self.rng;
            after["balance_pence"] = json!(r.below(2_000_000) as i64);
            after["arrears_pence"] = json!(r.below(300_000) as i64);
            after["status"] = json!(r.pick(STATUSES));
            ("accounts", "u", Value::Null, after)
        } else if roll < 60 {
            let id = self.payments;
            self.payments += 1;
            let account = self.rng.below(self.accounts);
            let r = &mut self.rng;
            let channel = r.pick(PAY_CHANNELS);
            let after = json!({
                "id": id,
                "account_id": account,
                "customer_id": self.account_owner[account as usize],
                "amount_pence": 500 + r.below(50_000) as i64,
                "channel": channel,
                "card_number": if channel == "card" { Value::from(format!("4{:015}", r.below(1_000_000_000_000_000))) } else { Value::Null },
                "paid_at": ts,
                "reference": format!("REF-{:08}", r.below(100_000_000)),
            });
            ("payments", "c", Value::Null, after)
        } else if roll < 98 || self.contacts == 0 {
            let id = self.contacts;
            self.contacts += 1;
            let r = &mut self.rng;
            let channel = r.pick(CONTACT_CHANNELS);
            let after = json!({
                "id": id,
                "customer_id": r.below(self.pool + self.customers),
                "channel": channel,
                "phone": if channel == "phone" || channel == "sms" { Value::from(format!("+44 7{:03} {:06}", r.below(1000), r.below(1_000_000))) } else { Value::Null },
                "outcome": r.pick(OUTCOMES),
                "agent_notes": format!("Agent {} spoke about hardship; customer {} mentioned {}", r.below(90), r.pick(FIRST), r.pick(VULNERABILITIES)),
                "attempted_at": ts,
                "duration_seconds": r.below(900) as i64,
            });
            ("contact_attempts", "c", Value::Null, after)
        } else {
            // A delete carries the full row in `before` (REPLICA IDENTITY FULL).
            let id = self.rng.below(self.contacts);
            let customer = self.rng.below(self.pool + self.customers);
            let before = json!({"id": id, "customer_id": customer, "channel": "letter", "phone": null, "outcome": "no_answer", "agent_notes": null, "attempted_at": ts, "duration_seconds": 0});
            ("contact_attempts", "d", before, Value::Null)
        };
        self.lsn += 64 + self.rng.below(512);
        json!({
            "before": before,
            "after": after,
            "source": {
                "version": "2.7.3.Final", "connector": "postgresql", "name": "crm", "ts_ms": ts, "snapshot": "false",
                "db": "crm", "schema": "public", "table": table, "txId": 1000 + i, "lsn": self.lsn,
            },
            "op": op,
            "ts_ms": ts + 15,
        })
    }
}

/// Columns Debezium's PostgreSQL connector sends as `io.debezium.time.Date` (epoch days) and
/// `io.debezium.time.Timestamp` (epoch milliseconds) in the wrapped form.
const DATE_COLUMNS: &[&str] = &["date_of_birth", "opened_on"];
const TIMESTAMP_COLUMNS: &[&str] = &["created_at", "paid_at", "attempted_at"];

/// A row image's values as the JSON converter writes them: dates as epoch days.
fn as_connect_values(image: &mut Value) {
    let Some(row) = image.as_object_mut() else { return };
    for column in DATE_COLUMNS {
        if let Some(days) = row
            .get(*column)
            .and_then(Value::as_str)
            .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
            .map(|d| (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days())
        {
            row.insert(column.to_string(), json!(days));
        }
    }
}

/// The Kafka Connect schema Debezium's JSON converter sends with a table's events.
fn connect_schema(table: &str, image: &Value) -> Value {
    let fields: Vec<Value> = image
        .as_object()
        .map(|row| {
            row.iter()
                .map(|(column, value)| {
                    let c = column.as_str();
                    let mut f = if DATE_COLUMNS.contains(&c) {
                        json!({"type": "int32", "name": "io.debezium.time.Date", "version": 1})
                    } else if TIMESTAMP_COLUMNS.contains(&c) {
                        json!({"type": "int64", "name": "io.debezium.time.Timestamp", "version": 1})
                    } else if value.is_boolean() {
                        json!({"type": "boolean"})
                    } else if value.is_i64() || value.is_u64() || c == "id" {
                        json!({"type": "int64"})
                    } else {
                        json!({"type": "string"})
                    };
                    f["optional"] = json!(c != "id");
                    f["field"] = json!(c);
                    f
                })
                .collect()
        })
        .unwrap_or_default();
    let value =
        json!({"type": "struct", "fields": fields, "optional": true, "name": format!("crm.public.{table}.Value")});
    let mut before = value.clone();
    before["field"] = json!("before");
    let mut after = value;
    after["field"] = json!("after");
    json!({
        "type": "struct",
        "optional": false,
        "name": format!("crm.public.{table}.Envelope"),
        "fields": [
            before,
            after,
            {"type": "struct", "optional": false, "name": "io.debezium.connector.postgresql.Source", "field": "source", "fields": [
                {"type": "string", "optional": false, "field": "version"},
                {"type": "string", "optional": false, "field": "connector"},
                {"type": "string", "optional": false, "field": "name"},
                {"type": "int64", "optional": false, "field": "ts_ms"},
                {"type": "string", "optional": true, "name": "io.debezium.data.Enum", "version": 1, "parameters": {"allowed": "true,last,false,incremental"}, "default": "false", "field": "snapshot"},
                {"type": "string", "optional": false, "field": "db"},
                {"type": "string", "optional": false, "field": "schema"},
                {"type": "string", "optional": false, "field": "table"},
                {"type": "int64", "optional": true, "field": "txId"},
                {"type": "int64", "optional": true, "field": "lsn"}
            ]},
            {"type": "string", "optional": false, "field": "op"},
            {"type": "int64", "optional": true, "field": "ts_ms"}
        ]
    })
}

/// Writes `n` events spread over `span_hours` from 2024-01-01; `.gz` output is compressed.
/// Returns the number written.
/// Writes `n` events; `subjects` customers exist before the first (0: the book starts empty).
pub fn write_events(
    out: &Path,
    n: u64,
    seed: u64,
    wrapped: bool,
    span_hours: u64,
    subjects: u64,
) -> std::io::Result<u64> {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let file = std::fs::File::create(out)?;
    let mut w: Box<dyn Write> = if out.extension().is_some_and(|e| e == "gz") {
        Box::new(BufWriter::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        )))
    } else {
        Box::new(BufWriter::new(file))
    };
    let mut g = Generator {
        seed,
        rng: Rng(seed),
        account_owner: Vec::new(),
        customers: 0,
        pool: subjects,
        accounts: 0,
        payments: 0,
        contacts: 0,
        target_customers: (n / 20).max(10),
        lsn: 0,
        span_ms: span_hours.max(1) as i64 * 3_600_000,
    };
    let mut schemas: std::collections::HashMap<String, Value> = std::collections::HashMap::new();
    for i in 0..n {
        let mut event = g.event(i, n);
        if wrapped {
            let table = event["source"]["table"].as_str().unwrap_or_default().to_string();
            for image in ["before", "after"] {
                as_connect_values(&mut event[image]);
            }
            let image = if event["after"].is_null() {
                &event["before"]
            } else {
                &event["after"]
            };
            let schema = schemas
                .entry(table.clone())
                .or_insert_with(|| connect_schema(&table, image))
                .clone();
            // The JSON converter's key order: schema, then payload.
            w.write_all(b"{\"schema\":")?;
            serde_json::to_writer(&mut w, &schema)?;
            w.write_all(b",\"payload\":")?;
            serde_json::to_writer(&mut w, &event)?;
            w.write_all(b"}")?;
        } else {
            serde_json::to_writer(&mut w, &event)?;
        }
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customers_touched(subjects: u64) -> (usize, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        let n = write_events(&path, 20_000, 3, false, 24, subjects).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            let e: Value = serde_json::from_str(line).unwrap();
            let image = if e["after"].is_null() {
                &e["before"]
            } else {
                &e["after"]
            };
            let table = e["source"]["table"].as_str().unwrap();
            let subject = if table == "customers" {
                &image["id"]
            } else {
                &image["customer_id"]
            };
            seen.insert(subject.as_u64().unwrap());
        }
        (seen.len(), n)
    }

    #[test]
    fn a_large_book_makes_subjects_rarely_repeat_and_the_default_is_unchanged() {
        let (default, n) = customers_touched(0);
        let (large, _) = customers_touched(1_000_000);
        assert_eq!(n, 20_000);
        assert!(default < 1_500, "the default book is small: {default}");
        assert!(large > 8_000, "most events touch another customer: {large}");
        // The default output is what it was before the knob: tests and old benchmarks rely on it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        write_events(&path, 3, 42, false, DEFAULT_SPAN_HOURS, 0).unwrap();
        let first: Value =
            serde_json::from_str(std::fs::read_to_string(&path).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(first["after"]["id"], 0);
        assert_eq!(first["source"]["table"], "customers");
    }
}
