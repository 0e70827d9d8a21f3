#!/usr/bin/env bash
# Benchmark (not a test): a retention run on a table of ROWS rows over the last 365 days,
# partitioned by date (10 appends: 3,650 files), 100,000 subjects, on the release build:
# `sluice retain` with retention_days = 180 (removes the older half, files and history) against
# a plain-Python reference doing the same to a copy with the `deltalake` package (DELETE by
# time, then VACUUM with no retention and a checkpoint). Reports wall and CPU seconds, peak RSS,
# and the ratio of the two wall times (this machine's speed varies between sessions).
# Usage: pipeline/bench/retain.sh [ROWS] [SUBJECTS]   (after tests/run.sh has made .venv;
# needs GNU time at /usr/bin/time)
set -euo pipefail
cd "$(dirname "$0")/../.."
. pipeline/bench/lib.sh
rows=${1:-10000000}
subjects=${2:-100000}
out=${BENCH_DIR:-target/bench-retain}
cargo build --release --locked -p sluice
bin=$PWD/target/release/sluice
rm -rf "$out" && mkdir -p "$out/policies" "$out/events"
payments_policy "$out/policies/big.toml" big channel
sed -i 's/^token_domain = "customer"$/token_domain = "customer"\nretention_days = 180/' "$out/policies/big.toml"
file_pipeline_config "$out" policies
.venv/bin/python - "$bin" "$out" "$rows" "$subjects" <<'PY'
import datetime, json, os, random, shutil, subprocess, sys, time
import deltalake, pyarrow as pa

bin_path, out, rows, subjects = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(1)
appends, days = 10, 365
per = rows // appends
today = datetime.datetime.now(datetime.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
tokens = [f"{i:032x}" for i in range(subjects)]
t0 = time.monotonic()
for a in range(appends):
    ids = [rng.randrange(subjects) for _ in range(per)]
    day = [rng.randrange(days) for _ in range(per)]
    subject = pa.DictionaryArray.from_arrays(pa.array(ids, pa.int32()), pa.array(tokens)).cast(pa.string())
    ts = pa.array([today - datetime.timedelta(days=d, hours=1) for d in day], pa.timestamp("us", "UTC"))
    table = pa.table({
        "customer_id_token": subject,
        "amount_pence": pa.array([rng.randrange(100, 100000) for _ in range(per)], pa.int64()),
        "channel": pa.DictionaryArray.from_arrays(pa.array([i % 3 for i in range(per)], pa.int32()), pa.array(["card", "bank", "cash"])).cast(pa.string()),
        "_op": pa.array(["c"] * per),
        "_subject": subject,
        "_source_ts": ts,
        "_position": pa.array([f"kafka/payments/0:{a * per + i}" for i in range(per)]),
        "_ingested_at": ts,
        "_date": pa.array([(today - datetime.timedelta(days=d, hours=1)).date() for d in day], pa.date32()),
        "_source_db": pa.array([None] * per, pa.string()),
    })
    deltalake.write_deltalake(f"{out}/lake/tables/big", table, partition_by=["_date"], mode="append",
                              configuration={"delta.dataSkippingStatsColumns": "_op,_ingested_at,_source_db"})
    print(f"append {a + 1}/{appends} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
del table, ids, day, subject, ts
shutil.copytree(f"{out}/lake/tables/big", f"{out}/reference")
dt = deltalake.DeltaTable(f"{out}/lake/tables/big")
files = len(dt.file_uris())
print(f"table       {rows:,} rows, {files:,} files, partitioned by _date ({days} days), {subjects:,} subjects")

def timed(label, argv):
    # GNU time: the job's own wall, CPU (user + system) seconds and peak RSS.
    t = time.monotonic()
    res = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", f"{out}/time.txt", *argv],
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{label} failed: {res.stderr[-2000:]}")
    wall, user, system, rss = open(f"{out}/time.txt").read().split()[-4:]
    return res, float(wall), float(user) + float(system), int(rss) / 1024

cutoff = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=180)).isoformat()
reference = f"""
import deltalake, sys
dt = deltalake.DeltaTable(sys.argv[1])
metrics = dt.delete("_source_ts < '{cutoff}'")
dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
dt.create_checkpoint()
dt.cleanup_metadata()
print(metrics["num_deleted_rows"])
"""
res, ref_wall, ref_cpu, ref_rss = timed("reference", [".venv/bin/python", "-c", reference, f"{out}/reference"])
ref_rows = int(res.stdout.split()[-1])
res, wall, cpu, rss = timed("sluice retain", [bin_path, "retain", "--config", f"{out}/sluice.toml"])
report = json.loads(res.stdout)
big = report["tables"]["big"]
after = deltalake.DeltaTable(f"{out}/lake/tables/big")
left = after.to_pyarrow_table(columns=["_source_ts"]).num_rows
print(f"reference   {ref_wall:6.1f} s wall, {ref_cpu:6.1f} CPU-s, peak RSS {ref_rss:5.0f} MiB, {ref_rows:,} rows deleted (deltalake delete + vacuum 0 h + checkpoint)")
print(f"sluice      {wall:6.1f} s wall, {cpu:6.1f} CPU-s, peak RSS {rss:5.0f} MiB, {big['rows_removed']:,} rows removed, "
      f"{big['files_removed']:,} of {big['files_scanned']:,} files, {big['log_files_removed']:,} log files and "
      f"{big['history_files_removed']:,} history files removed; {left:,} rows left")
print(f"ratio       sluice / reference wall time = {wall / ref_wall:.2f}")
sys.stdout.flush()
os._exit(0)  # past the interpreter's teardown, which aborts in a native library here
PY
