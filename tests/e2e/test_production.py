"""The production daemon: the lake and a vault of its own on an S3-compatible server (moto),
read back by readers nobody here wrote; two daemons committing to the same S3 tables at once;
SIGTERM in the middle of a stream; /metrics, /health and /ready scraped from a running daemon,
checked against the run's summary and scanned for canary values together with the logs."""

import collections
import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import (DEMO_POLICIES, REPO, assert_exactly_once, demo_events, require_or_skip, run, source_events,
                      target_of, wait_until, write_config)
from test_leaks import canary_pipeline

S3_KEYS = {"AWS_ACCESS_KEY_ID": "lake-key", "AWS_SECRET_ACCESS_KEY": "lake-secret", "AWS_REGION": "us-east-1"}


@pytest.fixture
def s3():
    endpoint = os.environ.get("SLUICE_S3_ENDPOINT")
    if not endpoint:
        require_or_skip("no S3-compatible server: SLUICE_S3_ENDPOINT is not set (tests/run.sh starts moto)")
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")

    class S3:
        url = endpoint
        api = client
        options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", **S3_KEYS}

        def bucket(self, prefix):
            name = f"{prefix}-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=name)
            return name

        def keys(self, bucket):
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        def table(self, url):
            import deltalake

            return deltalake.DeltaTable(url, storage_options=self.options)

    return S3()


def s3_lake(s3, lake_bucket, vault_bucket):
    """`[lake]` settings: root in one bucket, the vault in another with credentials of its own;
    the endpoint through `${VAR}` expansion."""
    return f"""vault = "s3://{vault_bucket}/pii/vault"
[lake.s3]
endpoint = "${{TEST_S3_ENDPOINT}}"
region = "us-east-1"
allow_http = true
[lake.vault_s3]
endpoint = "${{TEST_S3_ENDPOINT}}"
region = "us-east-1"
allow_http = true
access_key_id_env = "VAULT_KEY_ID"
secret_access_key_env = "VAULT_SECRET"
"""


def s3_env(s3):
    return dict(os.environ, TEST_S3_ENDPOINT=s3.url, VAULT_KEY_ID="vault-key", VAULT_SECRET="vault-secret", **S3_KEYS)


def test_demo_on_s3_is_read_back_by_independent_readers(sluice_bin, s3, tmp_path):
    import duckdb

    lake_bucket, vault_bucket = s3.bucket("lake"), s3.bucket("vault")
    events = REPO / "fixtures" / "demo" / "events"
    root = f"s3://{lake_bucket}/sluice"
    config = write_config(tmp_path, events, [DEMO_POLICIES], lake=root, lake_extra=s3_lake(s3, lake_bucket, vault_bucket))
    env = s3_env(s3)
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "summary.json", env=env)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not (tmp_path / "lake").exists(), "nothing of the lake is written locally"

    sizes = {f.name: f.stat().st_size for f in events.iterdir()}
    for target, written in summary["rows_written"].items():
        table = s3.table(f"{root}/tables/{target}")
        data = table.to_pyarrow_table()
        assert data.num_rows == written, target
        # DuckDB over the rows the deltalake reader fetched from S3 agrees.
        assert duckdb.sql("select count(*), count(distinct _position) from data").fetchall() == [(written, written)]
        for name, size in sizes.items():
            assert table.transaction_version(f"sluice/test/{name}") == size, (target, name)
    vault = s3.table(f"s3://{vault_bucket}/pii/vault")
    assert vault.to_pyarrow_table().num_rows == summary["vault_rows_written"] > 0
    assert all(k.startswith("pii/vault/") for k in s3.keys(vault_bucket))
    assert not any("/vault/" in k for k in s3.keys(lake_bucket)), "the vault is only in its own bucket"
    assert s3.table(f"{root}/quarantine").to_pyarrow_table().num_rows == sum(summary["quarantined"].values())

    # A rerun commits nothing (positions read back from S3).
    versions = {t: s3.table(f"{root}/tables/{t}").version() for t in summary["rows_written"]}
    again = run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "again.json", env=env)
    assert json.loads((tmp_path / "again.json").read_text())["commits"] == 0, again.stderr
    assert versions == {t: s3.table(f"{root}/tables/{t}").version() for t in summary["rows_written"]}

    # Erasure works on S3 too: the customer's rows leave the live table, old files are deleted,
    # the receipt lands in the audit table on S3.
    customers = s3.table(f"{root}/tables/customers").to_pyarrow_table().num_rows
    files_before = set(s3.keys(lake_bucket))
    forget = run(sluice_bin, "forget", "--config", config, "--subject", "0", "--settle-ms", "0", env=env)
    receipt = json.loads(forget.stdout)
    assert receipt["verification"]["passed"], receipt["verification"]
    removed = receipt["tables"]["customers"]["rows_removed"]
    assert removed >= 1
    assert s3.table(f"{root}/tables/customers").to_pyarrow_table().num_rows == customers - removed
    gone = files_before - set(s3.keys(lake_bucket))
    assert any(k.startswith("sluice/tables/customers/") and k.endswith(".parquet") for k in gone)
    assert s3.table(f"{root}/audit/erasures").to_pyarrow_table().num_rows == 1


