#!/usr/bin/env bash
# Benchmark (not a test): file → full demo policy → Delta, end to end, on the release build.
# Reports events/s, MB/s of input and peak RSS. Usage: pipeline/bench/file_to_delta.sh [EVENTS]
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-1000000}
out=${BENCH_DIR:-target/bench}
cargo build --release --locked -p sluice
bin=target/release/sluice
rm -rf "$out" && mkdir -p "$out/events"
"$bin" generate --events "$events" --out "$out/events/bench.jsonl"
bytes=$(stat -c %s "$out/events/bench.jsonl")
sync  # let the generated file reach disk first, so its write-back does not compete with the run
cat > "$out/sluice.toml" <<TOML
name = "bench"
policies = ["$PWD/schemas/demo"]
[source]
kind = "file"
path = "events"
[lake]
root = "lake"
[keys]
store = "keys/keystore.db"
master_key_file = "$PWD/fixtures/keys/TEST-ONLY-master.key"
TOML
python3 - "$bin" "$out" "$events" "$bytes" <<'PY'
import json, resource, subprocess, sys
bin_path, out, events, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(f"{out}/stdout.txt", "w") as so, open(f"{out}/stderr.txt", "w") as se:
    subprocess.run([bin_path, "run", "--config", f"{out}/sluice.toml", "--once", "--summary-json", f"{out}/summary.json"], stdout=so, stderr=se, check=True)
rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
seconds = json.load(open(f"{out}/summary.json"))["elapsed_seconds"]
print(f"events      {events}")
print(f"input       {size / 1e6:.1f} MB")
print(f"elapsed     {seconds:.2f} s")
print(f"throughput  {events / seconds:,.0f} events/s, {size / 1e6 / seconds:.1f} MB/s")
print(f"peak RSS    {rss_mib:.0f} MiB")
PY
