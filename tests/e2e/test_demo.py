"""The demo pipeline end to end, checked by independent readers against the input events."""

import collections
import datetime
import json
import shutil

import duckdb
import deltalake

from conftest import REPO, read_delta, rows, run, source_events, write_config

DEMO_EVENTS = REPO / "fixtures" / "demo" / "events"
DEMO_POLICIES = REPO / "schemas" / "demo"
TARGETS = {"public.customers": "customers", "public.accounts": "accounts", "public.payments": "payments", "public.contact_attempts": "contact_attempts"}
VAULTED = {"public.customers": ["full_name", "email", "phone", "street_address"], "public.contact_attempts": ["phone"]}


def age_band(dob, ts_ms):
    born = datetime.date.fromisoformat(dob)
    at = datetime.datetime.fromtimestamp(ts_ms / 1000, datetime.timezone.utc).date()
    # The age reached in the event's calendar year (not on its day: that would date a birthday).
    age = at.year - born.year
    bands = [18, 25, 35, 45, 55, 65]
    if age < bands[0]:
        return f"<{bands[0]}"
    for lo, hi in zip(bands, bands[1:]):
        if age < hi:
            return f"{lo}-{hi - 1}"
    return f"{bands[-1]}+"


def run_demo(sluice_bin, tmp_path):
    config = write_config(tmp_path, DEMO_EVENTS, [DEMO_POLICIES])
    summary_path = tmp_path / "summary.json"
    result = run(sluice_bin, "run", "--config", config, "--once", "--summary-json", summary_path)
    return config, json.loads(summary_path.read_text()), result


def test_demo_tables_match_the_source(sluice_bin, tmp_path):
    config, summary, result = run_demo(sluice_bin, tmp_path)
    lake = tmp_path / "lake"
    events = source_events(DEMO_EVENTS)
    assert "rows written" in result.stdout and "deltalake" in result.stdout, "summary and a query hint are printed"

    # Bad input in the demo: one of each kind, quarantined, and the run went on.
    assert summary["quarantined"] == {"malformed_json": 1, "unknown_table": 1, "type_mismatch": 1, "unsupported_op": 1}
    assert summary["tombstones"] == 1
    assert summary["events_read"] == len(events)
    # Default deny: columns no policy names are counted by name.
    assert summary["dropped_columns"]["public.customers"]["mothers_maiden_name"] > 0
    assert summary["dropped_columns"]["public.contact_attempts"]["duration_seconds"] > 0

    by_position = {e["position"]: e for e in events}
    rejected = {e["position"] for e in events if e.get("table") == "public.payments" and isinstance(e["image"].get("amount_pence"), str)}
    assert len(rejected) == 1
    tables = {}
    for source, target in TARGETS.items():
        t = read_delta(lake / "tables" / target)
        tables[target] = t
        expected = collections.Counter(e["op"] for e in events if e.get("table") == source and e["position"] not in rejected)
        got = collections.Counter(t.column("_op").to_pylist())
        assert got == expected, f"{target}: rows per op"
        positions = t.column("_position").to_pylist()
        assert len(positions) == len(set(positions)), f"{target}: one row per event"

    customers = tables["customers"]
    assert customers.column_names == [
        "id_token", "has_email", "email_domain", "has_phone", "national_id_enc", "age_band", "postcode_area",
        "vulnerable", "has_vulnerability_note", "created_at", "_op", "_subject", "_source_ts", "_position", "_ingested_at", "_date",
        "_source_db",
    ]
    token_of_customer = {}
    for row in rows(customers):
        src = by_position[row["_position"]]
        image = src["image"]
        assert row["has_email"] == (image["email"] is not None)
        assert row["email_domain"] == (image["email"].split("@")[1].lower() if image["email"] else None)
        assert row["has_phone"] is True
        assert row["age_band"] == age_band(image["date_of_birth"], src["ts_ms"])
        postcode = image["postcode"].strip()
        assert row["postcode_area"] == (postcode[:2] if len(postcode) > 2 else None)
        assert row["vulnerable"] == image["vulnerability_flag"]
        assert row["has_vulnerability_note"] == (image["vulnerability_note"] is not None)
        envelope = row["national_id_enc"]
        assert envelope[0] == 1 and len(envelope) == len(image["national_id"].encode()) + 45
        assert row["_subject"] == row["id_token"] and len(row["id_token"]) == 32
        assert row["_date"] == datetime.datetime.fromtimestamp(src["ts_ms"] / 1000, datetime.timezone.utc).date()
        assert row["_source_db"] == "crm"
        # Deterministic: every event of one customer carries the same token.
        assert token_of_customer.setdefault(image["id"], row["id_token"]) == row["id_token"]

    # Foreign keys tokenized in the customer domain join to customers.id_token.
    for target in ("accounts", "payments", "contact_attempts"):
        for row in rows(tables[target]):
            image = by_position[row["_position"]]["image"]
            assert row["customer_id_token"] == token_of_customer[image["customer_id"]], target
            assert row["_subject"] == row["customer_id_token"]
    payments, customers_t = tables["payments"], customers  # noqa: F841 (duckdb reads locals)
    joined = duckdb.sql(
        "select count(*) from payments p join (select distinct id_token from customers_t) c on p.customer_id_token = c.id_token"
    ).fetchall()[0][0]
    assert joined == payments.num_rows
    for row in rows(tables["accounts"]):
        image = by_position[row["_position"]]["image"]
        arrears = image["arrears_pence"]
        expected_band = "<1" if arrears < 1 else "[1,10000)" if arrears < 10000 else "[10000,50000)" if arrears < 50000 else "[50000,100000)" if arrears < 100000 else ">=100000"
        assert row["arrears_band"] == expected_band
        assert row["opened_year"] == int(image["opened_on"][:4])
    for row in rows(tables["payments"]):
        image = by_position[row["_position"]]["image"]
        assert row["paid_by_card"] == (image["card_number"] is not None)
        assert row["amount_pence"] == image["amount_pence"]
        assert "card_number" not in row and "reference" not in row

    # The vault: one envelope per vaulted, non-null value of every non-delete event.
    vault = read_delta(lake / "vault")
    expected_vault = collections.Counter()
    for e in events:
        if e.get("table") in VAULTED and e["op"] != "d":
            for column in VAULTED[e["table"]]:
                if e["image"].get(column) is not None:
                    expected_vault[(TARGETS[e["table"]], column)] += 1
    got_vault = collections.Counter(zip(vault.column("table").to_pylist(), vault.column("column").to_pylist()))
    assert got_vault == expected_vault
    assert summary["vault_rows_written"] == sum(expected_vault.values())

    # Source positions were committed with the data, readable by the independent reader.
    size = (DEMO_EVENTS / "crm-000.jsonl").stat().st_size
    for target in TARGETS.values():
        dt = deltalake.DeltaTable(str(lake / "tables" / target))
        assert dt.transaction_version("sluice/test/crm-000.jsonl") == size


