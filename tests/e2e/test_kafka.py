"""Kafka source, end to end against a real Kafka-protocol broker: consumer groups with a daemon
killed mid-stream, a broker restart, replays by offset and by time, and the stream sink's
output scanned for leaks. Every check reads the lake with Python deltalake."""

import collections
import json
import shutil
import signal
import subprocess

import deltalake

from conftest import DEMO_POLICIES, DEMO_TARGETS, assert_exactly_once, demo_events, read_delta, run, target_of, wait_until, write_config
from kafka_broker import Tansu

TOPIC = "crm"


def kafka_source(broker, group="sluice-test", topics=(TOPIC,)):
    return (f'kind = "kafka"\nbrokers = "{broker.address}"\ngroup_id = "{group}"\n'
            f'topics = {json.dumps(list(topics))}\nsession_timeout_ms = 6000')


FAST_COMMITS = "[batch]\nmax_age_ms = 300\n\n[workers]\nthreads = 2\nchunk_events = 100\n"


def expected_positions(values, placed):
    """Per target table, the positions its rows must carry: kafka/<topic>/<partition>:<offset + 1>."""
    out = collections.defaultdict(list)
    for value, (partition, offset, _) in zip(values, placed):
        out[target_of(value)].append(f"kafka/{TOPIC}/{partition}:{offset + 1}")
    return out


def committed(lake, stream):
    """The position every sink of the lake has committed for `stream` (the lowest), or -1."""
    lowest = None
    for table in [lake / "tables" / t for t in DEMO_TARGETS.values()] + [lake / "vault", lake / "quarantine"]:
        try:
            version = deltalake.DeltaTable(str(table)).transaction_version(f"sluice/test/{stream}")
        except Exception:
            return -1
        version = -1 if version is None else version
        lowest = version if lowest is None else min(lowest, version)
    return lowest


def caught_up(lake, placed):
    ends = collections.defaultdict(int)
    for partition, offset, _ in placed:
        ends[partition] = max(ends[partition], offset + 1)
    return all(committed(lake, f"kafka/{TOPIC}/{p}") >= end for p, end in ends.items())


