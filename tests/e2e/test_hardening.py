"""Erasure and leak hardening (issue 16): each test pins one finding of an adversarial review,
and each was seen failing on the build before its fix.

Outputs are read with Python `deltalake`, `pyarrow` and plain byte scans of every file, not
with sluice's own readers."""

import datetime
import json
import pathlib

import deltalake
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_POLICIES, TEST_POLICIES, read_delta, run, write_config
from test_aggregates import AGGREGATES

PEOPLE = (TEST_POLICIES / "people-hardening.toml").read_text()

# A person whose every value is distinctive, so a byte scan finds any trace of them.
VICTIM = {"id": "C0042   ", "email": "victim@zq-unusual-domain.example", "postcode": "ZQ97 1AA",
          "balance_pence": 987654321, "joined_at": "2024-03-05T07:08:09.123456Z"}
TRACES = ["zq-unusual-domain", "ZQ97", "987654321", "07:08:09", "1709622489123"]


def person(i):
    return {"id": f"P{i:05d}", "email": f"p{i}@example.test", "postcode": f"AB{i % 90 + 10} 2CD",
            "balance_pence": 1000 + i, "joined_at": f"2024-03-0{1 + i % 4}T10:00:00Z"}


def event(row, ts, op="c"):
    return json.dumps({"before": None, "after": row, "op": op, "ts_ms": ts,
                       "source": {"db": "crm", "schema": "public", "table": "people", "ts_ms": ts}})


def pipeline(tmp, policy=PEOPLE, extra=""):
    pol = tmp / "people.toml"
    pol.write_text(policy)
    (tmp / "events").mkdir(exist_ok=True)
    return write_config(tmp, tmp / "events", [pol], extra=extra)


