"""Real Debezium output nobody here wrote (fixtures/debezium/, sources in its SOURCES.md) through
the pipeline. Policies keep every column the messages' Connect schemas declare, typed by the
schema; a decoder written here, independently of the Rust code, works out each message's fate
(a row and its exact values, a quarantine reason, a control record) and every value Python
`deltalake` reads back is compared with it: decimals exact, dates and times exact, no policy
`unit` anywhere."""

import base64
import collections
import datetime
import decimal
import json
import re

from conftest import REPO, read_delta, run, write_config

CORPUS = REPO / "fixtures" / "debezium"
UTC = datetime.timezone.utc
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_MS = (-2_208_988_800_000, 7_258_118_400_000)  # 1900-01-01, 2200-01-01
PLACEHOLDER = "__debezium_unavailable_value"

TIME_UNITS = {  # semantic name → (kind, units per second)
    "io.debezium.time.Date": ("date", None),
    "org.apache.kafka.connect.data.Date": ("date", None),
    "io.debezium.time.Timestamp": ("timestamp", 10**3),
    "org.apache.kafka.connect.data.Timestamp": ("timestamp", 10**3),
    "io.debezium.time.MicroTimestamp": ("timestamp", 10**6),
    "io.debezium.time.NanoTimestamp": ("timestamp", 10**9),
    "io.debezium.time.Time": ("time", 10**3),
    "org.apache.kafka.connect.data.Time": ("time", 10**3),
    "io.debezium.time.MicroTime": ("time", 10**6),
    "io.debezium.time.NanoTime": ("time", 10**9),
}
INTEGERS = {"int8", "int16", "int32", "int64"}


def unwrap(doc):
    if isinstance(doc, dict) and "payload" in doc and "op" not in doc:
        return doc.get("schema"), doc["payload"]
    return None, doc


def image_fields(schema):
    """Column → Connect field of an envelope schema's row image (`after`, else `before`)."""
    if not isinstance(schema, dict):
        return None
    for name in ("after", "before"):
        for f in schema.get("fields") or []:
            if f.get("field") == name and f.get("fields") is not None:
                return {c["field"]: c for c in f["fields"]}
    return None


def policy_type(field):
    name = field.get("name")
    if name == "org.apache.kafka.connect.data.Decimal":
        return f"decimal(38,{int(field['parameters']['scale'])})"
    if name in TIME_UNITS:
        kind = TIME_UNITS[name][0]
        return "string" if kind == "time" else kind
    if name == "io.debezium.time.ZonedTimestamp":
        return "timestamp"
    if field["type"] in INTEGERS and name is None:
        return "int64"
    if field["type"] in ("float32", "float64"):
        return "float64"
    if field["type"] == "boolean":
        return "bool"
    return "string"


def corpus_lines():
    for f in sorted(CORPUS.glob("*.jsonl")):
        offset = 0
        for line in f.read_bytes().splitlines(keepends=True):
            offset += len(line)
            if line.strip():
                yield f.name, offset, line.strip()


def derive_policies():
    """table → column → policy type, from every wrapped change event's schema. A column typed
    differently by two sources is left out (the policy cannot keep it as both)."""
    types = collections.defaultdict(dict)
    clash = collections.defaultdict(set)
    for _, _, line in corpus_lines():
        schema, payload = unwrap(json.loads(line))
        fields = image_fields(schema)
        if not fields or not isinstance(payload, dict) or payload.get("op") not in ("c", "u", "r", "d"):
            continue
        table = qualified(payload.get("source") or {})
        if table is None:
            continue
        image = (payload.get("before") if payload["op"] == "d" else payload.get("after")) or {}
        for column, field in fields.items():
            # Output names are identifiers (see `output_name`).
            if not re.fullmatch(r"[A-Za-z0-9_]+", column):
                continue
            t = policy_type(field)
            if types[table].setdefault(column, t) != t or contradicts(field, image.get(column)):
                clash[table].add(column)
    policies = {t: {c: ty for c, ty in cols.items() if c not in clash[t]} for t, cols in types.items()}
    return {t: cols for t, cols in policies.items() if cols}


def contradicts(field, value):
    """A value its own schema does not describe (Paimon's hand-written all-types message carries
    JSON numbers under a Decimal schema): such a column would quarantine every row it is in,
    which the unit tests cover; here the other columns of the row are the point."""
    if value is None:
        return False
    name = field.get("name")
    if name == "org.apache.kafka.connect.data.Decimal":
        return not isinstance(value, str)
    if name in TIME_UNITS:
        return not isinstance(value, int)
    return False


