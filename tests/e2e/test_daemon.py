"""Daemon mode on files: appended lines and new files are picked up while running; kill -9 and
a final --once run still give every event exactly once."""

import collections
import signal
import subprocess
import time

import deltalake

from conftest import REPO, read_delta, run, source_events, write_config

POLICIES = REPO / "schemas" / "demo"
TARGETS = {"public.customers": "customers", "public.accounts": "accounts", "public.payments": "payments", "public.contact_attempts": "contact_attempts"}


def positions_in_lake(lake):
    got = []
    for target in TARGETS.values():
        path = lake / "tables" / target
        if (path / "_delta_log").exists():
            got += deltalake.DeltaTable(str(path)).to_pyarrow_table(columns=["_position"]).column("_position").to_pylist()
    return got


def wait_for(condition, what, timeout=90):
    """Polls a condition on the daemon's committed output, with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def expected_positions(events):
    return {e["position"] for e in source_events(events) if e.get("table") in TARGETS}


def test_daemon_tails_files_then_survives_kill_9(sluice_bin, tmp_path):
    events = tmp_path / "events"
    run(sluice_bin, "generate", "--events", 400, "--seed", 1, "--out", events / "a.jsonl")
    config = write_config(tmp_path, events, [POLICIES], extra="[batch]\nmax_age_ms = 200\n")
    config.write_text(config.read_text().replace("max_event_bytes = 65536", "max_event_bytes = 65536\npoll_ms = 100"))
    lake = tmp_path / "lake"
    daemon = subprocess.Popen([str(sluice_bin), "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: set(positions_in_lake(lake)) == expected_positions(events), "the first file")
        more = tmp_path / "more.jsonl"
        run(sluice_bin, "generate", "--events", 300, "--seed", 2, "--out", more)
        with open(events / "a.jsonl", "ab") as f:
            f.write(more.read_bytes())
        run(sluice_bin, "generate", "--events", 200, "--seed", 3, "--out", tmp_path / "b.jsonl")
        (tmp_path / "b.jsonl").rename(events / "b.jsonl")
        wait_for(lambda: set(positions_in_lake(lake)) == expected_positions(events), "appended lines and the new file")
        assert daemon.poll() is None, "the daemon is still running"
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    run(sluice_bin, "run", "--config", config, "--once")
    got = positions_in_lake(lake)
    assert not [p for p, n in collections.Counter(got).items() if n > 1], "events written twice"
    assert set(got) == expected_positions(events)
    assert read_delta(lake / "vault").num_rows > 0
