"""Apache Iceberg tables beside or instead of Delta, on each place an Iceberg lake lives (a local
directory, S3 with the SQL catalog, a real REST catalog on its S3 store: see lakes.py), read by
pyiceberg, pyarrow and DuckDB (none of them written here): identical rows, exactly once across
kill -9 around Iceberg commits and during an erasure, schema evolution, erasure with no history
left in any object the warehouse holds."""

import collections
import io
import json
import signal

import duckdb
import pyarrow.parquet as pq

from conftest import (DEMO_POLICIES, DEMO_TARGETS, REPO, TEST_POLICIES, people_events, people_pipeline, run,
                      run_until_killed, source_events, write_config)
from lakes import iceberg_lake, weed  # noqa: F401 (fixtures)


def same_rows(a, b):
    """Rows of `a` not in `b` and of `b` not in `a`, as multisets, on `b`'s columns (DuckDB)."""
    con = duckdb.connect()
    con.register("a", a)
    con.register("b", b)
    cols = ", ".join(f'"{c}"' for c in b.schema.names)
    only_a = con.sql(f"select count(*) from (select {cols} from a except all select {cols} from b)").fetchall()[0][0]
    only_b = con.sql(f"select count(*) from (select {cols} from b except all select {cols} from a)").fetchall()[0][0]
    return only_a, only_b


def holds_token(lake, url, data, token):
    """Whether a warehouse object names `token`: a Parquet file's `_subject` column, anything
    else as bytes (Avro manifests, JSON metadata)."""
    if url.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        return "_subject" in table.column_names and token in table.column("_subject").to_pylist()
    return token.encode() in data


def test_demo_events_land_identically_in_delta_and_iceberg(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    config = write_config(tmp_path, REPO / "fixtures" / "demo" / "events", [DEMO_POLICIES], lake=lake.root,
                          lake_extra=lake.config("both"))
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "summary.json", env=lake.env)
    catalog = lake.catalog()
    assert sorted(t for _, t in catalog.list_tables(lake.namespace)) == sorted(DEMO_TARGETS.values())
    for target in DEMO_TARGETS.values():
        table = catalog.load_table((lake.namespace, target))
        iceberg_rows = table.scan().to_arrow()
        delta_rows = lake.delta(target)
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
            assert row["file_path"].startswith("file://" if lake.kind == "local" else "s3://"), row["file_path"]
    # DuckDB over the Iceberg rows as a dashboard would ask.
    payments = lake.iceberg("payments")
    per_day = duckdb.sql("select _date, count(*) n from payments group by 1 order by 1").fetchall()
    assert sum(n for _, n in per_day) == payments.num_rows and len(per_day) > 1

    # A second run reads nothing twice.
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "again.json", env=lake.env)
    again = json.loads((tmp_path / "again.json").read_text())
    assert not again["rows_written"]
    for target in DEMO_TARGETS.values():
        assert lake.iceberg(target).num_rows == lake.delta(target).num_rows


def test_kill_9_around_iceberg_commits_then_finish_exactly_once(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    events = tmp_path / "events"
    for i in range(3):
        run(sluice_bin, "generate", "--events", 2500, "--seed", 300 + i, "--out", events / f"part-{i}.jsonl")
    config = write_config(
        tmp_path, events, [DEMO_POLICIES], lake=lake.root, lake_extra=lake.config("both"),
        extra="[batch]\nmax_rows = 600\n\n[workers]\nthreads = 2\nchunk_events = 150\n",
    )
    # Files written but the catalog not yet pointing at them; committed but not yet known to
    # the run; and kills between the tables' commits of one flush (ten sinks commit per flush).
    run_until_killed(sluice_bin, config, failpoint="iceberg-before-commit:payments", env=lake.env)
    run_until_killed(sluice_bin, config, kill_after_commits=7, env=lake.env)
    run_until_killed(sluice_bin, config, failpoint="iceberg-after-commit:customers", env=lake.env)
    run_until_killed(sluice_bin, config, kill_after_commits=13, env=lake.env)
    run_until_killed(sluice_bin, config, failpoint="iceberg-after-commit:payments", env=lake.env)
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)

    source = [e for e in source_events(events) if e.get("table") in DEMO_TARGETS]
    assert len(source) > 6000
    for table, target in DEMO_TARGETS.items():
        expected = {e["position"] for e in source if e["table"] == table}
        for fmt, got in (("delta", lake.delta(target)), ("iceberg", lake.iceberg(target))):
            positions = got.column("_position").to_pylist()
            twice = [p for p, n in collections.Counter(positions).items() if n > 1]
            assert not twice, f"{fmt} {target}: {len(twice)} events written twice"
            assert set(positions) == expected, f"{fmt} {target}: {len(expected - set(positions))} events lost"


