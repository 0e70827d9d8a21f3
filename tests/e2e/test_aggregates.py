"""Hourly pre-aggregations with k-anonymity, checked against DuckDB GROUP BYs over the base
table (read by Python deltalake / pyiceberg, not by sluice): equal for every hour except the
suppressed groups, no published group under k distinct subjects, late events recompute their
hour, an erasure recomputes the subjects' hours."""

import json

import duckdb

from conftest import DEMO_POLICIES, read_delta, read_iceberg, run, write_config
from lakes import iceberg_lake, weed  # noqa: F401 (fixtures)

K = 5
AGGREGATES = f"""
[[aggregates]]
name = "payments_by_channel_hour"
from = "payments"
dimensions = ["channel"]
measures = [{{fn="count"}}, {{fn="count_distinct_subjects"}}, {{fn="sum", column="amount_pence"}}, {{fn="avg", column="amount_pence"}}]
k_anonymity = {K}

[[aggregates]]
name = "payments_by_channel_card_hour"
from = "payments"
dimensions = ["channel", "paid_by_card"]
measures = [{{fn="count", as="payments"}}, {{fn="sum", column="amount_pence", as="total_pence"}}]
k_anonymity = {K}
on_suppressed = "merge"
"""

GROUPS = """
select date_trunc('hour', _source_ts) as hour, {dims}, count(*) as n, count(distinct _subject) as subjects,
       sum(amount_pence) as total, avg(amount_pence) as mean
from base where _op in ('c', 'r') group by all
"""


def connect(base):
    con = duckdb.connect()
    con.sql("set TimeZone = 'UTC'")
    con.register("base", base)
    return con


def groups(base, dims):
    con = connect(base)
    return con.sql(GROUPS.format(dims=", ".join(dims))).to_arrow_table().to_pylist()


def key(row, dims):
    return (row["hour"].isoformat(),) + tuple(row[d] for d in dims)


def check_against_duckdb(lake, reader, base=None):
    base = base if base is not None else read_delta(lake / "tables" / "payments")
    # By channel, suppressed groups dropped.
    expected = groups(base, ["channel"])
    published = {key(g, ["channel"]): g for g in expected if g["subjects"] >= K}
    suppressed = [g for g in expected if g["subjects"] < K]
    assert published and suppressed, "the data must exercise both sides of k"
    got = {key(r, ["channel"]): r for r in reader("payments_by_channel_hour").to_pylist()}
    assert got.keys() == published.keys()
    for k_, row in got.items():
        want = published[k_]
        assert (row["count"], row["distinct_subjects"], row["sum_amount_pence"]) == (want["n"], want["subjects"], want["total"])
        assert abs(row["avg_amount_pence"] - want["mean"]) < 1e-6
        assert row["distinct_subjects"] >= K
    per_hour = {}
    for g in suppressed:
        per_hour[g["hour"].isoformat()] = per_hour.get(g["hour"].isoformat(), 0) + 1
    counted = {r["hour"].isoformat(): r["groups_suppressed"] for r in reader("payments_by_channel_hour_suppressions").to_pylist()}
    assert {h: n for h, n in counted.items() if n} == per_hour

    # By channel and card, the small groups of an hour merged into one (dimensions null) when
    # together they cover k; checked independently on the subjects of the merged groups.
    dims = ["channel", "paid_by_card"]
    expected = groups(base, dims)
    published = {key(g, dims): g for g in expected if g["subjects"] >= K}
    got = reader("payments_by_channel_card_hour").to_pylist()
    plain = {key(r, dims): r for r in got if r["channel"] is not None}
    assert plain.keys() == published.keys()
    assert all(r["payments"] == published[k_]["n"] and r["total_pence"] == published[k_]["total"] for k_, r in plain.items())
    # Independently: the facts of each hour's small groups, pooled, in one DuckDB query.
    merged_expected = {
        hour.isoformat(): (n, subjects)
        for hour, n, subjects in connect(base).sql(f"""
            with g as ({GROUPS.format(dims=", ".join(dims))}), small as (select * from g where subjects < {K})
            select small.hour, count(*), count(distinct b._subject)
            from base b join small on date_trunc('hour', b._source_ts) = small.hour
                 and b.channel is not distinct from small.channel and b.paid_by_card is not distinct from small.paid_by_card
            where b._op in ('c', 'r') group by small.hour""").fetchall()
        if subjects >= K
    }
    merged = {r["hour"].isoformat(): r["payments"] for r in got if r["channel"] is None}
    assert merged, "some hour must have merged small groups"
    assert merged == {h: n for h, (n, _) in merged_expected.items()}


