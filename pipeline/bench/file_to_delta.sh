#!/usr/bin/env bash
# Benchmark (not a test): file → full demo policy → Delta, end to end, on the release build.
# Reports events/s, MB/s, CPU-seconds, CPU utilisation and peak RSS, and appends them as one JSON
# line to $BENCH_RESULTS (default target/bench/results.jsonl).
# Usage: pipeline/bench/file_to_delta.sh [EVENTS] [SUBJECTS]   (SUBJECTS: customers the book
# already holds, see `sluice generate --subjects`; default 0, the generator's small book)
# Environment: SLUICE_BIN runs that binary instead of building (e.g. a build of an older
# commit, named by BENCH_NAME); BENCH_KEY_STORE starts from a copy of that key store (one
# filled by `pipeline/examples/key_store_at_scale.rs`, so the run meets existing keys).
set -euo pipefail
cd "$(dirname "$0")/../.."
. pipeline/bench/lib.sh
events=${1:-1000000}
subjects=${2:-0}
out=${BENCH_DIR:-target/bench}
results=${BENCH_RESULTS:-target/bench/results.jsonl}
mkdir -p "$(dirname "$results")"
if [ -z "${SLUICE_BIN:-}" ]; then cargo build --release --locked -p sluice; fi
bin=${SLUICE_BIN:-target/release/sluice}
name=${BENCH_NAME:-sluice file→delta}
# The events are kept between runs of one size (generation is deterministic).
if [ ! -s "$out/file/events/bench.jsonl" ] || [ "$(cat "$out/file/events/made" 2>/dev/null)" != "$events $subjects" ]; then
  rm -rf "$out/file" && mkdir -p "$out/file/events"
  "$bin" generate --events "$events" --subjects "$subjects" --out "$out/file/events/bench.jsonl"
  echo "$events $subjects" > "$out/file/events/made"
fi
rm -rf "$out/file/lake" "$out/file/keys" && mkdir -p "$out/file/keys"
if [ -n "${BENCH_KEY_STORE:-}" ]; then cp "$BENCH_KEY_STORE" "$out/file/keys/keystore.db"; fi
bytes=$(stat -c %s "$out/file/events/bench.jsonl")
sync  # let the generated file reach disk first, so its write-back does not compete with the run
file_pipeline_config "$out/file" "$PWD/schemas/demo"
python3 pipeline/bench/measure.py --name "$name" --events "$events" --bytes "$bytes" \
  --subjects "$subjects" --results "$results" -- "$bin" run --config "$out/file/sluice.toml" --once
