"""Poison pills: events built to break a decoder (absurd times, huge numbers, deep nesting,
invalid UTF-8, duplicate keys, every Debezium encoding with a wrong shape), each carrying canary
values, mixed into good events. Each is quarantined or counted, the run goes on, exactly once
holds across kill -9 in the middle, and no canary value reaches any output byte."""

import collections
import json

from conftest import read_delta, run, write_config
from test_exactly_once import run_until_killed
from test_leaks import POLICY, envelope

TS = 1_718_000_000_000


def wrapped(schema_fields, after, ts=TS):
    """A JSON-converter event whose Connect schema declares `schema_fields` for the row image."""
    image = {"type": "struct", "optional": True, "fields": schema_fields}
    schema = {"type": "struct", "name": "bank.public.people.Envelope", "fields": [
        dict(image, field="before"), dict(image, field="after"),
        {"type": "string", "optional": False, "field": "op"}]}
    payload = {"before": None, "after": after, "op": "c", "ts_ms": ts,
               "source": {"db": "bank", "schema": "public", "table": "people", "ts_ms": ts}}
    return json.dumps({"schema": schema, "payload": payload})


def field(name, connect_type, semantic=None, **parameters):
    f = {"type": connect_type, "optional": True, "field": name}
    if semantic:
        f["name"] = semantic
    if parameters:
        f["parameters"] = {k: str(v) for k, v in parameters.items()}
    return f


