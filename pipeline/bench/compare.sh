#!/usr/bin/env bash
# Benchmark (not a test): the same events, the same sanitization (schemas/demo), file → Delta,
# by sluice (release build) and by the plain-Python reference (pipeline/bench/reference/), in
# the same run, at two subject cardinalities: the generator's default (subjects repeat) and
# SUBJECTS distinct customers (a realistic book: caches miss). One JSON line per run is appended
# to $BENCH_RESULTS (default target/bench/results.jsonl); the ratios are printed at the end.
# Usage: pipeline/bench/compare.sh [EVENTS] [SUBJECTS]   (defaults 1000000 and 1000000)
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-1000000}
subjects=${2:-1000000}
out=${BENCH_DIR:-target/bench}
results=${BENCH_RESULTS:-$out/results.jsonl}
python=${BENCH_PYTHON:-.venv/bin/python}
cargo build --release --locked -p sluice
bin=target/release/sluice
mkdir -p "$out"
key="$PWD/fixtures/keys/TEST-ONLY-master.key"
for cardinality in default "$subjects"; do
  run="$out/compare-$cardinality"
  rm -rf "$run" && mkdir -p "$run/events"
  if [ "$cardinality" = default ]; then
    "$bin" generate --events "$events" --out "$run/events/bench.jsonl"
    label=""
  else
    "$bin" generate --events "$events" --subjects "$cardinality" --out "$run/events/bench.jsonl"
    label="--subjects $cardinality"
  fi
  bytes=$(stat -c %s "$run/events/bench.jsonl")
  sync
  cat > "$run/sluice.toml" <<TOML
name = "bench"
policies = ["$PWD/schemas/demo"]
[source]
kind = "file"
path = "events"
[lake]
root = "lake"
[keys]
store = "keys/keystore.db"
master_key_file = "$key"
TOML
  $python pipeline/bench/measure.py --name "sluice $cardinality" --events "$events" --bytes "$bytes" \
    ${label:+--subjects "$cardinality"} --results "$results" -- "$bin" run --config "$run/sluice.toml" --once
  $python pipeline/bench/measure.py --name "python $cardinality" --events "$events" --bytes "$bytes" \
    ${label:+--subjects "$cardinality"} --results "$results" -- \
    $python pipeline/bench/reference/sanitize.py "$run/events/bench.jsonl" "$run/python" "$key"
done
# The ratios of this run: the last four lines.
tail -n 4 "$results" | $python pipeline/bench/measure.py --ratios
