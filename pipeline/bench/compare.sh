#!/usr/bin/env bash
# Benchmark (not a test): the same events, the same sanitization (schemas/demo), file → Delta,
# by sluice (release build, via file_to_delta.sh) and by the plain-Python reference
# (pipeline/bench/reference/), in the same run, at two subject cardinalities: the generator's
# default book (subjects repeat) and SUBJECTS customers held before the first event (a realistic
# book: caches miss). One JSON line per run is appended to $BENCH_RESULTS (default
# target/bench/results.jsonl); the ratios of the run are printed at the end.
# Usage: pipeline/bench/compare.sh [EVENTS] [SUBJECTS]   (defaults 1000000 and 1000000)
# With BENCH_BASE_BIN=<a sluice binary built from an older commit> that build runs too, on the
# same events, and sluice is also compared with it.
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-1000000}
subjects=${2:-1000000}
out=${BENCH_DIR:-target/bench}
export BENCH_RESULTS=${BENCH_RESULTS:-$PWD/target/bench/results.jsonl}
python=${BENCH_PYTHON:-.venv/bin/python}
touch "$BENCH_RESULTS"
first=$(( $(wc -l < "$BENCH_RESULTS") + 1 ))
for cardinality in 0 "$subjects"; do
  run="$out/compare-$cardinality"
  BENCH_DIR="$run" pipeline/bench/file_to_delta.sh "$events" "$cardinality"
  if [ -n "${BENCH_BASE_BIN:-}" ]; then
    BENCH_DIR="$run" SLUICE_BIN="$BENCH_BASE_BIN" BENCH_NAME="sluice (base build)" \
      pipeline/bench/file_to_delta.sh "$events" "$cardinality"
  fi
  input="$run/file/events/bench.jsonl"
  rm -rf "$run/python"
  $python pipeline/bench/measure.py --name "python reference" --events "$events" --bytes "$(stat -c %s "$input")" \
    --subjects "$cardinality" --results "$BENCH_RESULTS" -- \
    $python pipeline/bench/reference/sanitize.py "$input" "$run/python" "$PWD/fixtures/keys/TEST-ONLY-master.key"
done
tail -n "+$first" "$BENCH_RESULTS" | $python pipeline/bench/measure.py --ratios
