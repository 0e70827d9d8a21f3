"""Canary values through every action, plus bad input carrying them; then every byte written
(tables, vault, quarantine, key store, logs, stdout/stderr) is scanned. Zero hits."""

import base64
import gzip
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import TEST_POLICIES, read_delta, run, write_config
from lakes import iceberg_lake, weed  # noqa: F401 (fixtures)

POLICY = (TEST_POLICIES / "people-canary.toml").read_text()


def envelope(table, op, before, after, ts):
    return json.dumps({"before": before, "after": after, "source": {"db": "bank", "schema": "public", "table": table, "ts_ms": ts}, "op": op, "ts_ms": ts})


def canary_events(people):
    lines, ts = [], 1_718_000_000_000
    for i, p in enumerate(people):
        lines.append(envelope("people", "c", None, p, ts + i))
        if i % 3 == 0:
            lines.append(envelope("people", "u", None, dict(p, email=p["email"].upper()), ts + i))
        if i % 10 == 0:
            lines.append(envelope("people", "d", p, None, ts + i))
    bad = people[:4]
    lines.append(envelope("people", "c", None, bad[0], ts)[:-40])                                   # malformed (cut off)
    lines.append(envelope("secrets", "c", None, bad[1], ts))                                        # unknown table
    lines.append(envelope("people", "c", None, dict(bad[2], balance_pence=bad[2]["full_name"]), ts))  # type drift
    lines.append(envelope("people", "c", None, dict(bad[3], free_text_note=bad[3]["free_text_note"] * 2000), ts))  # oversized
    # An extra column no policy names, carrying a canary: default deny.
    lines.append(envelope("people", "c", None, dict(people[5], shadow_copy=people[5]["national_id"]), ts))
    return lines, len(people) + 1


def canary_pipeline(canary_dir, tmp_path, **config):
    """The canary events in a file and a pipeline over them with POLICY: (event lines, config)."""
    people = [json.loads(l) for l in (canary_dir / "people.jsonl").read_text().splitlines() if l.strip()]
    lines, _ = canary_events(people)
    events = tmp_path / "events"
    events.mkdir()
    (events / "people.jsonl").write_text("\n".join(lines) + "\n")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "people.toml").write_text(POLICY)
    return lines, write_config(tmp_path, events, [policies], **config)


def test_no_canary_value_leaves_except_as_ciphertext(sluice_bin, canary_dir, tmp_path):
    # Both formats: the Iceberg data, manifests, metadata and catalog are scanned too.
    lines, config = canary_pipeline(canary_dir, tmp_path, lake_extra='format = "both"')
    logs = tmp_path / "logs"
    logs.mkdir()

    env = dict(os.environ, SLUICE_LOG="debug")
    for fmt in ("human", "json"):
        result = run(sluice_bin, "--log-format", fmt, "run", "--config", config, "--once", "--summary-json", tmp_path / f"summary-{fmt}.json", env=env)
        (logs / f"stdout-{fmt}.txt").write_text(result.stdout)
        (logs / f"stderr-{fmt}.txt").write_text(result.stderr)
    check = run(sluice_bin, "check", "--config", config)
    (logs / "check.txt").write_text(check.stdout + check.stderr)

    summary = json.loads((tmp_path / "summary-human.json").read_text())
    assert summary["quarantined"] == {"malformed_json": 1, "unknown_table": 1, "type_mismatch": 1, "oversized_event": 1}
    assert summary["dropped_columns"] == {"public.people": {"shadow_copy": 1}}
    lake = tmp_path / "lake"
    people_table = read_delta(lake / "tables" / "people")
    assert people_table.num_rows == sum(1 for l in lines if '"table": "people"' in l) - 3
    assert "shadow_copy" not in people_table.column_names
    quarantine = read_delta(lake / "quarantine").to_pylist()
    assert sorted(q["reason"] for q in quarantine) == ["malformed_json", "oversized_event", "type_mismatch", "unknown_table"]
    drift = next(q for q in quarantine if q["reason"] == "type_mismatch")
    assert (drift["table"], drift["column"]) == ("public.people", "balance_pence") and drift["_position"].startswith("people.jsonl:")
    # The vault holds only envelopes: version byte, 16-byte key id, nonce, ciphertext, tag.
    for ct in read_delta(lake / "vault").column("ciphertext").to_pylist():
        assert ct[0] == 1 and len(ct) >= 45

    # An independent reader's view first: every value of every Parquet file pyarrow can open.
    canaries = [l.strip().lower() for l in (canary_dir / "canaries.txt").read_text().splitlines() if len(l.strip()) >= 6]
    for parquet in lake.rglob("*.parquet"):
        text = "\n".join(
            (v.hex() + "\n" + v.decode("latin-1")) if isinstance(v, bytes) else str(v)
            for column in pq.read_table(parquet).columns for v in column.to_pylist() if v is not None
        ).lower()
        found = [c for c in canaries if c in text]
        assert not found, f"{parquet.relative_to(lake)} holds {len(found)} canary values"

    scan = run(sluice_bin, "audit-leaks", "--values", canary_dir / "canaries.txt", lake, tmp_path / "keys", logs, check=False)
    assert scan.returncode == 0, scan.stdout
    assert "no leaks found" in scan.stdout
    scanned_files = int(scan.stdout.split("scanned ")[1].split(" files")[0])
    written = [p for d in (lake, tmp_path / "keys", logs) for p in d.rglob("*") if p.is_file()]
    assert scanned_files == len(written) and any(p.suffix == ".parquet" for p in written), scan.stdout


