"""Apache Iceberg tables (embedded SQL catalog on SQLite) beside or instead of Delta, read by
pyiceberg, pyarrow and DuckDB (none of them written here): identical rows, exactly once across
kill -9 around Iceberg commits, schema evolution, erasure with no history left."""

import collections
import json
import shutil

import duckdb
import pyarrow.parquet as pq
import pytest

from conftest import (DEMO_POLICIES, DEMO_TARGETS, REPO, TEST_POLICIES, iceberg_catalog, people_events, people_pipeline,
                      read_delta, read_iceberg, run, run_until_killed, source_events, write_config)

BOTH = 'format = "both"'


def same_rows(a, b):
    """Rows of `a` not in `b` and of `b` not in `a`, as multisets, on `b`'s columns (DuckDB)."""
    con = duckdb.connect()
    con.register("a", a)
    con.register("b", b)
    cols = ", ".join(f'"{c}"' for c in b.schema.names)
    only_a = con.sql(f"select count(*) from (select {cols} from a except all select {cols} from b)").fetchall()[0][0]
    only_b = con.sql(f"select count(*) from (select {cols} from b except all select {cols} from a)").fetchall()[0][0]
    return only_a, only_b


def test_demo_events_land_identically_in_delta_and_iceberg(sluice_bin, tmp_path):
    config = write_config(tmp_path, REPO / "fixtures" / "demo" / "events", [DEMO_POLICIES], lake_extra=BOTH)
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "summary.json")
    lake = tmp_path / "lake"
    catalog = iceberg_catalog(lake)
    assert sorted(t for _, t in catalog.list_tables("test")) == sorted(DEMO_TARGETS.values())
    for target in DEMO_TARGETS.values():
        table = catalog.load_table(("test", target))
        iceberg_rows = table.scan().to_arrow()
        delta_rows = read_delta(lake / "tables" / target)
        assert iceberg_rows.num_rows == delta_rows.num_rows > 0
        assert iceberg_rows.schema.names == delta_rows.schema.names
        assert same_rows(iceberg_rows, delta_rows) == (0, 0), target
        # Partitioned by day; positions in the snapshot summary, as Kafka Connect's sink keeps them.
        assert [(f.name, str(f.transform)) for f in table.spec().fields] == [("_date", "identity")]
        summary = table.current_snapshot().summary
        assert summary["sluice.position.sluice/test/crm-000.jsonl"].isdigit()
        # No manifest bound (the history an erasure must not leave behind) on a linking column.
        schema = table.schema()
        linking = {schema.find_field(c).field_id for c in ("_subject", "_position") if c in schema.column_names}
        for row in table.inspect.files().to_pylist():
            bounded = {key for key, _ in (row["lower_bounds"] or [])}
            assert bounded and not bounded & linking, target
    # DuckDB over the Iceberg rows as a dashboard would ask.
    payments = read_iceberg(lake, "payments")
    per_day = duckdb.sql("select _date, count(*) n from payments group by 1 order by 1").fetchall()
    assert sum(n for _, n in per_day) == payments.num_rows and len(per_day) > 1

    # A second run reads nothing twice.
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert not again["rows_written"]
    for target in DEMO_TARGETS.values():
        assert read_iceberg(lake, target).num_rows == read_delta(lake / "tables" / target).num_rows


def test_kill_9_around_iceberg_commits_then_finish_exactly_once(sluice_bin, tmp_path):
    events = tmp_path / "events"
    for i in range(3):
        run(sluice_bin, "generate", "--events", 2500, "--seed", 300 + i, "--out", events / f"part-{i}.jsonl")
    config = write_config(
        tmp_path, events, [DEMO_POLICIES], lake_extra=BOTH,
        extra="[batch]\nmax_rows = 600\n\n[workers]\nthreads = 2\nchunk_events = 150\n",
    )
    # Files written but the catalog not yet pointing at them; committed but not yet known to
    # the run; and kills between the tables' commits of one flush (ten sinks commit per flush).
    run_until_killed(sluice_bin, config, failpoint="iceberg-before-commit:payments")
    run_until_killed(sluice_bin, config, kill_after_commits=7)
    run_until_killed(sluice_bin, config, failpoint="iceberg-after-commit:customers")
    run_until_killed(sluice_bin, config, kill_after_commits=13)
    run_until_killed(sluice_bin, config, failpoint="iceberg-after-commit:payments")
    run(sluice_bin, "run", "--config", config, "--once")

    source = [e for e in source_events(events) if e.get("table") in DEMO_TARGETS]
    assert len(source) > 6000
    lake = tmp_path / "lake"
    for table, target in DEMO_TARGETS.items():
        expected = {e["position"] for e in source if e["table"] == table}
        for fmt, got in (("delta", read_delta(lake / "tables" / target)), ("iceberg", read_iceberg(lake, target))):
            positions = got.column("_position").to_pylist()
            twice = [p for p, n in collections.Counter(positions).items() if n > 1]
            assert not twice, f"{fmt} {target}: {len(twice)} events written twice"
            assert set(positions) == expected, f"{fmt} {target}: {len(expected - set(positions))} events lost"


