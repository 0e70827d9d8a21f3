#!/usr/bin/env bash
# Benchmark (not a test): PostgreSQL → `sluice capture` → Delta, server and daemon on the same
# machine. Loads ROWS rows, times the snapshot, then runs UPDATES single-row changes as
# transactions of 1,000 updates (pgbench-style write load, as fast as the server takes them)
# while the daemon streams them. Reports the source write rate, changes/s captured into the
# lake, replication lag (time from a WAL position being written to the slot confirming it, i.e.
# the lake commit plus the acknowledgement), the slot's retained WAL and the daemon's peak RSS.
# Usage: pipeline/bench/pg_to_delta.sh [ROWS] [UPDATES] [RATE]   (needs tests/run.sh's .venv)
# RATE paces the write load at that many changes/s (default 0: as fast as the server goes).
set -euo pipefail
cd "$(dirname "$0")/../.."
rows=${1:-1000000}
updates=${2:-1000000}
rate=${3:-0}
out=${BENCH_DIR:-target/bench-pg}
venv=$PWD/.venv
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
cargo build --release --locked -p sluice
bin=$PWD/target/release/sluice
rm -rf "$out" && mkdir -p "$out"
# shellcheck source=tests/postgres.sh
. tests/postgres.sh
trap stop_postgres EXIT
"$venv/bin/python" - "$bin" "$out" "$rows" "$updates" "$PWD" "$rate" <<'PY'
import os, statistics, subprocess, sys, threading, time
import psycopg

bin_path, out, rows, updates, repo, rate = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
params = dict(host=os.environ["SLUICE_PG_HOST"], port=int(os.environ["SLUICE_PG_PORT"]),
              user=os.environ["SLUICE_PG_USER"], password=os.environ["SLUICE_PG_PASSWORD"])
with psycopg.connect(dbname="postgres", autocommit=True, **params) as c:
    c.execute("CREATE DATABASE bench")
db = psycopg.connect(dbname="bench", autocommit=True, **params)
db.execute("""CREATE TABLE accounts (id bigint PRIMARY KEY, owner_id text NOT NULL, email text, balance numeric(14,2),
              status text, updated_at timestamptz DEFAULT now()); ALTER TABLE accounts REPLICA IDENTITY FULL""")
t = time.monotonic()
db.execute(f"INSERT INTO accounts SELECT g, 'cust-' || (g % 200000), 'u' || g || '@example.test', g % 10000, 'open', now() FROM generate_series(1, {rows}) g")
print(f"loaded      {rows} rows in {time.monotonic() - t:.1f} s")
with open(f"{out}/accounts.toml", "w") as f:
    f.write('''table = "public.accounts"
target = "accounts"
subject = "owner_id"
token_domain = "customer"
[columns.id]
action = "keep"
type = "int64"
[columns.owner_id]
action = "tokenize"
[columns.email]
action = "encrypt"
[columns.balance]
action = "keep"
type = "float64"
[columns.status]
action = "keep"
type = "string"
[columns.updated_at]
action = "keep"
type = "timestamp"
''')
with open(f"{out}/sluice.toml", "w") as f:
    f.write(f"""name = "bench"
policies = ["{out}/accounts.toml"]
[source]
kind = "postgres"
host = "{params['host']}"
port = {params['port']}
user = "{params['user']}"
password_env = "SLUICE_PG_PASSWORD"
database = "bench"
[lake]
root = "{out}/lake"
[keys]
store = "{out}/keys/keystore.db"
master_key_file = "{repo}/fixtures/keys/TEST-ONLY-master.key"
[batch]
max_age_ms = 1000
""")

def slot_flushed():
    r = db.execute("SELECT confirmed_flush_lsn - '0/0'::pg_lsn, pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots WHERE slot_name = 'sluice_bench'").fetchone()
    return (int(r[0]) if r and r[0] is not None else 0, int(r[1]) if r and r[1] is not None else 0)

def current_lsn():
    return int(db.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])

