#!/usr/bin/env bash
# Benchmark (not a test): right-to-be-forgotten jobs on a 10-million-row table partitioned by
# date (365 days, 10 appends: 3,650 files), on the release build: erase 1 subject, then a batch
# of 1,000. Reports wall time, files and bytes rewritten, peak RSS.
# Usage: pipeline/bench/forget.sh [ROWS] [SUBJECTS]   (after tests/run.sh has made .venv;
# needs GNU time at /usr/bin/time)
set -euo pipefail
cd "$(dirname "$0")/../.."
. pipeline/bench/lib.sh
rows=${1:-10000000}
subjects=${2:-100000}
out=${BENCH_DIR:-target/bench-forget}
cargo build --release --locked -p sluice
bin=$PWD/target/release/sluice
rm -rf "$out" && mkdir -p "$out/policies" "$out/events"
payments_policy "$out/policies/big.toml" big channel
file_pipeline_config "$out" policies
# Creates the key store and its token key (nothing to erase yet).
"$bin" forget --config "$out/sluice.toml" --subject 0 --dry-run >/dev/null 2>&1
.venv/bin/python - "$bin" "$out" "$rows" "$subjects" "$PWD/fixtures/keys/TEST-ONLY-master.key" <<'PY'
import datetime, hmac, hashlib, json, random, sqlite3, struct, subprocess, sys, time
import deltalake, pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

bin_path, out, rows, subjects, master_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
# The token key, unwrapped as sluice does, so the rows carry the tokens sluice would compute.
db = sqlite3.connect(f"{out}/keys/keystore.db")
key_id, wrapped = db.execute("SELECT k.id, k.wrapped FROM system_keys s JOIN keys k ON k.id = s.key_id WHERE s.name = 'token'").fetchone()
token_key = AESGCM(bytes.fromhex(open(master_file).read().strip())).decrypt(wrapped[17:29], wrapped[29:], b"sluice:keywrap:v1\0" + key_id)
prefix = struct.pack(">Q", len("customer")) + b"customer"
tokens = [hmac.new(token_key, prefix + str(i).encode(), hashlib.sha256).digest()[:16].hex() for i in range(subjects)]

t0 = time.monotonic()
rng = random.Random(1)
appends, days = 10, 365
per = rows // appends
start = datetime.date(2025, 1, 1)
for a in range(appends):
    ids = [rng.randrange(subjects) for _ in range(per)]
    day = [rng.randrange(days) for _ in range(per)]
    subject = pa.DictionaryArray.from_arrays(pa.array(ids, pa.int32()), pa.array(tokens)).cast(pa.string())
    ts = pa.array([(datetime.datetime(2025, 1, 1) + datetime.timedelta(days=d)).replace(tzinfo=datetime.timezone.utc) for d in day], pa.timestamp("us", "UTC"))
    table = pa.table({
        "customer_id_token": subject,
        "amount_pence": pa.array([rng.randrange(100, 100000) for _ in range(per)], pa.int64()),
        "channel": pa.DictionaryArray.from_arrays(pa.array([i % 3 for i in range(per)], pa.int32()), pa.array(["card", "bank", "cash"])).cast(pa.string()),
        "_op": pa.array(["c"] * per),
        "_subject": subject,
        "_source_ts": ts,
        "_position": pa.array([f"kafka/payments/0:{a * per + i}" for i in range(per)]),
        "_ingested_at": ts,
        "_date": pa.array([start + datetime.timedelta(days=d) for d in day], pa.date32()),
    })
    # As sluice creates its tables: statistics only on columns that link no row to a person.
    deltalake.write_deltalake(f"{out}/lake/tables/big", table, partition_by=["_date"], mode="append",
                              configuration={"delta.dataSkippingStatsColumns": "amount_pence,channel,_op,_source_ts,_ingested_at"})
    print(f"append {a + 1}/{appends} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
dt = deltalake.DeltaTable(f"{out}/lake/tables/big")
files = len(dt.file_uris())
size = sum(pa.table(dt.get_add_actions(flatten=True)).column("size_bytes").to_pylist())
print(f"table       {rows:,} rows, {files:,} files, {size / 1e6:,.0f} MB, partitioned by _date ({days} days)")

del table, ids, day, subject, ts

def job(label, args):
    # GNU time reports the job's own peak RSS (a child's ru_maxrss would include this
    # process's pages, inherited at fork).
    t = time.monotonic()
    res = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", f"{out}/rss.txt", bin_path, "forget", "--config", f"{out}/sluice.toml", *args],
                         capture_output=True, text=True, check=True)
    wall = time.monotonic() - t
    rss = int(open(f"{out}/rss.txt").read().split()[-1]) / 1024
    r = json.loads(res.stdout)
    big = r["tables"]["big"]
    print(f"{label:<12}{wall:6.1f} s wall, {big['rows_removed']:,} rows removed, {big['files_removed']:,} of {big['files_scanned']:,} files rewritten, "
          f"{big['bytes_rewritten'] / 1e6:,.0f} MB read+written, verified={r['verification']['passed']}, peak RSS {rss:.0f} MiB")

job("1 subject", ["--subject", "4242", "--request-id", "bench-one", "--settle-ms", "0"])
batch = random.Random(2).sample(range(subjects), 1000)
open(f"{out}/subjects.csv", "w").write("id\n" + "".join(f"{i}\n" for i in batch))
job("1,000", ["--subjects-file", f"{out}/subjects.csv", "--request-id", "bench-batch", "--settle-ms", "0"])
PY