def poison_pills(p):
    """(event bytes, what must happen to it) for one canary person `p`."""
    text = lambda d: json.dumps(d).encode()
    dob = [field("id", "int64"), field("date_of_birth", "int32", "io.debezium.time.Date"),
           field("email", "string")]
    return [
        # Event times: nanoseconds by mistake, none at all, before the epoch's window.
        (envelope("people", "c", None, p, 1_704_067_200_000_000_000).encode(), "bad_timestamp"),
        (envelope("people", "c", None, p, 0).encode(), "bad_timestamp"),
        (envelope("people", "c", None, p, -9_223_372_036_854_775_808).encode(), "bad_timestamp"),
        # Numbers no column type holds.
        (envelope("people", "c", None, dict(p, balance_pence=10**40), TS).encode(), "type_mismatch"),
        (envelope("people", "c", None, p, TS).encode().replace(b'"balance_pence": ', b'"balance_pence": 1e999999, "x": '), "any"),
        # 100,000 levels of nesting in a column the policy reads, and in the envelope itself.
        (envelope("people", "c", None, p, TS).encode().replace(b'"free_text_note": ', b'"free_text_note": ' + b"[" * 100_000 + b"]" * 100_000 + b', "y": '), "malformed_json"),
        (b'{"op":"c","after":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}", "no_table"),
        # Invalid UTF-8 and a lone surrogate inside values the policy reads.
        (envelope("people", "c", None, p, TS).encode().replace(p["full_name"].encode(), p["full_name"].encode() + b"\xff\xfe"), "malformed_json"),
        (envelope("people", "c", None, p, TS).encode().replace(p["email"].encode(), p["email"].encode() + b"\\ud800"), "malformed_json"),
        # Duplicate keys: in the envelope, and a column twice (readers disagree on which counts).
        (envelope("people", "c", None, p, TS).encode().replace(b'"op": "c"', b'"op": "c", "op": "d"'), "malformed_json"),
        (envelope("people", "c", None, p, TS).encode().replace(b'"email": ', b'"email": "x@y.test", "email": '), "malformed_json"),
        # Far-future and digit-string dates.
        (envelope("people", "c", None, dict(p, date_of_birth="+55969-09-28"), TS).encode(), "type_mismatch"),
        (envelope("people", "c", None, dict(p, date_of_birth=p["card_number"]), TS).encode(), "type_mismatch"),
        (envelope("people", "c", None, dict(p, date_of_birth=1_704_067_200_000_000_000), TS).encode(), "type_mismatch"),
        # Debezium encodings with the wrong shape (the schema says one thing, the value another).
        (wrapped(dob, {"id": p["id"], "date_of_birth": p["date_of_birth"], "email": p["email"]}).encode(), "type_mismatch"),
        (wrapped(dob, {"id": p["id"], "date_of_birth": 99_999_999, "email": p["email"]}).encode(), "type_mismatch"),
        (wrapped([field("id", "int64"), field("balance_pence", "bytes", "org.apache.kafka.connect.data.Decimal", scale=0)],
                 {"id": p["id"], "balance_pence": p["balance_pence"]}).encode(), "type_mismatch"),
        (wrapped([field("id", "int64"), field("balance_pence", "bytes", "org.apache.kafka.connect.data.Decimal", scale=0)],
                 {"id": p["id"], "balance_pence": "AQEBAQEBAQEBAQEBAQEBAQE="}).encode(), "type_mismatch"),
        (wrapped([field("id", "int64"), field("balance_pence", "struct", "io.debezium.data.VariableScaleDecimal")],
                 {"id": p["id"], "balance_pence": {"scale": "two", "value": p["national_id"]}}).encode(), "type_mismatch"),
        (wrapped([field("id", "int64"), field("date_of_birth", "int64", "io.debezium.time.MicroTimestamp")],
                 {"id": p["id"], "date_of_birth": p["date_of_birth"]}).encode(), "type_mismatch"),
        (json.dumps({"schema": {"type": "struct", "fields": "nope"}, "payload": json.loads(envelope("people", "c", None, p, TS))}).encode(), "bad_schema"),
        # Placeholders and records that are not changes.
        (envelope("people", "u", None, dict(p, email="__debezium_unavailable_value"), TS).encode(), "unavailable_value"),
        (text(dict(p, __op="c", __table="people", __deleted="false")), "flattened_record"),
        (text({"status": "BEGIN", "id": p["national_id"], "ts_ms": TS}), "control"),
        (text({"ts_ms": TS}), "control"),
        (envelope("people", "z", None, p, TS).encode(), "unsupported_op"),
        (text([p]), "malformed_json"),
        (text(p["email"]), "malformed_json"),
    ]


def test_poison_pills_are_quarantined_and_exactly_once_holds(sluice_bin, canary_dir, tmp_path):
    people = [json.loads(l) for l in (canary_dir / "people.jsonl").read_text().splitlines() if l.strip()]
    events, good, poison = [], [], {}
    offset = 0
    for i, p in enumerate(people):
        lines = [(envelope("people", "c", None, p, TS + i).encode(), "row")]
        if i % 10 == 0:
            lines += poison_pills(p)
        for line, fate in lines:
            offset += len(line) + 1
            position = f"people.jsonl:{offset}"
            events.append(line)
            (good.append(position) if fate == "row" else poison.__setitem__(position, fate))
    source = tmp_path / "events"
    source.mkdir()
    (source / "people.jsonl").write_bytes(b"\n".join(events) + b"\n")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "people.toml").write_text(POLICY)
    config = write_config(tmp_path, source, [policies], extra="[batch]\nmax_rows = 40\n\n[workers]\nthreads = 2\nchunk_events = 16\n")
    # max_event_bytes is 64 KiB in these configs: the deep nesting would be stored truncated.
    config.write_text(config.read_text().replace("max_event_bytes = 65536", "max_event_bytes = 1048576"))

    for kill_after in (3, 8):
        run_until_killed(sluice_bin, config, kill_after)
    result = run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "summary.json")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.txt").write_text(result.stdout + result.stderr)

    lake = tmp_path / "lake"
    rows = read_delta(lake / "tables" / "people").column("_position").to_pylist()
    assert not [p for p, n in collections.Counter(rows).items() if n > 1], "rows written twice"
    assert sorted(rows) == sorted(good), "good events lost, or a poison pill written as a row"
    quarantine = {q["_position"]: q["reason"] for q in read_delta(lake / "quarantine").to_pylist()}
    assert len(quarantine) == len(read_delta(lake / "quarantine").column("_position").to_pylist()), "quarantined twice"
    expected = {pos: fate for pos, fate in poison.items() if fate != "control"}
    assert sorted(quarantine) == sorted(expected)
    wrong = {pos: (quarantine[pos], fate) for pos, fate in expected.items() if fate != "any" and quarantine[pos] != fate}
    assert not wrong, wrong

    scan = run(sluice_bin, "audit-leaks", "--values", canary_dir / "canaries.txt", lake, tmp_path / "keys", tmp_path / "logs", check=False)
    assert scan.returncode == 0 and "no leaks found" in scan.stdout, scan.stdout