def test_a_second_run_writes_nothing_new(sluice_bin, tmp_path):
    config, first, _ = run_demo(sluice_bin, tmp_path)
    lake = tmp_path / "lake"
    versions = {t: deltalake.DeltaTable(str(lake / "tables" / t)).version() for t in TARGETS.values()}
    result = run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "second.json")
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["events_read"] == 0 and second["commits"] == 0, result.stdout
    assert versions == {t: deltalake.DeltaTable(str(lake / "tables" / t)).version() for t in TARGETS.values()}
    assert first["rows_written"] == {t: read_delta(lake / "tables" / t).num_rows for t in TARGETS.values()}


def test_check_prints_the_release_manifest_and_names_file_line_field(sluice_bin, tmp_path):
    config = write_config(tmp_path, DEMO_EVENTS, [DEMO_POLICIES])
    out = run(sluice_bin, "check", "--config", config).stdout
    assert "public.customers → customers" in out
    assert "id_token" in out and "tokenize (HMAC-SHA256, domain customer)" in out
    assert "to the PII vault only (ciphertext): full_name, email, phone, street_address" in out
    assert "default deny" in out

    policies = tmp_path / "policies"
    shutil.copytree(DEMO_POLICIES, policies)
    broken = policies / "accounts.toml"
    broken.write_text(broken.read_text().replace('type = "int64"', 'type = "int65"', 1))
    config = write_config(tmp_path, DEMO_EVENTS, [policies])
    result = run(sluice_bin, "check", "--config", config, check=False)
    assert result.returncode != 0
    line = next(i for i, l in enumerate(broken.read_text().splitlines(), 1) if "int65" in l)
    assert f"accounts.toml:{line}: columns.balance_pence.type: unknown type `int65`" in result.stderr