def test_two_daemons_commit_to_the_same_s3_tables_at_once(sluice_bin, s3, tmp_path):
    """Two daemons, each with its own input, the same S3 tables: conditional PUT orders their
    commits; every event lands exactly once and every commit either daemon made is in the log."""
    lake_bucket = s3.bucket("shared")
    root = f"s3://{lake_bucket}/lake"
    env = s3_env(s3)
    expected = collections.defaultdict(set)
    procs = []
    for name, seed in (("a", 11), ("b", 12)):
        events = tmp_path / f"events-{name}"
        events.mkdir()
        (events / f"ev-{name}.jsonl").write_bytes(b"\n".join(demo_events(sluice_bin, tmp_path, 800, seed)) + b"\n")
        for e in source_events(events):
            expected[target_of(e["raw"])].add(e["position"])
        config = write_config(tmp_path, events, [DEMO_POLICIES], lake=root, name=f"{name}.toml",
                              lake_extra=f'[lake.s3]\nendpoint = "{s3.url}"\nallow_http = true\nregion = "us-east-1"',
                              extra="[batch]\nmax_rows = 200\n[workers]\nchunk_events = 50")
        procs.append(subprocess.Popen([str(sluice_bin), "run", "--config", str(config), "--once",
                                       "--summary-json", str(tmp_path / f"{name}.json")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    versions = {}
    for name, p in zip("ab", procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        versions[name] = collections.defaultdict(list)
        for m in re.finditer(r'committed table="(\w+)" format="delta" version=(\d+)', err):
            versions[name][m.group(1)].append(int(m.group(2)))
    # They really ran at once: in some table, one daemon's commits fall between the other's.
    assert any(min(versions["a"][t]) < max(versions["b"][t]) and min(versions["b"][t]) < max(versions["a"][t])
               for t in versions["a"]), versions
    commits = sum(json.loads((tmp_path / f"{n}.json").read_text())["commits"] for n in "ab")
    assert commits > 20, "many commits each, so they interleave"

    logged = 0
    for target, positions in expected.items():
        table = s3.table(f"{root}/tables/{target}")
        got = table.to_pyarrow_table().column("_position").to_pylist()
        twice = [p for p, n in collections.Counter(got).items() if n > 1]
        assert not twice, f"{target}: {len(twice)} events twice"
        assert set(got) == positions, f"{target}: {len(positions - set(got))} lost"
        logged += sum(1 for h in table.history() if h["operation"] == "WRITE")
    for table in ("vault", "quarantine"):
        logged += sum(1 for h in s3.table(f"{root}/{table}").history() if h["operation"] == "WRITE")
    assert logged == commits, "every commit either daemon reported is in a table's log, none lost"


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def value(families, name):
    """A counter's total (or a gauge's value) from parsed OpenMetrics families."""
    family = families.get(name)
    if family is None:
        return None
    return next(s.value for s in family.samples if s.name in (name, f"{name}_total"))


def serving_address(log):
    for line in log.read_text().splitlines():
        if line.startswith("{") and "serving /metrics" in line:
            return json.loads(line)["fields"]["address"]
    return None


def test_sigterm_mid_stream_exits_0_and_a_restart_is_exactly_once(sluice_bin, tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    lines = demo_events(sluice_bin, tmp_path, 30000, 5)
    (events / "ev.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # Small chunks: backpressure keeps the reader a few hundred events ahead of the commits, so
    # the signal lands with most of the file unread.
    config = write_config(tmp_path, events, [DEMO_POLICIES],
                          extra="[batch]\nmax_rows = 500\n[workers]\nchunk_events = 100\n[shutdown]\ntimeout_ms = 60000")
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        daemon = subprocess.Popen([str(sluice_bin), "run", "--config", str(config), "--summary-json", str(tmp_path / "s1.json")],
                                  stdout=subprocess.PIPE, stderr=err, text=True)
        wait_until(lambda: "committed" in log.read_text(), 120, "a first commit")
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=90)
    text = log.read_text()
    assert daemon.returncode == 0, text[-3000:]
    assert "shutting down" in text
    first = json.loads((tmp_path / "s1.json").read_text())
    assert 0 < first["events_read"] < len(lines), "stopped in the middle of the stream"

    # The restart with default batches (it only has to finish the file).
    restart = write_config(tmp_path, events, [DEMO_POLICIES], name="restart.toml")
    run(sluice_bin, "run", "--config", restart, "--once", "--summary-json", tmp_path / "s2.json")
    second = json.loads((tmp_path / "s2.json").read_text())
    assert first["events_read"] + second["events_read"] == len(lines), "the restart resumed where the commit stood"
    expected = collections.defaultdict(set)
    for e in source_events(events):
        expected[target_of(e["raw"])].add(e["position"])
    assert_exactly_once(tmp_path / "lake", expected)


def test_metrics_health_and_ready_agree_with_the_summary_and_leak_nothing(sluice_bin, canary_dir, tmp_path):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    lines, config = canary_pipeline(canary_dir, tmp_path,
                                    extra='[http]\nlisten = "127.0.0.1:0"\n[batch]\nmax_age_ms = 200')
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "daemon.log"
    with open(log, "w") as err:
        daemon = subprocess.Popen([str(sluice_bin), "--log-format", "json", "run", "--config", str(config),
                                   "--summary-json", str(tmp_path / "summary.json")],
                                  stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ, SLUICE_LOG="debug"))
        try:
            address = wait_until(lambda: serving_address(log), 60, "the HTTP server")
            base = f"http://{address}"
            assert http_get(f"{base}/health") == (200, "ok\n")
            total = sum(1 for l in lines if l.strip())

            def scraped():
                status, body = http_get(f"{base}/metrics")
                assert status == 200
                families = {f.name: f for f in text_string_to_metric_families(body)}
                done = value(families, "sluice_events_read") == total and value(families, "sluice_uncommitted_events") == 0
                return (body, families) if done else None

            # Every event read and committed: the final numbers.
            body, families = wait_until(scraped, 120, "every event read and committed in /metrics")
            wait_until(lambda: http_get(f"{base}/ready")[0] == 200, 60, "/ready")
            assert http_get(f"{base}/nothing")[0] == 404
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.communicate(timeout=60)
    assert daemon.returncode == 0, log.read_text()[-3000:]
    (logs / "metrics.txt").write_text(body)
    summary = json.loads((tmp_path / "summary.json").read_text())

    def by(name, label):
        return {sample.labels[label]: sample.value for sample in families[name].samples if sample.name == f"{name}_total"}

    assert value(families, "sluice_events_read") == summary["events_read"]
    assert by("sluice_rows_written", "table") == summary["rows_written"]
    assert by("sluice_quarantined", "reason") == summary["quarantined"]
    assert {(s.labels["table"], s.labels["column"]): s.value for s in families["sluice_dropped_fields"].samples
            if s.name.endswith("_total")} == {(t, c): n for t, cols in summary["dropped_columns"].items() for c, n in cols.items()}
    assert value(families, "sluice_vault_rows_written") == summary["vault_rows_written"]
    assert sum(s.value for s in families["sluice_commits"].samples if s.name.endswith("_total")) == summary["commits"]
    durations = [s for s in families["sluice_commit_duration_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in durations) == summary["commits"]
    # No label carries anything but names: every label value is a table, column, reason, format or source.
    names = set(summary["rows_written"]) | set(summary["quarantined"]) | {"delta", "vault", "quarantine"}
    names |= {t for t in summary["dropped_columns"]} | {c for cols in summary["dropped_columns"].values() for c in cols}
    names |= set(summary["unknown_tables"])
    for f in families.values():
        for s in f.samples:
            for key, label in s.labels.items():
                assert key in ("le",) or label in names, f"{s.name} {key}={label!r}"

    scan = run(sluice_bin, "audit-leaks", "--values", canary_dir / "canaries.txt", logs, check=False)
    assert scan.returncode == 0, scan.stdout
    assert "no leaks found" in scan.stdout