POLICY = (TEST_POLICIES / "people-balance.toml").read_text()


def test_a_policy_that_adds_a_column_evolves_the_iceberg_table(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    policy, events, config = people_pipeline(tmp_path, lake_extra=lake.config("iceberg"), lake=lake.root)
    planned = run(sluice_bin, "check", "--config", config, "--tables", env=lake.env).stdout
    assert "  iceberg/people: created" in planned, planned
    assert not lake.iceberg_files(), "check --tables changes nothing"
    if lake.kind != "rest":
        assert not (tmp_path / "lake").exists() and not (tmp_path / "iceberg-catalog.db").exists(), "no catalog created"
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    assert not lake.delta_exists("people"), "format = iceberg writes no Delta table"
    before = lake.table("people").schema()
    assert "region" not in before.column_names

    policy.write_text(POLICY + '[columns.region]\naction = "keep"\ntype = "string"\n')
    planned = run(sluice_bin, "check", "--config", config, "--tables", env=lake.env).stdout
    assert "  iceberg/people: adds region" in planned, planned
    people_events(events / "b.jsonl", range(20, 30), with_region=True)
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    table = lake.table("people")
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
    failed = run(sluice_bin, "run", "--config", config, "--once", check=False, env=lake.env)
    assert failed.returncode != 0 and "iceberg table people exists with columns" in failed.stderr
    assert "the policy removes balance" in failed.stderr, failed.stderr


def test_forget_leaves_nothing_of_the_subject_in_iceberg_tables_or_their_history(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    config = write_config(tmp_path, REPO / "fixtures" / "demo" / "events", [DEMO_POLICIES], lake=lake.root,
                          lake_extra=lake.config("both"))
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    catalog = lake.catalog()
    payments = catalog.load_table((lake.namespace, "payments"))
    old_snapshot = payments.current_snapshot().snapshot_id
    before = payments.scan().to_arrow()
    old_files = [f["file_path"] for f in payments.inspect.files().to_pylist()]
    copy = {url: lake.read(url) for url in lake.iceberg_files()}

    # Killed right after an Iceberg erasure commit, before its older snapshots are expired
    # (they still reference the files holding the subject): a rerun of the same job completes it.
    forget = ["forget", "--config", config, "--subject", "0", "--settle-ms", "0", "--request-id", "RTBF-1"]
    killed = run(sluice_bin, *forget, check=False, env=dict(lake.env, SLUICE_FAILPOINT="iceberg-before-expire:payments"))
    assert killed.returncode == -signal.SIGABRT, killed.stderr[-2000:]
    interrupted = catalog.load_table((lake.namespace, "payments"))
    assert len(interrupted.metadata.snapshots) > 1, "killed between the erasure commit and the expiry"
    receipt = json.loads(run(sluice_bin, *forget, env=lake.env).stdout)
    token = receipt["subject_tokens"][0]
    assert receipt["verification"] == {"passed": True, "findings": []}
    assert token in before.column("_subject").to_pylist(), "the subject had payments"
    for target in DEMO_TARGETS.values():
        ice = receipt["tables"][f"iceberg/{target}"]
        delta = receipt["tables"][target]
        assert ice["rows_removed"] == delta["rows_removed"] > 0, target
        table = catalog.load_table((lake.namespace, target))
        rows = table.scan().to_arrow()
        assert token not in rows.column("_subject").to_pylist()
        assert same_rows(rows, lake.delta(target)) == (0, 0)
        # One snapshot left, an overwrite: time travel has nothing older to offer.
        assert len(table.metadata.snapshots) == 1
        assert table.current_snapshot().summary.operation.value == "overwrite"
    payments = catalog.load_table((lake.namespace, "payments"))
    assert payments.metadata.snapshot_by_id(old_snapshot) is None
    # Every object the warehouse holds (data, manifests, metadata, in the bucket or on disk) is
    # read: none names the subject's token.
    now = lake.iceberg_files()
    assert now, "the warehouse is listed"
    gone = [p for p in old_files if p not in set(now)]
    assert len(gone) == receipt["tables"]["iceberg/payments"]["files_removed"] > 0
    for url in now:
        assert not holds_token(lake, url, lake.read(url), token), url
    # Positions survived the expiry: a rerun reads nothing twice.
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "rerun.json", env=lake.env)
    summary = json.loads((tmp_path / "rerun.json").read_text())
    assert not summary["rows_written"]
    # Positive control: the copy taken before names the token somewhere.
    assert any(holds_token(lake, url, data, token) for url, data in copy.items() if url.endswith(".parquet"))
