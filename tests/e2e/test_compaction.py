"""Compaction (`sluice compact`): fewer files, identical content (read by Python deltalake and
pyiceberg, compared by DuckDB), positions kept; an erasure after it leaves no file of the
subject behind, the compaction's replaced files included."""

import io
import json

import duckdb
import pyarrow.parquet as pq

from conftest import DEMO_POLICIES, DEMO_TARGETS, run, write_config
from lakes import iceberg_lake, weed  # noqa: F401 (fixtures)


def content(table):
    """The table's rows as a sorted list of tuples (DuckDB renders every type)."""
    con = duckdb.connect()
    con.register("t", table)
    cols = ", ".join(f'"{c}"' for c in sorted(table.schema.names))
    return sorted(con.sql(f"select {cols} from t").fetchall(), key=repr)


def test_compaction_reduces_files_and_keeps_content_and_positions(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    events = tmp_path / "events"
    # Two days, many small commits: several small files per day partition.
    run(sluice_bin, "generate", "--events", 4000, "--seed", 21, "--span-hours", 48, "--out", events / "part-0.jsonl")
    config = write_config(
        tmp_path, events, [DEMO_POLICIES], lake=lake.root, lake_extra=lake.config("both"),
        extra="[batch]\nmax_rows = 400\n\n[workers]\nthreads = 2\nchunk_events = 100\n",
    )
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    catalog = lake.catalog()

    def delta_files(target):
        return lake.delta_table(target).file_uris()

    before = {}
    for target in DEMO_TARGETS.values():
        ice = catalog.load_table((lake.namespace, target))
        before[target] = (
            len(delta_files(target)), content(lake.delta(target)),
            len(ice.inspect.files()), content(ice.scan().to_arrow()),
        )

    report = json.loads(run(sluice_bin, "compact", "--config", config, env=lake.env).stdout)
    compacted = {(r["table"], r["format"]): r["result"] for r in report}
    for target in DEMO_TARGETS.values():
        delta_before, delta_rows, ice_before, ice_rows = before[target]
        ice = catalog.load_table((lake.namespace, target))
        delta_after, ice_after = len(delta_files(target)), len(ice.inspect.files())
        assert delta_after < delta_before and ice_after < ice_before, (target, delta_before, delta_after, ice_before, ice_after)
        assert compacted[(target, "delta")]["files_removed"] > 0 and compacted[(target, "iceberg")]["files_removed"] > 0
        assert content(lake.delta(target)) == delta_rows
        assert content(ice.scan().to_arrow()) == ice_rows == delta_rows
        assert ice.current_snapshot().summary.operation.value == "replace"
        # Older snapshots kept (time travel), positions carried into the new one.
        assert len(ice.metadata.snapshots) > 1
        assert any(k.startswith("sluice.position.") for k in ice.current_snapshot().summary.additional_properties)

    # A rerun reads nothing twice; compacting again finds little or nothing to do.
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "again.json", env=lake.env)
    assert not json.loads((tmp_path / "again.json").read_text())["rows_written"]

    # An erasure after the compaction: the replaced small files that held the subject (Delta's
    # and Iceberg's history) are deleted too, and the verification passes.
    receipt = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", "1", "--settle-ms", "0",
                             env=lake.env).stdout)
    assert receipt["verification"] == {"passed": True, "findings": []}, receipt["verification"]
    token = receipt["subject_tokens"][0]
    parquet = [url for url in lake.all_files() if url.endswith(".parquet")]
    assert any("/tables/" in url for url in parquet) and any(url in lake.iceberg_files() for url in parquet)
    for url in parquet:
        table = pq.read_table(io.BytesIO(lake.read(url)))
        if "_subject" in table.column_names:
            assert token not in table.column("_subject").to_pylist(), url