def test_no_canary_value_in_any_object_of_a_lake_on_object_storage(sluice_bin, canary_dir, tmp_path, iceberg_lake):
    """The same pipeline with its lake on each storage (lakes.py): every object written — the
    Delta tables, vault and quarantine in the bucket, the Iceberg warehouse, its metadata and
    the catalog's — is fetched and scanned, before and after an erasure."""
    lake = iceberg_lake
    lines, config = canary_pipeline(canary_dir, tmp_path, lake=lake.root, lake_extra=lake.config("both"))
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    assert lake.iceberg("people").num_rows == lake.delta("people").num_rows > 0
    people = [json.loads(l) for l in (canary_dir / "people.jsonl").read_text().splitlines() if l.strip()]
    forget = run(sluice_bin, "forget", "--config", config, "--subject", str(people[7]["id"]), "--settle-ms", "0",
                 env=lake.env, check=False)
    assert forget.returncode == 0, forget.stderr[-2000:]
    fetched = tmp_path / "fetched"
    urls = lake.all_files()
    assert any(u.endswith(".avro") for u in urls) and any(u.endswith(".metadata.json") for u in urls)
    for i, url in enumerate(urls):
        # Flattened, with the suffix kept (the scanner decodes by type).
        (fetched / f"{i:05d}-{url.rsplit('/', 1)[-1]}").parent.mkdir(exist_ok=True)
        (fetched / f"{i:05d}-{url.rsplit('/', 1)[-1]}").write_bytes(lake.read(url))
    extra = [tmp_path / "iceberg-catalog.db"] if lake.kind == "s3" else []
    scan = run(sluice_bin, "audit-leaks", "--values", canary_dir / "canaries.txt", fetched, tmp_path / "keys", *extra,
               check=False)
    assert scan.returncode == 0, scan.stdout
    scanned_files = int(scan.stdout.split("scanned ")[1].split(" files")[0])
    keys = [p for p in (tmp_path / "keys").rglob("*") if p.is_file()]
    assert scanned_files == len(urls) + len(keys) + len(extra), scan.stdout


def test_the_scanner_finds_every_form_of_a_leak(sluice_bin, canary_dir, tmp_path):
    values = [l.strip() for l in (canary_dir / "canaries.txt").read_text().splitlines() if l.strip()]
    email = next(v for v in values if "@" in v)
    phone = next(v for v in values if v.startswith("+"))
    name, note, iban, card = values[0], values[7], values[5], values[6]
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "upper.txt").write_text(f"x {email.upper()} y")
    (planted / "digits.txt").write_text("".join(c for c in phone if c.isdigit()))
    (planted / "b64.txt").write_text(base64.b64encode(name.encode()).decode())
    (planted / "sha256.txt").write_text(hashlib.sha256(iban.encode()).hexdigest())
    (planted / "md5b64.txt").write_text(base64.b64encode(hashlib.md5(card.encode()).digest()).decode())
    pq.write_table(pa.table({"note": [note] * 50}), planted / "data.parquet", compression="zstd")
    with gzip.open(planted / "log.gz", "wt") as f:
        f.write(f"error near {card}\n")
    (planted / "clean.txt").write_text("nothing to see")
    scan = run(sluice_bin, "audit-leaks", "--values", canary_dir / "canaries.txt", planted, check=False)
    assert scan.returncode == 1, scan.stdout
    leaked = {line.split(":")[0].split("/")[-1] for line in scan.stdout.splitlines() if line.startswith("LEAK ")}
    assert leaked == {"upper.txt", "digits.txt", "b64.txt", "sha256.txt", "md5b64.txt", "data.parquet", "log.gz"}
    for value in (email, phone, name, note, iban, card):
        assert value not in scan.stdout, "the report must not print the values it found"


def test_kafka_source_and_stream_sink_leak_nothing(sluice_bin, canary_dir, tmp_path):
    """Canary events through Kafka, sanitized rows published to an output topic: the lake, the
    published messages, the key store and the logs hold no canary value."""
    from kafka_broker import Tansu

    people = [json.loads(l) for l in (canary_dir / "people.jsonl").read_text().splitlines() if l.strip()]
    lines, _ = canary_events(people)
    broker = Tansu(tmp_path / "broker").start()
    try:
        broker.create_topic("bank", 2)
        broker.create_topic("sanitized", 1)
        broker.produce("bank", [l.encode() for l in lines], 2)
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "people.toml").write_text(POLICY)
        source = f'kind = "kafka"\nbrokers = "{broker.address}"\ngroup_id = "leaks"\ntopics = ["bank"]\nsession_timeout_ms = 6000'
        publish = f'\n[publish]\nkind = "kafka"\nbrokers = "{broker.address}"\ntopic = "sanitized"\n'
        config = write_config(tmp_path, None, [policies], source=source, extra=publish)
        logs = tmp_path / "logs"
        logs.mkdir()
        result = run(sluice_bin, "--log-format", "json", "run", "--config", config, "--once",
                     env=dict(os.environ, SLUICE_LOG="debug"))
        (logs / "stdout.txt").write_text(result.stdout)
        (logs / "stderr.txt").write_text(result.stderr)
        lake = tmp_path / "lake"
        people_rows = read_delta(lake / "tables" / "people").num_rows
        published = broker.read_all("sanitized", 1)
        assert len(published) == people_rows > 0, "one message per sanitized row"
        first = json.loads(published[0])
        assert first["_table"] == "people" and "id_token" in first and "email" not in first
        out = tmp_path / "published"
        out.mkdir()
        (out / "sanitized.jsonl").write_bytes(b"\n".join(published))
        scan = run(sluice_bin, "audit-leaks", "--values", canary_dir / "canaries.txt", lake, out, tmp_path / "keys", logs, check=False)
        assert scan.returncode == 0, scan.stdout
        assert "no leaks found" in scan.stdout
    finally:
        broker.stop(kill=True)
