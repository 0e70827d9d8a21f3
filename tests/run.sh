#!/usr/bin/env bash
# The whole test suite, as CI runs it: unit and property tests, then end-to-end tests whose
# output is read by independent readers (Python deltalake, pyarrow, duckdb).
# Installs what it needs, idempotently: a local venv with the readers (PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt

cargo build --locked -p sluice
cargo test --workspace --locked
SLUICE_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/sluice" "$venv/bin/python" -m pytest tests/e2e -q -p no:cacheprovider "$@"