def qualified(source):
    table = source.get("table") or None
    namespace = source.get("schema") or source.get("db") or None
    if table is None:
        return None
    return f"{namespace}.{table}" if namespace else table


def output_name(column):
    """`_` starts only metadata columns: Paimon's `_tinyint1` is written as `c_tinyint1`."""
    if column == "_source_db":
        return column
    return "c" + column if column.startswith("_") else column


def subject_of(columns):
    if "id" in columns:
        return "id"
    keys = [c for c in sorted(columns) if c.endswith("id") and columns[c] in ("int64", "string")]
    return (keys or sorted(columns))[0]


def write_policies(tmp, policies):
    paths = []
    for i, (table, columns) in enumerate(sorted(policies.items())):
        subject = subject_of(columns)
        text = [f'table = {json.dumps(table)}', f'target = "t{i}"', f'subject = {json.dumps(subject)}',
                # A domain per table: a column one table keeps may be another's subject (a film id
                # beside an actor), and ids of one domain are never kept in plain.
                f'token_domain = "corpus-t{i}"', f'[columns.{json.dumps(subject)}]', 'action = "tokenize"',
                f'as = {json.dumps(output_name(subject) + "_token")}']
        for column, ty in sorted(columns.items()):
            if column != subject:
                text += [f"[columns.{json.dumps(column)}]", 'action = "keep"', f"type = {json.dumps(ty)}"]
                if output_name(column) != column:
                    text.append(f"as = {json.dumps(output_name(column))}")
        path = tmp / "policies" / f"t{i}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(text) + "\n")
        paths.append(path)
    return {table: f"t{i}" for i, table in enumerate(sorted(policies))}, paths


class Reject(Exception):
    pass


