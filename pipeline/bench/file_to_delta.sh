#!/usr/bin/env bash
# Benchmark (not a test): file → full demo policy → Delta, end to end, on the release build.
# Reports events/s, MB/s, CPU-seconds, CPU utilisation and peak RSS, and appends them as one JSON
# line to $BENCH_RESULTS (default target/bench/results.jsonl).
# Usage: pipeline/bench/file_to_delta.sh [EVENTS] [SUBJECTS]   (SUBJECTS: customers the book
# already holds, see `sluice generate --subjects`; default 0, the generator's small book)
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-1000000}
subjects=${2:-0}
out=${BENCH_DIR:-target/bench}
results=${BENCH_RESULTS:-target/bench/results.jsonl}
mkdir -p "$(dirname "$results")"
cargo build --release --locked -p sluice
bin=target/release/sluice
rm -rf "$out/file" && mkdir -p "$out/file/events"
"$bin" generate --events "$events" --subjects "$subjects" --out "$out/file/events/bench.jsonl"
bytes=$(stat -c %s "$out/file/events/bench.jsonl")
sync  # let the generated file reach disk first, so its write-back does not compete with the run
cat > "$out/file/sluice.toml" <<TOML
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
python3 pipeline/bench/measure.py --name "sluice file→delta" --events "$events" --bytes "$bytes" \
  --subjects "$subjects" --results "$results" -- "$bin" run --config "$out/file/sluice.toml" --once
