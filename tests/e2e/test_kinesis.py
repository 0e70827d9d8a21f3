"""Kinesis source, end to end against a Kinesis emulator (kinesalite from npm, bound to
127.0.0.1; its path arrives in SLUICE_KINESALITE_NODE_PATH): two shards, a shard split while the
daemon runs, kill -9, restart from the lake's checkpoint — every record exactly once, parents
before children; sanitized rows published to a second stream; replays."""

import collections
import json
import os
import pathlib
import shutil
import signal
import subprocess

import boto3
import deltalake

from conftest import DEMO_POLICIES, DEMO_TARGETS, assert_exactly_once, demo_events, free_port, read_delta, require_or_skip, run, target_of, wait_until, write_config

STREAM = "crm"
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


class Kinesalite:
    def __init__(self, workdir):
        node_path = os.environ.get("SLUICE_KINESALITE_NODE_PATH")
        if not node_path or not pathlib.Path(node_path, "kinesalite").exists():
            require_or_skip("no Kinesis emulator: SLUICE_KINESALITE_NODE_PATH is not set (tests/run.sh installs kinesalite)")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        log = open(pathlib.Path(workdir) / "kinesalite.log", "wb")
        self.proc = subprocess.Popen(["node", str(pathlib.Path(__file__).with_name("kinesalite.js")), str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, NODE_PATH=node_path))
        self.client = boto3.client("kinesis", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="test", aws_secret_access_key="test")

        def ready():
            assert self.proc.poll() is None, "kinesalite exited"
            try:
                self.client.list_streams()
                return True
            except Exception:
                return False

        wait_until(ready, 30, "kinesalite to answer")

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def create(self, stream, shards):
        self.client.create_stream(StreamName=stream, ShardCount=shards)
        self.wait_active(stream)

    def wait_active(self, stream):
        wait_until(lambda: self.client.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE",
                   30, f"stream {stream} to be active")

    def put(self, stream, values, first_key=0):
        for i in range(0, len(values), 500):
            batch = [{"Data": v, "PartitionKey": str(first_key + i + j)} for j, v in enumerate(values[i:i + 500])]
            out = self.client.put_records(StreamName=stream, Records=batch)
            assert out["FailedRecordCount"] == 0

    def shards(self, stream):
        return self.client.list_shards(StreamName=stream)["Shards"]

    def split(self, stream, shard_id):
        shard = next(s for s in self.shards(stream) if s["ShardId"] == shard_id)
        lo, hi = (int(shard["HashKeyRange"][k]) for k in ("StartingHashKey", "EndingHashKey"))
        self.client.split_shard(StreamName=stream, ShardToSplit=shard_id, NewStartingHashKey=str((lo + hi) // 2))
        self.wait_active(stream)

    def read_shard(self, stream, shard_id):
        """Every record of a shard, in order (an independent reader of the stream)."""
        it = self.client.get_shard_iterator(StreamName=stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        out = []
        while it:
            page = self.client.get_records(ShardIterator=it, Limit=10000)
            out.extend(page["Records"])
            it = page.get("NextShardIterator")
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break
        return out


def expected_positions(kinesis):
    """Per target table: kinesis/<stream>/<shard>:<k> for the k-th record of each shard."""
    out = collections.defaultdict(list)
    for shard in kinesis.shards(STREAM):
        for k, record in enumerate(kinesis.read_shard(STREAM, shard["ShardId"]), start=1):
            out[target_of(record["Data"])].append(f"kinesis/{STREAM}/{shard['ShardId']}:{k}")
    return out


def txn(lake, table, app_id):
    try:
        return deltalake.DeltaTable(str(lake / "tables" / table)).transaction_version(f"sluice/test/{app_id}")
    except Exception:
        return None


def test_shard_split_kill_9_restart_exactly_once_and_published(sluice_bin, tmp_path):
    kinesis = Kinesalite(tmp_path)
    try:
        kinesis.create(STREAM, 2)
        kinesis.create("sanitized", 1)
        first = demo_events(sluice_bin, tmp_path, 1500, 11)
        kinesis.put(STREAM, first)
        source = (f'kind = "kinesis"\nstream = "{STREAM}"\nendpoint = "{kinesis.endpoint}"\nregion = "us-east-1"\npoll_ms = 200')
        publish = f'\n[publish]\nkind = "kinesis"\nstream = "sanitized"\nendpoint = "{kinesis.endpoint}"\nregion = "us-east-1"\n'
        config = write_config(tmp_path, None, [DEMO_POLICIES], source=source,
                              extra="[batch]\nmax_age_ms = 300\n\n[workers]\nthreads = 2\nchunk_events = 100\n" + publish)
        env = dict(os.environ, **AWS)
        lake = tmp_path / "lake"
        log = open(tmp_path / "daemon.log", "w")
        proc = subprocess.Popen([str(sluice_bin), "--log-format", "json", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            wait_until(lambda: (txn(lake, "customers", f"kinesis/{STREAM}/shardId-000000000000") or 0) > 100,
                       120, "a first checkpoint of shard 0")
            kinesis.split(STREAM, "shardId-000000000000")
            second = demo_events(sluice_bin, tmp_path, 1500, 12)
            kinesis.put(STREAM, second, first_key=len(first))
            children = [s["ShardId"] for s in kinesis.shards(STREAM) if s.get("ParentShardId") == "shardId-000000000000"]
            assert len(children) == 2
            # The daemon finishes the parent, lists the children (a new pass) and reads them.
            wait_until(lambda: any((txn(lake, "customers", f"kinesis/{STREAM}/{c}") or 0) > 0 for c in children),
                       120, "a checkpoint of a child shard")
            assert txn(lake, "customers", f"kinesis/{STREAM}/shardId-000000000000@done") == 1, "parent finished before children"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        third = demo_events(sluice_bin, tmp_path, 500, 13)
        kinesis.put(STREAM, third, first_key=len(first) + len(second))
        run(sluice_bin, "run", "--config", config, "--once", env=env)

        expected = expected_positions(kinesis)
        assert sum(len(v) for v in expected.values()) == 3500
        assert_exactly_once(lake, expected)

        # Published rows: at least once (the kill may repeat some), and nothing missing.
        published = [json.loads(r["Data"]) for s in kinesis.shards("sanitized") for r in kinesis.read_shard("sanitized", s["ShardId"])]
        assert {(p["_table"], p["_position"]) for p in published} == {(t, p) for t, ps in expected.items() for p in ps}
        assert all("email" not in p and "full_name" not in p for p in published)

        # A table that lacks what the others hold (as after a kill during a shard's first commit)
        # is refilled from each shard's first record; the others gain nothing.
        before = {t: read_delta(lake / "tables" / t).num_rows for t in DEMO_TARGETS.values()}
        shutil.rmtree(lake / "tables" / "payments")
        run(sluice_bin, "run", "--config", config, "--once", env=env)
        assert_exactly_once(lake, expected)
        assert {t: read_delta(lake / "tables" / t).num_rows for t in DEMO_TARGETS.values()} == before

        # Replays: into the live tables nothing is added; into a fresh root, the same rows.
        before = {t: read_delta(lake / "tables" / t).num_rows for t in DEMO_TARGETS.values()}
        run(sluice_bin, "replay", "--config", config, "--from", "earliest", env=env)
        assert {t: read_delta(lake / "tables" / t).num_rows for t in DEMO_TARGETS.values()} == before
        fresh = tmp_path / "fresh"
        run(sluice_bin, "replay", "--config", config, "--from", "earliest", "--into", fresh, env=env)
        assert_exactly_once(fresh, expected)
    finally:
        kinesis.stop()
