"""Shared helpers for the end-to-end tests: run the real binary, read its output with readers
nobody here wrote (deltalake, pyarrow, duckdb), and work out what the output should be from the
input events independently of the Rust code."""

import gzip
import json
import os
import pathlib
import signal
import subprocess
import uuid

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
MASTER_KEY = REPO / "fixtures" / "keys" / "TEST-ONLY-master.key"
# The policies the tests run with, one file each (fixtures/test-policies/README.md).
TEST_POLICIES = REPO / "fixtures" / "test-policies"


def require_or_skip(reason):
    """Skip, or fail when the test command demands every dependency."""
    if os.environ.get("SLUICE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sluice_bin():
    path = pathlib.Path(os.environ.get("SLUICE_BIN", REPO / "target" / "debug" / "sluice"))
    if not path.exists():
        require_or_skip(f"sluice binary not built at {path} (cargo build -p sluice)")
    return path


@pytest.fixture(scope="session")
def canary_dir():
    path = pathlib.Path(os.environ.get("SLUICE_CANARY_DIR", REPO.parent / "shared" / "canary"))
    if not (path / "people.jsonl").exists():
        require_or_skip(f"canary corpus not found at {path} (set SLUICE_CANARY_DIR)")
    return path


def write_config(tmp, events, policies, lake=None, extra="", source=None, name="sluice.toml", lake_extra=""):
    """A pipeline config with absolute paths under `tmp`; `source` replaces the file source's
    settings (e.g. a Kafka source); `lake_extra` goes into `[lake]` (e.g. `format = "both"`)."""
    lake = lake or tmp / "lake"
    policies_toml = ", ".join(json.dumps(str(p)) for p in policies)
    source = source or f'kind = "file"\npath = {json.dumps(str(events))}'
    text = f"""
name = "test"
policies = [{policies_toml}]
unknown_tables = "quarantine"

[source]
{source}
max_event_bytes = 65536

[lake]
root = {json.dumps(str(lake))}
{lake_extra}

[keys]
store = {json.dumps(str(tmp / "keys" / "keystore.db"))}
master_key_file = {json.dumps(str(MASTER_KEY))}
{extra}
"""
    path = tmp / name
    path.write_text(text)
    return path


def run(bin_path, *args, check=True, env=None):
    result = subprocess.run([str(bin_path), *map(str, args)], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"sluice {' '.join(map(str, args))} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def run_until_killed(sluice_bin, config, kill_after_commits=None, failpoint=None, env=None):
    """Runs `run --once` until it is killed: SIGKILL right after its n-th logged commit, or an
    abort at a failpoint (`SLUICE_FAILPOINT`)."""
    env = dict(env or os.environ)
    if failpoint:
        env["SLUICE_FAILPOINT"] = failpoint
    proc = subprocess.Popen(
        [str(sluice_bin), "--log-format", "json", "run", "--config", str(config), "--once"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    commits = 0
    for line in proc.stderr:
        try:
            fields = json.loads(line).get("fields", {})
        except ValueError:
            continue
        if fields.get("message") == "committed":
            commits += 1
            if commits == kill_after_commits:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    proc.stderr.close()
    expected = -signal.SIGKILL if kill_after_commits else -signal.SIGABRT
    assert proc.returncode == expected, f"run ended by itself ({proc.returncode}) after {commits} commits: kill point too late"


def source_events(events_dir):
    """Every line of the input, as the pipeline should see it: position, table, op, row image."""
    out = []
    root = pathlib.Path(events_dir)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.name.endswith((".jsonl", ".json", ".jsonl.gz")))
    for f in files:
        stream = f.name if root.is_file() else str(f.relative_to(root))
        offset = 0
        with (gzip.open(f, "rb") if f.name.endswith(".gz") else open(f, "rb")) as fh:
            for line in fh:
                offset += len(line)
                text = line.strip()
                if not text:
                    continue
                event = {"position": f"{stream}:{offset}", "stream": stream, "offset": offset, "raw": text}
                try:
                    doc = json.loads(text)
                except ValueError:
                    doc = None
                if isinstance(doc, dict) and "payload" in doc and "op" not in doc:
                    doc = doc["payload"]
                if isinstance(doc, dict) and doc.get("op") in ("c", "u", "r", "d"):
                    src = doc.get("source") or {}
                    event["table"] = f"{src.get('schema') or src.get('db')}.{src.get('table')}"
                    event["op"] = doc["op"]
                    event["image"] = doc["before"] if doc["op"] == "d" else doc["after"]
                    event["ts_ms"] = src.get("ts_ms") or doc.get("ts_ms") or 0
                out.append(event)
    return out


def people_pipeline(tmp_path, lake_extra="", lake=None):
    """The schema-evolution tests' pipeline: the people policy in `policies/`, its first 20 events
    in `events/`. Returns (the policy file, the events directory, the config)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = policies / "people.toml"
    policy.write_text((TEST_POLICIES / "people-balance.toml").read_text())
    events = tmp_path / "events"
    events.mkdir()
    people_events(events / "a.jsonl", range(0, 20), with_region=True)
    return policy, events, write_config(tmp_path, events, [policies], lake=lake, lake_extra=lake_extra)


# The people table of the schema-evolution tests (policy `fixtures/test-policies/people-balance.toml`).
def people_events(path, ids, with_region):
    lines = []
    for i in ids:
        after = {"id": i, "balance": i * 10}
        if with_region:
            after["region"] = f"r{i % 3}"
        lines.append(json.dumps({"before": None, "after": after, "op": "c", "ts_ms": 1704067200000 + i,
                                 "source": {"schema": "public", "table": "people", "ts_ms": 1704067200000 + i}}))
    path.write_text("\n".join(lines) + "\n")


def read_delta(path):
    import deltalake

    return deltalake.DeltaTable(str(path)).to_pyarrow_table()


def iceberg_catalog(lake):
    """The embedded SQL catalog of a lake root, opened by pyiceberg (nobody here wrote it)."""
    from pyiceberg.catalog.sql import SqlCatalog

    root = pathlib.Path(lake).resolve() / "iceberg"
    return SqlCatalog("sluice", uri=f"sqlite:///{root / 'catalog.db'}", warehouse=f"file://{root / 'warehouse'}")


def read_iceberg(lake, table, namespace="test"):
    return iceberg_catalog(lake).load_table((namespace, table)).scan().to_arrow()


def rows(table):
    return table.to_pylist()


def wait_until(condition, timeout, what):
    """Polls `condition` until it holds; fails with `what` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The demo policies and the tables they write, for tests that feed generated demo events.
DEMO_POLICIES = REPO / "schemas" / "demo"
DEMO_TARGETS = {"public.customers": "customers", "public.accounts": "accounts", "public.payments": "payments",
                "public.contact_attempts": "contact_attempts"}


def demo_events(sluice_bin, tmp_path, n, seed):
    """`n` generated demo events, one JSON document (bytes) each."""
    path = tmp_path / f"events-{seed}.jsonl"
    run(sluice_bin, "generate", "--events", n, "--seed", seed, "--out", path)
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def target_of(event):
    """The demo table an event's row lands in."""
    src = json.loads(event)["source"]
    return DEMO_TARGETS[f"{src['schema']}.{src['table']}"]


def assert_exactly_once(lake, expected):
    """Per target table, the rows carry exactly the expected positions, none twice."""
    import collections

    for target, positions in expected.items():
        got = read_delta(lake / "tables" / target).column("_position").to_pylist()
        duplicates = [p for p, n in collections.Counter(got).items() if n > 1]
        assert not duplicates, f"{target}: {len(duplicates)} events written twice"
        assert set(got) == set(positions), f"{target}: {len(set(positions) - set(got))} lost, {len(set(got) - set(positions))} unexpected"


@pytest.fixture
def pg():
    """A fresh database on the test cluster; its slots are dropped afterwards."""
    if not os.environ.get("SLUICE_PG_PORT"):
        require_or_skip("no PostgreSQL server (SLUICE_PG_HOST/PORT/USER/PASSWORD, started by tests/run.sh)")
    import psycopg

    params = dict(host=os.environ["SLUICE_PG_HOST"], port=int(os.environ["SLUICE_PG_PORT"]),
                  user=os.environ["SLUICE_PG_USER"], password=os.environ["SLUICE_PG_PASSWORD"])
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
        admin.execute(f"CREATE DATABASE {name}")

    class Db:
        database = name

        def connect(self, **kw):
            return psycopg.connect(dbname=name, **{"autocommit": True, **params, **kw})

        def execute(self, sql, args=None):
            with self.connect() as c:
                cur = c.execute(sql, args)
                return cur.fetchall() if cur.description else None

    yield Db()
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
        admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = %s AND active", (name,))
        admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s AND NOT active", (name,))
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