POLICY = (TEST_POLICIES / "people-balance.toml").read_text()


def test_a_policy_that_adds_a_column_evolves_the_iceberg_table(sluice_bin, tmp_path):
    policy, events, config = people_pipeline(tmp_path, lake_extra='format = "iceberg"')
    planned = run(sluice_bin, "check", "--config", config, "--tables").stdout
    assert "  iceberg/people: created" in planned, planned
    lake = tmp_path / "lake"
    assert not lake.exists(), "check --tables changes nothing (no catalog created)"
    run(sluice_bin, "run", "--config", config, "--once")
    assert not (lake / "tables" / "people").exists(), "format = iceberg writes no Delta table"
    before = iceberg_catalog(lake).load_table(("test", "people")).schema()
    assert "region" not in before.column_names

    policy.write_text(POLICY + '[columns.region]\naction = "keep"\ntype = "string"\n')
    planned = run(sluice_bin, "check", "--config", config, "--tables").stdout
    assert "  iceberg/people: adds region" in planned, planned
    people_events(events / "b.jsonl", range(20, 30), with_region=True)
    run(sluice_bin, "run", "--config", config, "--once")
    table = iceberg_catalog(lake).load_table(("test", "people"))
    after = table.schema()
    # The new column gets a new field id; the old ones keep theirs.
    assert after.find_field("region").field_id > max(f.field_id for f in before.fields)
    assert {f.name: f.field_id for f in before.fields} == {f.name: after.find_field(f.name).field_id for f in before.fields}
    rows = table.scan().to_arrow().to_pylist()
    assert len(rows) == 30
    assert sorted(r["region"] for r in rows if r["balance"] >= 200) == sorted(f"r{i % 3}" for i in range(20, 30))
    assert all(r["region"] is None for r in rows if r["balance"] < 200)

    # A column removed from the policy is refused, naming the table (rows are not silently lost).
    policy.write_text(POLICY.replace('[columns.balance]\naction = "keep"\ntype = "int64"\n', ""))
    people_events(events / "c.jsonl", range(30, 31), with_region=False)
    failed = run(sluice_bin, "run", "--config", config, "--once", check=False)
    assert failed.returncode != 0 and "iceberg table people exists with columns" in failed.stderr
    assert "the policy removes balance" in failed.stderr, failed.stderr


def test_forget_leaves_nothing_of_the_subject_in_iceberg_tables_or_their_history(sluice_bin, tmp_path):
    config = write_config(tmp_path, REPO / "fixtures" / "demo" / "events", [DEMO_POLICIES], lake_extra=BOTH)
    run(sluice_bin, "run", "--config", config, "--once")
    lake = tmp_path / "lake"
    catalog = iceberg_catalog(lake)
    payments = catalog.load_table(("test", "payments"))
    old_snapshot = payments.current_snapshot().snapshot_id
    before = payments.scan().to_arrow()
    old_files = [f["file_path"] for f in payments.inspect.files().to_pylist()]
    copy = tmp_path / "copy"
    shutil.copytree(lake / "iceberg", copy)

    receipt = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", "0", "--settle-ms", "0").stdout)
    token = receipt["subject_tokens"][0]
    assert receipt["verification"] == {"passed": True, "findings": []}
    assert token in before.column("_subject").to_pylist(), "the subject had payments"
    for target in DEMO_TARGETS.values():
        ice = receipt["tables"][f"iceberg/{target}"]
        delta = receipt["tables"][target]
        assert ice["rows_removed"] == delta["rows_removed"] > 0
        table = catalog.load_table(("test", target))
        rows = table.scan().to_arrow()
        assert token not in rows.column("_subject").to_pylist()
        assert same_rows(rows, read_delta(lake / "tables" / target)) == (0, 0)
        # One snapshot left, an overwrite: time travel has nothing older to offer.
        assert len(table.metadata.snapshots) == 1
        assert table.current_snapshot().summary.operation.value == "overwrite"
    payments = catalog.load_table(("test", "payments"))
    assert payments.metadata.snapshot_by_id(old_snapshot) is None
    # Files of the old snapshot that held the subject are gone from disk; the warehouse holds
    # no file naming the subject's token (Parquet decoded, Avro manifests and JSON as bytes).
    gone = [p for p in old_files if not (p.startswith("file://") and __import__("os").path.exists(p[7:]))]
    assert len(gone) == receipt["tables"]["iceberg/payments"]["files_removed"] > 0
    for path in (lake / "iceberg").rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            assert token not in pq.read_table(path).column("_subject").to_pylist(), path
        else:
            assert token.encode() not in path.read_bytes(), path
    # Positions survived the expiry: a rerun reads nothing twice.
    rerun = run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "rerun.json")
    assert rerun.returncode == 0
    summary = json.loads((tmp_path / "rerun.json").read_text())
    assert not summary["rows_written"]
    # Positive control: the copy taken before still names the token somewhere.
    assert any(token.encode() in p.read_bytes() or (p.suffix == ".parquet" and token in pq.read_table(p).column("_subject").to_pylist())
               for p in copy.rglob("*.parquet"))