def value_of(raw, field, ty):
    """What the lake must hold for one value, decoded here from the message alone."""
    if raw is None:
        return None
    name = (field or {}).get("name")
    if name == "org.apache.kafka.connect.data.Decimal":
        if not isinstance(raw, str):
            raise Reject("type_mismatch")
        try:
            n = int.from_bytes(base64.b64decode(raw, validate=True), "big", signed=True)
        except ValueError:
            raise Reject("type_mismatch")
        return decimal.Decimal(n).scaleb(-int(field["parameters"]["scale"]))
    if name in TIME_UNITS:
        kind, per = TIME_UNITS[name]
        if not isinstance(raw, int):
            raise Reject("type_mismatch")
        if kind == "date":
            return datetime.date(1970, 1, 1) + datetime.timedelta(days=raw)
        if kind == "timestamp":
            return EPOCH + datetime.timedelta(microseconds=raw * 10**6 // per)
        secs, frac = divmod(raw, per)
        digits = 9 if per == 10**9 else 6
        return f"{secs // 3600:02}:{secs // 60 % 60:02}:{secs % 60:02}.{frac * 10**digits // per:0{digits}}"
    if ty == "timestamp":
        # Python reads at most six fraction digits; the lake keeps microseconds.
        text = re.sub(r"(\.\d{6})\d+", r"\1", raw.replace("Z", "+00:00"))
        return datetime.datetime.fromisoformat(text).astimezone(UTC)
    if ty == "int64":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise Reject("type_mismatch")
        return raw
    if ty == "float64":
        return float(raw)
    if ty == "bool":
        return raw
    if ty.startswith("decimal"):
        raise Reject("type_mismatch")
    return raw


def envelope_keys_once(pairs):
    """A key twice in an envelope (an object with `op`): JSON readers disagree on which value
    counts, so the event is malformed."""
    keys = [k for k, _ in pairs]
    if "op" in keys and len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def fate(line, policies, targets):
    """('row', target, {column: value}) | ('quarantine', reason) | ('control', kind) | ('tombstone',)."""
    try:
        doc = json.loads(line, object_pairs_hook=envelope_keys_once)
    except ValueError:
        return ("quarantine", "malformed_json")
    if doc is None:
        return ("tombstone",)
    schema, payload = unwrap(doc)
    if payload is None:
        return ("tombstone",)
    op = payload.get("op")
    if op is None:
        if payload.get("status") in ("BEGIN", "END"):
            return ("control", "transaction_" + payload["status"].lower())
        if "ddl" in payload or "tableChanges" in payload:
            return ("control", "schema_change")
        if any(k in payload for k in ("before", "after", "source")):
            return ("quarantine", "unsupported_op")
        if payload and set(payload) == {"ts_ms"}:
            return ("control", "heartbeat")
        return ("quarantine", "flattened_record")
    if op == "m":
        return ("control", "logical_message")
    if op not in ("c", "u", "r", "d", "t"):
        return ("quarantine", "unsupported_op")
    source = payload.get("source") or {}
    table = qualified(source)
    if table is None:
        return ("quarantine", "no_table")
    ts = next((t for t in (source.get("ts_ms"), payload.get("ts_ms")) if isinstance(t, int) and t > 0), None)
    if ts is None or not WINDOW_MS[0] <= ts < WINDOW_MS[1]:
        return ("quarantine", "bad_timestamp")
    image = payload.get("before") if op == "d" else payload.get("after")
    if image is None and op != "t":
        return ("quarantine", "no_row_image")
    if table not in policies:
        return ("quarantine", "unknown_table")
    fields = image_fields(schema) if schema else {}
    if schema and fields is None:
        return ("quarantine", "bad_schema")
    columns = policies[table]
    subject = subject_of(columns)
    values, late = {}, None
    # Values are read in image order (a value its schema cannot explain rejects the event
    # first); then the subject must be there; then each kept value must fit its type.
    for column, raw in (image or {}).items():
        if column not in columns:
            continue
        try:
            if raw == PLACEHOLDER:
                raw = (payload.get("before") or {}).get(column, PLACEHOLDER)
                if raw == PLACEHOLDER:
                    raise Reject("unavailable_value")
            field = fields.get(column)
            if field and (field.get("name") in TIME_UNITS or field.get("name") == "org.apache.kafka.connect.data.Decimal"):
                value = value_of(raw, field, columns[column])
                if column != subject:
                    values[column] = value
            elif column != subject:
                try:
                    values[column] = value_of(raw, field, columns[column])
                except (Reject, ValueError):
                    late = late or "type_mismatch"
        except Reject as r:
            return ("quarantine", r.args[0])
    if (image or {}).get(subject) is None and op != "t":
        return ("quarantine", "missing_subject")
    if late:
        return ("quarantine", late)
    values["_source_db"] = source.get("db") or None
    return ("row", targets[table], values)


def as_expected(got, want, ty):
    if ty == "string" and not isinstance(want, str) and want is not None:
        # Numbers, booleans, objects and arrays are kept as their JSON text.
        return json.loads(got) == want
    return got == want


def check_rows(lake, expected_rows, policies, targets):
    """Each target table holds exactly the expected positions, every value as the message says;
    returns how many values of each Python type were compared."""
    policies_by_target = {targets[t]: cols for t, cols in policies.items()}
    checked = collections.Counter()
    for target, rows in expected_rows.items():
        table = {r["_position"]: r for r in read_delta(lake / "tables" / target).to_pylist()}
        assert sorted(table) == sorted(rows), target
        for position, values in rows.items():
            for column, want in values.items():
                got = table[position][output_name(column)]
                ty = "string" if column == "_source_db" else policies_by_target[target][column]
                assert as_expected(got, want, ty), f"{target}.{column} at {position}: read back {got!r}, the message says {want!r}"
                checked[type(want).__name__] += 1
    return checked


def test_real_debezium_messages_land_exactly(sluice_bin, tmp_path):
    policies = derive_policies()
    targets, paths = write_policies(tmp_path, policies)
    config = write_config(tmp_path, CORPUS, [tmp_path / "policies"])
    summary_path = tmp_path / "summary.json"
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", summary_path)
    summary = json.loads(summary_path.read_text())

    expected_rows = collections.defaultdict(dict)
    expected_quarantine = collections.Counter()
    expected_control = collections.Counter()
    for stream, offset, line in corpus_lines():
        f = fate(line, policies, targets)
        if f[0] == "row":
            expected_rows[f[1]][f"{stream}:{offset}"] = f[2]
        elif f[0] == "quarantine":
            expected_quarantine[f[1]] += 1
        elif f[0] == "control":
            expected_control[f[1]] += 1

    assert dict(summary["quarantined"]) == dict(expected_quarantine)
    assert dict(summary["control_records"]) == dict(expected_control)
    # The corpus exercises what it was chosen for.
    assert expected_control["transaction_begin"] >= 2 and expected_control["schema_change"] >= 2
    checked = check_rows(tmp_path / "lake", expected_rows, policies, targets)
    # Exact decimals, dates and timestamps from their Connect encodings were among them.
    assert checked["Decimal"] >= 3 and checked["date"] >= 1 and checked["datetime"] >= 5, checked