def daemon(sluice_bin, config, log):
    return subprocess.Popen([str(sluice_bin), "--log-format", "json", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def test_two_daemons_in_a_group_one_killed_exactly_once(sluice_bin, tmp_path):
    # Memory storage: its group coordinator evicts a SIGKILLed member after the session timeout.
    broker = Tansu(tmp_path / "broker").start()
    try:
        broker.create_topic(TOPIC, 3)
        first = demo_events(sluice_bin, tmp_path, 3000, 1)
        placed = broker.produce(TOPIC, first, 3)
        config = write_config(tmp_path, None, [DEMO_POLICIES], source=kafka_source(broker), extra=FAST_COMMITS)
        a = daemon(sluice_bin, config, tmp_path / "a.log")
        b = daemon(sluice_bin, config, tmp_path / "b.log")
        lake = tmp_path / "lake"
        # Kill A once the group has committed part of the backlog, with more still to come.
        wait_until(lambda: sum(max(committed(lake, f"kafka/{TOPIC}/{p}"), 0) for p in range(3)) > 300,
                   120, "the group to commit part of the backlog")
        a.send_signal(signal.SIGKILL)
        a.wait()
        second = demo_events(sluice_bin, tmp_path, 1500, 2)
        placed += broker.produce(TOPIC, second, 3)
        wait_until(lambda: caught_up(lake, placed), 180, "the surviving daemon to commit every partition")
        assert b.poll() is None, "the surviving daemon must still be running"
        b.send_signal(signal.SIGKILL)
        b.wait()
        assert_exactly_once(lake, expected_positions(first + second, placed))
        log_b = (tmp_path / "b.log").read_text()
        assert "partitions assigned" in log_b
    finally:
        broker.stop(kill=True)


def test_broker_restart_mid_stream_loses_nothing(sluice_bin, tmp_path):
    # S3 storage: the topic survives the broker's restart.
    broker = Tansu(tmp_path / "broker", storage="s3").start()
    proc = None
    try:
        broker.create_topic(TOPIC, 2)
        first = demo_events(sluice_bin, tmp_path, 1500, 3)
        placed = broker.produce(TOPIC, first, 2)
        config = write_config(tmp_path, None, [DEMO_POLICIES], source=kafka_source(broker), extra=FAST_COMMITS)
        proc = daemon(sluice_bin, config, tmp_path / "daemon.log")
        lake = tmp_path / "lake"
        wait_until(lambda: committed(lake, f"kafka/{TOPIC}/0") > 0, 120, "a first commit")
        broker.stop(kill=True)
        broker.start()
        assert proc.poll() is None, "the daemon must ride out the broker's absence"
        second = demo_events(sluice_bin, tmp_path, 1000, 4)
        placed += broker.produce(TOPIC, second, 2)
        wait_until(lambda: caught_up(lake, placed), 180, "the daemon to commit everything after the restart")
        assert proc.poll() is None
        assert_exactly_once(lake, expected_positions(first + second, placed))
    finally:
        if proc:
            proc.kill()
            proc.wait()
        broker.stop(kill=True)


def test_replay_by_offset_and_by_time_and_into_live_tables(sluice_bin, tmp_path):
    broker = Tansu(tmp_path / "broker").start()
    try:
        broker.create_topic(TOPIC, 2)
        values = demo_events(sluice_bin, tmp_path, 1200, 5)
        t0 = 1_750_000_000_000
        placed = broker.produce(TOPIC, values, 2, first_ts=t0)
        config = write_config(tmp_path, None, [DEMO_POLICIES], source=kafka_source(broker), extra=FAST_COMMITS)
        lake = tmp_path / "lake"
        run(sluice_bin, "run", "--config", config, "--once")
        assert_exactly_once(lake, expected_positions(values, placed))
        before = {t: read_delta(lake / "tables" / t).num_rows for t in DEMO_TARGETS.values()}

        # A table that lacks what the others hold is refilled from the start; the others gain nothing.
        shutil.rmtree(lake / "tables" / "payments")
        run(sluice_bin, "run", "--config", config, "--once")
        assert_exactly_once(lake, expected_positions(values, placed))
        assert {t: read_delta(lake / "tables" / t).num_rows for t in DEMO_TARGETS.values()} == before

        # Into the live tables: every position is already committed, nothing is added.
        run(sluice_bin, "replay", "--config", config, "--from", "earliest", "--summary-json", tmp_path / "live.json")
        assert {t: read_delta(lake / "tables" / t).num_rows for t in DEMO_TARGETS.values()} == before
        assert sum(json.loads((tmp_path / "live.json").read_text())["rows_written"].values()) == 0

        # By offset, into a fresh root: offsets [100, 250) of every partition.
        by_offset = tmp_path / "by-offset"
        run(sluice_bin, "replay", "--config", config, "--from", "100", "--to", "250", "--into", by_offset)
        chosen = [(v, p) for v, p in zip(values, placed) if 100 <= p[1] < 250]
        assert len(chosen) == 300
        assert_exactly_once(by_offset, expected_positions([v for v, _ in chosen], [p for _, p in chosen]))

        # By time: messages stamped in [t0 + 200 s, t0 + 500 s].
        by_time = tmp_path / "by-time"
        start, end = "2025-06-15T15:10:00Z", "2025-06-15T15:15:00Z"  # t0 = 2025-06-15T15:06:40Z
        run(sluice_bin, "replay", "--config", config, "--from", start, "--to", end, "--into", by_time)
        lo, hi = t0 + 200_000, t0 + 500_000
        chosen = [(v, p) for v, p in zip(values, placed) if lo <= p[2] <= hi]
        assert len(chosen) == 301
        assert_exactly_once(by_time, expected_positions([v for v, _ in chosen], [p for _, p in chosen]))
    finally:
        broker.stop(kill=True)