def test_hourly_aggregates_match_duckdb_respect_k_and_follow_late_events_and_erasure(sluice_bin, tmp_path):
    events = tmp_path / "events"
    # Ten days: busy enough hours that groups fall on both sides of k.
    run(sluice_bin, "generate", "--events", 16000, "--seed", 11, "--span-hours", 240, "--out", events / "part-0.jsonl")
    config = write_config(tmp_path, events, [DEMO_POLICIES], lake_extra='format = "both"', extra=AGGREGATES)
    check = run(sluice_bin, "check", "--config", config)
    assert "payments_by_channel_hour" in check.stdout
    # `run --once` computes the hours that are due at its end (all: the events are from 2024).
    run(sluice_bin, "run", "--config", config, "--once")
    lake = tmp_path / "lake"
    delta = lambda name: read_delta(lake / "aggregates" / name)
    iceberg = lambda name: read_iceberg(lake, name)
    check_against_duckdb(lake, delta)
    check_against_duckdb(lake, iceberg)

    # Nothing new: nothing due.
    again = json.loads(run(sluice_bin, "aggregate", "--config", config).stdout)
    assert [r["hours"] for r in again] == [[], []]

    # A late payment for an hour long closed: that hour alone is recomputed.
    payment = json.loads(next(l for l in (events / "part-0.jsonl").read_text().splitlines() if '"table":"payments"' in l))
    payment["after"]["id"] = 10_000_000
    (events / "part-1-late.jsonl").write_text(json.dumps(payment) + "\n")
    run(sluice_bin, "run", "--config", config, "--once")
    late = json.loads(run(sluice_bin, "aggregate", "--config", config).stdout)
    assert [r["hours"] for r in late] == [[], []], "run --once already recomputed the late hour"
    check_against_duckdb(lake, delta)
    check_against_duckdb(lake, iceberg)

    # Backfill: the same numbers again (idempotent replace of the hours).
    before = sorted(map(str, delta("payments_by_channel_hour").to_pylist()))
    run(sluice_bin, "aggregate", "--config", config, "--from", "2024-01-01T00:00:00Z", "--to", "2024-03-01T00:00:00Z")
    assert sorted(map(str, delta("payments_by_channel_hour").to_pylist())) == before

    # An erasure recomputes the subject's hours: the aggregates still equal the base table.
    receipt = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", "3", "--settle-ms", "0").stdout)
    assert receipt["verification"]["passed"], receipt
    assert any(h.startswith("aggregates:") and "hours recomputed" in h for h in receipt["hooks"]), receipt["hooks"]
    check_against_duckdb(lake, delta)
    check_against_duckdb(lake, iceberg)


def test_aggregates_of_an_iceberg_only_lake_read_the_iceberg_table(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    events = tmp_path / "events"
    run(sluice_bin, "generate", "--events", 5000, "--seed", 12, "--span-hours", 48, "--out", events / "part-0.jsonl")
    config = write_config(tmp_path, events, [DEMO_POLICIES], lake=lake.root, lake_extra=lake.config("iceberg"),
                          extra=AGGREGATES)
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    assert not lake.delta_exists("payments_by_channel_hour", under="aggregates"), "no Delta table in an Iceberg-only lake"
    check_against_duckdb(None, lake.iceberg, base=lake.iceberg("payments"))


def test_check_refuses_a_dimension_that_links_rows_to_a_person(sluice_bin, tmp_path):
    config = write_config(tmp_path, tmp_path, [DEMO_POLICIES], extra="""
[[aggregates]]
name = "by_account"
from = "payments"
dimensions = ["channel", "payment_token"]
measures = [{fn="count"}]
""")
    failed = run(sluice_bin, "check", "--config", config, check=False)
    assert failed.returncode != 0
    assert "aggregates.dimensions: `payment_token` is tokenize" in failed.stderr, failed.stderr
    assert "sluice.toml:" in failed.stderr