def write_events(tmp, lines, name="people.jsonl"):
    with open(tmp / "events" / name, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def forget(sluice_bin, config, *args, check=True):
    result = run(sluice_bin, "forget", "--config", config, "--settle-ms", 0, *args, check=check)
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def every_byte_under(root):
    return {p: p.read_bytes() for p in pathlib.Path(root).rglob("*") if p.is_file()}


def test_a_padded_subject_id_is_erased_by_its_bare_form_and_an_absent_id_fails_the_job(sluice_bin, tmp_path):
    """Ingest tokenized `'C0042   '` (a char(n) code) while forget trimmed `C0042`: the key was
    not destroyed, no row removed, and the job reported success."""
    config = pipeline(tmp_path)
    write_events(tmp_path, [event(VICTIM, 1709622489123)] + [event(person(i), 1709622489123 + i) for i in range(5)])
    run(sluice_bin, "run", "--config", config, "--once")
    people = tmp_path / "lake" / "tables" / "people"
    assert read_delta(people).num_rows == 6

    result, receipt = forget(sluice_bin, config, "--subject", "C0042")
    assert result.returncode == 0, result.stderr
    assert receipt["subjects_without_rows"] == 0 and receipt["keys_destroyed"] == 1, receipt
    assert receipt["tables"]["people"]["rows_removed"] == 1 and receipt["tables"]["vault"]["rows_removed"] == 1
    assert read_delta(people).num_rows == 5
    assert receipt["subject_tokens"][0] not in set(read_delta(people).column("_subject").to_pylist())

    # An id that matched nothing: not a success unless the operator says it is expected.
    result, receipt = forget(sluice_bin, config, "--subject", "C0043", check=False)
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert receipt["subjects_without_rows"] == 1 and "matched no row" in result.stderr
    result, _ = forget(sluice_bin, config, "--subject", "C0044", "--allow-absent")
    assert result.returncode == 0, result.stderr
    # A blank id is refused before anything is destroyed.
    result, _ = forget(sluice_bin, config, "--subject", "   ", check=False)
    assert result.returncode != 0 and "empty or blank" in result.stderr


def test_no_statistics_describe_a_person_and_an_erasure_leaves_no_older_commit(sluice_bin, tmp_path):
    """Every kept, generalized and derived column and `_source_ts` had file statistics; with a
    file per event min = max = the row, and the erasure left those commits in `_delta_log`."""
    config = pipeline(tmp_path)
    # One commit per event: files of one row each, the worst case.
    for i, row in enumerate([person(1), VICTIM, person(2)]):
        write_events(tmp_path, [event(row, 1709622489123 + i)])
        run(sluice_bin, "run", "--config", config, "--once")
    lake = tmp_path / "lake"
    people = lake / "tables" / "people"
    log = b"".join(every_byte_under(people / "_delta_log").values())
    stats = [json.loads(a["add"]["stats"]) for f in sorted((people / "_delta_log").glob("*.json"))
             for a in map(json.loads, f.read_text().splitlines()) if "add" in a and a["add"].get("stats")]
    assert stats, "files have statistics (row counts at least)"
    for s in stats:
        described = set(s.get("minValues", {})) | set(s.get("maxValues", {}))
        assert described <= {"_op", "_ingested_at", "_source_db"}, described
    assert b"987654321" not in log and b"zq-unusual" not in log

    result, receipt = forget(sluice_bin, config, "--subject", "C0042")
    assert result.returncode == 0, result.stderr
    table = receipt["tables"]["people"]
    assert table["history_removed_before"] is not None and table["log_files_removed"] > 0, table
    versions = sorted(int(f.name.split(".")[0]) for f in (people / "_delta_log").glob("*.json"))
    assert versions[0] == table["history_removed_before"], "no commit before the erasure is left"
    with pytest.raises(Exception):  # noqa: B017 - any refusal is the point
        deltalake.DeltaTable(str(people), version=0).to_pyarrow_table()
    assert read_delta(people).num_rows == 2
    # Nothing under the table (data files, log, checkpoint) holds any trace of the victim.
    for path, data in every_byte_under(people).items():
        text = data if path.suffix != ".parquet" else str(pq.read_table(path).to_pylist()).encode() + data
        for trace in TRACES:
            assert trace.encode() not in text, f"{trace} in {path.relative_to(lake)}"
    # The table still works: the pipeline appends and exactly-once positions survived.
    write_events(tmp_path, [event(person(3), 1709622489200)])
    summary = tmp_path / "summary.json"
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", summary)
    assert json.loads(summary.read_text())["rows_written"] == {"people": 1}
    assert read_delta(people).num_rows == 3


def test_recomputed_aggregates_keep_no_older_version_to_subtract(sluice_bin, tmp_path):
    """Before minus after an erasure's recomputation was the erased person's exact amount."""
    events = tmp_path / "events"
    run(sluice_bin, "generate", "--events", 3000, "--seed", 21, "--span-hours", 12, "--out", events / "part-0.jsonl")
    config = write_config(tmp_path, events, [DEMO_POLICIES], extra=AGGREGATES)
    run(sluice_bin, "run", "--config", config, "--once")
    result, receipt = forget(sluice_bin, config, "--subject", "3")
    assert result.returncode == 0, result.stderr
    assert any("hours recomputed" in h and "no older version" in h for h in receipt["hooks"]), receipt["hooks"]
    for name in ("payments_by_channel_hour", "payments_by_channel_card_hour"):
        table_dir = tmp_path / "lake" / "aggregates" / name
        dt = deltalake.DeltaTable(str(table_dir))
        active = {pathlib.Path(p).name for p in dt.file_uris()}
        on_disk = {p.name for p in table_dir.rglob("*.parquet") if "_delta_log" not in p.parts}
        assert on_disk == active, f"{name}: files of older versions left: {sorted(on_disk - active)[:3]}"
        oldest = min(int(f.name.split(".")[0]) for f in (table_dir / "_delta_log").glob("*.json"))
        assert oldest == dt.version(), f"{name}: commits before the recomputation are left"


def test_an_anonymizing_erasure_can_blank_exact_source_times(sluice_bin, tmp_path):
    """`erasure.blank` could only name policy outputs: `_source_ts` kept the exact instant."""
    policy = PEOPLE + '\n[erasure]\nmode = "anonymize"\nblank = ["postcode_area", "_source_ts", "_ingested_at"]\n'
    config = pipeline(tmp_path, policy)
    write_events(tmp_path, [event(VICTIM, 1709622489123), event(person(1), 1709622489999)])
    run(sluice_bin, "run", "--config", config, "--once")
    result, receipt = forget(sluice_bin, config, "--subject", "C0042")
    assert result.returncode == 0, result.stderr
    rows = read_delta(tmp_path / "lake" / "tables" / "people").to_pylist()
    blanked = [r for r in rows if r["_subject"] == ""]
    assert len(blanked) == 1 and blanked[0]["postcode_area"] is None
    day = datetime.datetime(2024, 3, 5, tzinfo=datetime.timezone.utc)
    assert blanked[0]["_source_ts"] == day, "the exact time is cut to its day"
    assert blanked[0]["_ingested_at"].time() == datetime.time(0), blanked[0]["_ingested_at"]
    other = [r for r in rows if r["_subject"] != ""][0]
    assert other["_source_ts"].microsecond == 999000, "other rows keep their times"


def test_the_quarantine_resurrects_no_erased_subject_and_seals_events_under_their_keys(sluice_bin, tmp_path):
    """Events quarantined before the tombstone check (`unavailable_value`, a lone surrogate,
    a bad time) came back after an erasure on a replay, all under one system key."""
    config = pipeline(tmp_path)
    victim = dict(VICTIM)
    poison = [
        event(dict(victim, email="__debezium_unavailable_value"), 1709622489123, op="u"),
        event(dict(victim, postcode="\ud800"), 1709622489124, op="u"),
        event(victim, 99_999_999_999_999, op="u"),  # year 5138: outside the time window
    ]
    lines = [event(victim, 1709622489122)] + poison + [event(person(1), 1709622489125)]
    write_events(tmp_path, lines)
    run(sluice_bin, "run", "--config", config, "--once")
    quarantine = tmp_path / "lake" / "quarantine"
    rows = read_delta(quarantine).to_pylist()
    assert sorted(r["reason"] for r in rows) == ["bad_timestamp", "malformed_json", "unavailable_value"], rows
    token = read_delta(tmp_path / "lake" / "tables" / "people").to_pylist()[0]["_subject"]
    assert {r["_subject"] for r in rows} == {token}, "each sealed under the subject's key, found by its token"

    result, receipt = forget(sluice_bin, config, "--subject", "C0042")
    assert result.returncode == 0, result.stderr
    assert receipt["tables"]["quarantine"]["rows_removed"] == 3 and receipt["review_quarantined"] == []
    assert read_delta(quarantine).num_rows == 0

    # A replay of the same events (another stream): nothing of theirs comes back, anywhere.
    write_events(tmp_path, lines, name="replay.jsonl")
    summary = tmp_path / "replay.json"
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", summary)
    replay = json.loads(summary.read_text())
    assert replay["erased_subject_rows"] == 4 and replay["quarantined"] == {}, replay
    assert read_delta(quarantine).num_rows == 0


def test_an_erasure_does_not_pass_while_unattributable_events_name_the_subject(sluice_bin, tmp_path):
    """An event `forget` cannot attribute (a table no policy names) was kept while the
    verification passed."""
    config = pipeline(tmp_path)
    stranger = json.dumps({"before": None, "after": {"id": "C0042", "note": "x"}, "op": "c", "ts_ms": 1709622489123,
                           "source": {"db": "crm", "schema": "public", "table": "letters", "ts_ms": 1709622489123}})
    write_events(tmp_path, [event(VICTIM, 1709622489122), stranger, "{not json, C0042 wrote this"])
    run(sluice_bin, "run", "--config", config, "--once")
    quarantine = tmp_path / "lake" / "quarantine"
    assert read_delta(quarantine).num_rows == 2

    result, receipt = forget(sluice_bin, config, "--subject", "C0042", check=False)
    assert result.returncode == 1, result.stderr
    assert len(receipt["review_quarantined"]) == 2, "the unknown table's event and the unreadable one"
    assert any("cannot be attributed" in f for f in receipt["verification"]["findings"]), receipt["verification"]
    assert read_delta(quarantine).num_rows == 2, "kept until a person decides"

    # Looked at: it is theirs.
    result, receipt = forget(sluice_bin, config, "--subject", "C0042", "--unattributed", "delete")
    assert receipt["verification"]["passed"], receipt["verification"]
    assert read_delta(quarantine).num_rows == 0


def test_a_replaced_source_file_stops_the_run_and_a_linked_directory_is_not_read_twice(sluice_bin, tmp_path):
    """A file replaced by one at least as long was read from the committed offset (the middle
    of another file); a symbolic link to a directory of the source listed its files again."""
    config = pipeline(tmp_path)
    events = tmp_path / "events"
    (events / "2024").mkdir()
    (events / "2024" / "people.jsonl").write_text("".join(event(person(i), 1709622489000 + i) + "\n" for i in range(3)))
    (events / "latest").symlink_to(events / "2024")
    run(sluice_bin, "run", "--config", config, "--once")
    people = tmp_path / "lake" / "tables" / "people"
    assert read_delta(people).num_rows == 3, "the linked directory is not read a second time"

    # Appending is fine.
    with open(events / "2024" / "people.jsonl", "a") as f:
        f.write(event(person(3), 1709622489003) + "\n")
    run(sluice_bin, "run", "--config", config, "--once")
    assert read_delta(people).num_rows == 4

    # Replaced by another, longer file under the same name: an error naming it, nothing read.
    (events / "2024" / "people.jsonl").write_text("".join(event(person(i), 1709622489100 + i) + "\n" for i in range(10, 20)))
    failed = run(sluice_bin, "run", "--config", config, "--once", check=False)
    assert failed.returncode != 0 and "2024/people.jsonl" in failed.stderr and "replaced" in failed.stderr, failed.stderr
    assert read_delta(people).num_rows == 4


def test_an_erased_id_reused_for_someone_new_is_kept_only_after_an_audited_release(sluice_bin, tmp_path):
    """Tombstones were permanent: a recycled account number silently lost all future data."""
    config = pipeline(tmp_path)
    write_events(tmp_path, [event(VICTIM, 1709622489123)])
    run(sluice_bin, "run", "--config", config, "--once")
    result, erased = forget(sluice_bin, config, "--subject", "C0042")
    assert result.returncode == 0, result.stderr
    people = tmp_path / "lake" / "tables" / "people"

    # March 2025: the number is given to a new customer. Dropped, and counted, until released.
    newcomer = dict(person(7), id="C0042")
    write_events(tmp_path, [event(newcomer, 1740787200000)], name="2025.jsonl")
    summary = tmp_path / "s1.json"
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", summary)
    assert json.loads(summary.read_text())["erased_subject_rows"] == 1
    assert read_delta(people).num_rows == 0

    refused = run(sluice_bin, "reuse-subject", "--config", config, "--subject", "C0043", "--request-id", "T-1",
                  "--requested-by", "ops", check=False)
    assert refused.returncode != 0 and "no erasure in force" in refused.stderr
    released = json.loads(run(sluice_bin, "reuse-subject", "--config", config, "--subject", "C0042 ",
                              "--from", "2025-01-01T00:00:00Z", "--request-id", "T-2", "--requested-by", "ops").stdout)
    assert released["subject_tokens"] == erased["subject_tokens"] and released["job_id"].startswith("reuse-")
    audit = read_delta(tmp_path / "lake" / "audit" / "erasures").to_pylist()
    assert sorted(a["job_id"] for a in audit) == sorted([erased["job_id"], released["job_id"]])

    # The newcomer's events (those dropped before the release are read again from a replay) are
    # kept; the erased person's, replayed, are not.
    write_events(tmp_path, [event(newcomer, 1740787200000), event(VICTIM, 1709622489123)], name="replay.jsonl")
    summary = tmp_path / "s2.json"
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", summary)
    assert json.loads(summary.read_text())["erased_subject_rows"] == 1
    rows = read_delta(people).to_pylist()
    assert [r["email_domain"] for r in rows] == ["example.test"], rows
    vault = read_delta(tmp_path / "lake" / "vault").to_pylist()
    assert vault and all(r["subject_token"] == erased["subject_tokens"][0] for r in vault)

    # Erased again (the newcomer asks): for good, the newcomer's rows gone too.
    result, again = forget(sluice_bin, config, "--subject", "C0042", "--request-id", "T-3")
    assert result.returncode == 0, result.stderr
    assert again["keys_destroyed"] == 1 and read_delta(people).num_rows == 0


def test_after_an_erasure_no_output_byte_names_the_subject(sluice_bin, canary_dir, tmp_path):
    """Every byte a running daemon and the erasure leave (Delta logs and checkpoints, Iceberg
    metadata and manifests, data files of both formats, the vault, the quarantine, the audit
    table, every /metrics body) is scanned for the erased subject's token, key ids and exact
    source time; a copy of the lake taken before the erasure is the positive control."""
    import shutil
    import signal
    import subprocess

    from conftest import wait_until
    from test_leaks import canary_pipeline
    from test_production import http_get, serving_address

    lines, config = canary_pipeline(
        canary_dir, tmp_path, lake_extra='format = "both"',
        extra='erasure_refresh_ms = 200\n[http]\nlisten = "127.0.0.1:0"\n[batch]\nmax_age_ms = 200')
    people = [json.loads(l) for l in (canary_dir / "people.jsonl").read_text().splitlines() if l.strip()]
    victim = people[12]
    source_ms = next(json.loads(l)["ts_ms"] for l in lines if f'"id": {json.dumps(victim["id"])}' in l)
    lake, logs = tmp_path / "lake", tmp_path / "logs"
    logs.mkdir()
    log = logs / "daemon.log"
    with open(log, "w") as err:
        daemon = subprocess.Popen([str(sluice_bin), "--log-format", "json", "run", "--config", str(config)],
                                  stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            base = "http://" + wait_until(lambda: serving_address(log), 60, "the HTTP server")
            total = sum(1 for l in lines if l.strip())

            def settled():
                body = http_get(f"{base}/metrics")[1]
                done = f"sluice_events_read_total {total}" in body and "sluice_uncommitted_events 0" in body
                return body if done else None

            (logs / "metrics-before.txt").write_text(wait_until(settled, 120, "every event committed"))
            token = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", victim["id"], "--dry-run").stdout)["subject_tokens"][0]
            rows = [r for r in read_delta(lake / "tables" / "people").to_pylist() if r["_subject"] == token]
            key_ids = {r[c][1:17] for r in rows for c in ("phone_enc", "national_id_enc", "iban_enc") if r[c]}
            assert rows and key_ids
            shutil.copytree(lake, tmp_path / "lake-before")
            result = run(sluice_bin, "forget", "--config", config, "--subject", victim["id"], "--settle-ms", 1000)
            assert json.loads(result.stdout)["verification"]["passed"]
            (logs / "metrics-after.txt").write_text(http_get(f"{base}/metrics")[1])
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.communicate(timeout=60)

    stamp = datetime.datetime.fromtimestamp(source_ms / 1000, datetime.timezone.utc)
    values = tmp_path / "victim.txt"
    values.write_text("\n".join([token, *(k.hex() for k in key_ids), stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3], str(source_ms)]))
    before = run(sluice_bin, "audit-leaks", "--values", values, tmp_path / "lake-before", check=False)
    assert before.returncode == 1 and "LEAK" in before.stdout, "positive control: the lake named them before"
    # Everything but the audit table, whose receipt names the erased subjects by token by design
    # (what an auditor checks a request against).
    scanned = [d for d in lake.iterdir() if d.name != "audit"]
    scan = run(sluice_bin, "audit-leaks", "--values", values, *scanned, logs, check=False)
    assert scan.returncode == 0, scan.stdout
    files = [f for d in (*scanned, logs) for f in d.rglob("*") if f.is_file()]
    assert int(scan.stdout.split("scanned ")[1].split(" files")[0]) == len(files), scan.stdout
    assert any(f.name.endswith(".checkpoint.parquet") for f in files) and any(f.suffix == ".avro" for f in files)
    audit = read_delta(lake / "audit" / "erasures").to_pylist()
    assert json.loads(audit[0]["subject_tokens"]) == [token]
    # Key ids as raw bytes (inside ciphertexts, uncompressed), which the text scan does not see.
    assert any(k in data for data in every_byte_under(tmp_path / "lake-before").values() for k in key_ids)
    for d in scanned:
        for path, data in every_byte_under(d).items():
            assert not [k for k in key_ids if k in data], f"{path.relative_to(lake)} holds a key id of theirs"