peak_kib = 0
def sample_rss(pid):
    global peak_kib
    try:
        with open(f"/proc/{pid}/status") as f:
            peak_kib = max(peak_kib, next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")))
    except (OSError, StopIteration):
        pass

log = open(f"{out}/capture.log", "w")
proc = subprocess.Popen([bin_path, "capture", "--config", f"{out}/sluice.toml"], stdout=log, stderr=log)
try:
    # Snapshot: done when the lake table has committed every snapshot row.
    import deltalake
    table_path = f"{out}/lake/tables/accounts"
    def snapshot_committed():
        # The snapshot's stream is named after it (its WAL position, in the spool's meta).
        try:
            import json
            meta = json.load(open(f"{out}/keys/spool/sluice_bench/public.accounts.meta.json"))
            app_id = f"sluice/bench/pg/sluice_bench/snapshot/public.accounts@{meta['snapshot_lsn']:X}"
            return deltalake.DeltaTable(table_path).transaction_version(app_id) or 0
        except Exception:
            return 0
    t0 = time.monotonic()
    while snapshot_committed() < rows:
        assert proc.poll() is None, "capture exited; see capture.log"
        sample_rss(proc.pid)
        time.sleep(0.2)
    snap = time.monotonic() - t0
    print(f"snapshot    {rows} rows committed in {snap:.1f} s: {rows / snap:,.0f} rows/s (COPY, spool, sanitize, commit)")

    # Write load in a thread. Before each commit it notes the WAL insert position, which the
    # transaction's commit record follows: once the slot confirms that position, the lake
    # holds the transaction (the slot is acknowledged after the lake commit).
    samples, done = [], threading.Event()
    def load():
        with psycopg.connect(dbname="bench", autocommit=False, **params) as w:
            n, began = 0, time.monotonic()
            while n < updates:
                if rate and n / rate > time.monotonic() - began:
                    time.sleep(n / rate - (time.monotonic() - began))  # pacing the load, not a wait
                lo = n % rows + 1
                with w.cursor() as cur:
                    cur.execute("UPDATE accounts SET balance = balance + 1, updated_at = now() WHERE id BETWEEN %s AND %s", (lo, lo + 999))
                    cur.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
                    lsn = int(cur.fetchone()[0])
                w.commit()
                samples.append((time.monotonic(), lsn))
                n += 1000
        done.set()
    t1 = time.monotonic()
    write_end = t1
    writer = threading.Thread(target=load)
    writer.start()
    lags, retained, pending = [], 0, 0
    while True:
        now = time.monotonic()
        flushed, held = slot_flushed()
        retained = max(retained, held)
        while pending < len(samples) and samples[pending][1] <= flushed:
            lags.append(now - samples[pending][0])
            pending += 1
        sample_rss(proc.pid)
        if done.is_set() and pending == len(samples):
            break
        if not done.is_set():
            write_end = now
        assert proc.poll() is None, "capture exited; see capture.log"
        time.sleep(0.1)
    t2 = time.monotonic()
    writer.join()
    print(f"source      {updates} updates written in {write_end - t1:.1f} s: {updates / (write_end - t1):,.0f} changes/s (1,000 per transaction)")
    print(f"captured    {updates} changes into the lake in {t2 - t1:.1f} s: {updates / (t2 - t1):,.0f} changes/s end to end")
    print(f"lag         p50 {statistics.median(lags):.1f} s, p99 {sorted(lags)[int(len(lags) * 0.99)]:.1f} s, max {max(lags):.1f} s (commit in the source → lake commit + slot acknowledged)")
    print(f"retained    {retained / 2**20:.0f} MiB of WAL held by the slot at most")
finally:
    proc.terminate()
    proc.wait(timeout=60)
print(f"peak RSS    {peak_kib / 1024:.0f} MiB (VmHWM)")
t = deltalake.DeltaTable(f"{out}/lake/tables/accounts")
n = t.to_pyarrow_dataset().count_rows()
print(f"lake        {n} rows ({rows} snapshot + {updates} changes expected: {rows + updates})")
PY
