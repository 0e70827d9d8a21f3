"""Delta tables follow a policy's added columns as Iceberg tables do (older rows read null,
wherever the policy lists the column), refuse removed or retyped columns naming the table and
both schemas, and `sluice check --tables` says which before a run. Read back by Python
`deltalake` and DuckDB."""

import deltalake
import duckdb

from conftest import TEST_POLICIES, people_events, people_pipeline, read_delta, run

POLICY = (TEST_POLICIES / "people-balance.toml").read_text()
REGION = '[columns.region]\naction = "keep"\ntype = "string"\n'


def check_tables(sluice_bin, config):
    return run(sluice_bin, "check", "--config", config, "--tables", check=False)


def test_a_policy_that_adds_a_column_evolves_the_delta_table_and_check_says_so_first(sluice_bin, tmp_path):
    policy, events, config = people_pipeline(tmp_path)
    planned = check_tables(sluice_bin, config)
    assert planned.returncode == 0 and "  people: created" in planned.stdout, planned.stdout
    run(sluice_bin, "run", "--config", config, "--once")
    path = tmp_path / "lake" / "tables" / "people"
    before = deltalake.DeltaTable(str(path)).schema().to_arrow().names
    assert "region" not in before

    # The policy lists the new column among its own, before the metadata columns.
    policy.write_text(POLICY + REGION)
    planned = check_tables(sluice_bin, config)
    assert planned.returncode == 0, planned.stdout
    assert "  people: adds region" in planned.stdout and "  vault: unchanged" in planned.stdout, planned.stdout
    people_events(events / "b.jsonl", range(20, 30), with_region=True)
    run(sluice_bin, "run", "--config", config, "--once")
    table = deltalake.DeltaTable(str(path))
    after = table.schema().to_arrow().names
    assert after == before + ["region"], "appended to the table, the existing columns kept in place"
    rows = read_delta(path).to_pylist()
    assert len(rows) == 30
    assert sorted(r["region"] for r in rows if r["balance"] >= 200) == sorted(f"r{i % 3}" for i in range(20, 30))
    assert all(r["region"] is None for r in rows if r["balance"] < 200)
    # DuckDB over the same table: the old rows' region is null there too.
    people = read_delta(path)
    assert duckdb.sql("select count(*) from people where region is null").fetchall() == [(20,)]
    # Compaction merges files written before and after the column was added: same rows.
    before_compaction = sorted(rows, key=lambda r: r["balance"])
    run(sluice_bin, "compact", "--config", config)
    assert deltalake.DeltaTable(str(path)).version() > table.version(), "the table was compacted"
    assert sorted(read_delta(path).to_pylist(), key=lambda r: r["balance"]) == before_compaction
    assert check_tables(sluice_bin, config).stdout.count("  people: unchanged") == 1
    version = deltalake.DeltaTable(str(path)).version()

    # Retyped, then removed: refused before anything is written, naming the table and both
    # schemas; `check --tables` says so and exits 1.
    for change, said in (
        (POLICY.replace('type = "int64"', 'type = "string"') + REGION, "the policy retypes balance: long → string"),
        (POLICY.replace('[columns.balance]\naction = "keep"\ntype = "int64"\n', "") + REGION, "the policy removes balance"),
    ):
        policy.write_text(change)
        planned = check_tables(sluice_bin, config)
        assert planned.returncode == 1 and f"  people: REFUSED: {said}" in planned.stdout, planned.stdout
        people_events(events / "c.jsonl", range(30, 31), with_region=True)
        failed = run(sluice_bin, "run", "--config", config, "--once", check=False)
        assert failed.returncode != 0
        assert "table people exists with columns [id_token:string, balance:long" in failed.stderr, failed.stderr
        assert "but the policy now writes [id_token:string, " in failed.stderr and said in failed.stderr, failed.stderr
        assert deltalake.DeltaTable(str(path)).version() == version, "the table is left as it was"
