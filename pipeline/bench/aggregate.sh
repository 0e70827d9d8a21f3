#!/usr/bin/env bash
# Benchmark (not a test): the hourly aggregation of one hour holding ROWS payments (default
# 1,000,000; 100,000 subjects, 12 regions x 4 channels), on the release build, then a typical
# dashboard query (amount and payments per region and channel, by hour) in DuckDB on the
# aggregate table and on the base table. Reports the aggregation's wall time and peak RSS and
# both queries' median latency.
# Usage: pipeline/bench/aggregate.sh [ROWS]   (after tests/run.sh has made .venv; needs GNU time
# at /usr/bin/time)
set -euo pipefail
cd "$(dirname "$0")/../.."
. pipeline/bench/lib.sh
rows=${1:-1000000}
out=${BENCH_DIR:-target/bench-aggregate}
cargo build --release --locked -p sluice
bin=$PWD/target/release/sluice
rm -rf "$out" && mkdir -p "$out/policies" "$out/events"
payments_policy "$out/policies/payments.toml" payments channel region
file_pipeline_config "$out" policies
cat >> "$out/sluice.toml" <<TOML

[[aggregates]]
name = "payments_by_region_hour"
from = "payments"
dimensions = ["region", "channel"]
measures = [{fn="count"}, {fn="count_distinct_subjects"}, {fn="sum", column="amount_pence"}, {fn="avg", column="amount_pence"}]
k_anonymity = 11
TOML
# The base table as sluice writes it, written directly (generating and sanitizing a million
# events is the file benchmark's business): one hour, 2024-01-01 10:00-11:00 UTC.
.venv/bin/python - "$out/lake/tables/payments" "$rows" <<'PY'
import sys, datetime, random, pyarrow as pa, deltalake
path, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
start = datetime.datetime(2024, 1, 1, 10, tzinfo=datetime.timezone.utc)
base_us = int(start.timestamp() * 1_000_000)
ts = pa.array(sorted(base_us + rng.randrange(3_600_000_000) for _ in range(n)), pa.int64()).cast(pa.timestamp("us", "UTC"))
subjects = [f"{rng.randrange(100_000):032x}" for _ in range(n)]
channels = ["card", "bank_transfer", "direct_debit", "cash"]
regions = [f"R{i:02}" for i in range(12)]
table = pa.table({
    "customer_id_token": pa.array(subjects),
    "amount_pence": pa.array([rng.randrange(100, 100_000) for _ in range(n)], pa.int64()),
    "channel": pa.array([rng.choice(channels) for _ in range(n)]),
    "region": pa.array([rng.choice(regions) for _ in range(n)]),
    "_op": pa.array(["c"] * n),
    "_subject": pa.array(subjects),
    "_source_ts": ts,
    "_position": pa.array([f"bench.jsonl:{i}" for i in range(n)]),
    "_ingested_at": ts,
    "_date": pa.array([start.date()] * n, pa.date32()),
})
deltalake.write_deltalake(path, table, partition_by=["_date"])
PY
/usr/bin/time -f "aggregation: %e s wall, %M KiB peak RSS" "$bin" aggregate --config "$out/sluice.toml" \
  --from 2024-01-01T10:00:00Z --to 2024-01-01T11:00:00Z > "$out/report.json"
.venv/bin/python - "$out" <<'PY'
import sys, time, statistics, duckdb, deltalake
out = sys.argv[1]
con = duckdb.connect()
con.sql("set TimeZone = 'UTC'")
base = deltalake.DeltaTable(f"{out}/lake/tables/payments").to_pyarrow_dataset()
agg = deltalake.DeltaTable(f"{out}/lake/aggregates/payments_by_region_hour").to_pyarrow_dataset()
con.register("base", base)
con.register("agg", agg)
queries = {
    "aggregate table": "select hour, region, channel, sum_amount_pence, count from agg where hour >= '2024-01-01' and hour < '2024-01-02' order by 1, 2, 3",
    "base table": "select date_trunc('hour', _source_ts) as hour, region, channel, sum(amount_pence), count(*) from base where _op in ('c','r') and _source_ts >= '2024-01-01' and _source_ts < '2024-01-02' group by all having count(distinct _subject) >= 11 order by 1, 2, 3",
}
results = {}
for name, q in queries.items():
    times = []
    for _ in range(5):
        t = time.perf_counter()
        rows = con.sql(q).fetchall()
        times.append(time.perf_counter() - t)
    results[name] = rows
    print(f"dashboard query on the {name}: median {statistics.median(times) * 1000:.1f} ms over 5 runs ({len(rows)} rows)")
assert [r[:4] for r in results["aggregate table"]] == [r[:4] for r in results["base table"]], "aggregate differs from the base table"
print("aggregate rows equal the base table's GROUP BY")
PY
