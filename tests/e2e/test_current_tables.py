"""Current-state tables (`current = true`): beside the change log, `<target>_current` holds the
latest event of each key, deletes removed, emptied by a truncate. Property-style: random
interleavings of c/u/d/r/t over a few thousand keys, committed in many small commits, killed
with SIGKILL after random commits; every time, the current table read by Python `deltalake` (and
`pyiceberg`) equals what DuckDB computes from the log up to the current table's committed
position ("replay the log, keep the last event per key"). Erasure removes the subject from both."""

import json
import random

import deltalake
import duckdb
import pyarrow.parquet as pq
import pytest

from conftest import run, run_until_killed, write_config
from lakes import as_lake, iceberg_lake, weed  # noqa: F401 (fixtures)

POLICY = """
table = "public.accounts"
target = "accounts"
subject = "customer_id"
token_domain = "customer"
key = ["id"]
current = true

[columns.id]
action = "keep"
type = "int64"

[columns.customer_id]
action = "tokenize"

[columns.status]
action = "keep"
type = "string"

[columns.balance]
action = "keep"
type = "int64"
"""
COLUMNS = ["id", "customer_id_token", "status", "balance", "_op", "_subject", "_position"]
STREAM = "events.jsonl"


def event(op, row, ts):
    source = {"schema": "public", "table": "accounts", "ts_ms": ts}
    before, after = (row, None) if op == "d" else (None, row)
    if op == "t":
        before = after = None
    return json.dumps({"before": before, "after": after, "op": op, "ts_ms": ts, "source": source})


def random_history(seed, keys, n):
    """`n` events over `keys` accounts: a snapshot (r) of some, then creates, updates (several
    to one row in a row), deletes, re-creates and a few truncates, in random order."""
    rng = random.Random(seed)
    live = {}
    lines = []
    ts = 1704067200000
    for k in rng.sample(range(keys), keys // 3):
        live[k] = {"id": k, "customer_id": k % 400, "status": "open", "balance": rng.randrange(10_000)}
        lines.append(event("r", live[k], ts))
    for _ in range(n):
        ts += 1
        if rng.random() < 0.001:
            lines.append(event("t", None, ts))
            live.clear()
            continue
        k = rng.randrange(keys)
        if k not in live:
            live[k] = {"id": k, "customer_id": k % 400, "status": "open", "balance": rng.randrange(10_000)}
            lines.append(event("c", live[k], ts))
        elif rng.random() < 0.15:
            lines.append(event("d", live.pop(k), ts))
        else:
            live[k] = dict(live[k], status=rng.choice(["open", "late", "closed"]), balance=rng.randrange(10_000))
            lines.append(event("u", live[k], ts))
    return lines, live


def reference(log, up_to=None):
    """The current state DuckDB computes from the log: after the last truncate, the last event
    of each key by source position, unless it is a delete."""
    limit = "" if up_to is None else f"where off <= {int(up_to)}"
    return duckdb.sql(f"""
        with ordered as (
            select *, cast(split_part(_position, ':', 2) as bigint) as off from log {limit}),
        cut as (select coalesce(max(off), -1) as t from ordered where _op = 't'),
        ranked as (
            select ordered.*, row_number() over (partition by id order by off desc) as n
            from ordered, cut where off > cut.t)
        select {", ".join(COLUMNS)} from ranked where n = 1 and _op <> 'd' order by id
    """).fetchall()


def current_rows(current):
    return duckdb.sql(f"select {', '.join(COLUMNS)} from current order by id").fetchall()


def delta_state(lake, target):
    """(log, current table, the current table's committed offset) of a Delta pipeline, in a
    lake anywhere (a `lakes.Lake`, or a local lake's root)."""
    lake = as_lake(lake)
    current = lake.delta_table(f"{target}_current")
    return lake.delta(target), current.to_pyarrow_table(), current.transaction_version(f"sluice/test/{STREAM}")


def iceberg_state(lake, target):
    """The same of an Iceberg pipeline."""
    lake = as_lake(lake)
    current = lake.table(f"{target}_current")
    offset = current.current_snapshot().summary.additional_properties.get(f"sluice.position.sluice/test/{STREAM}")
    return lake.iceberg(target), current.scan().to_arrow(), None if offset is None else int(offset)


def assert_current_matches_log(state, lake, target, complete):
    log, table, offset = state(lake, target)
    assert table.num_rows == len(set(table.column("id").to_pylist())), "one row per key"
    assert set(table.column("_bucket").to_pylist()) <= set(range(64))
    if complete:
        expected = reference(log)
    else:
        # The current table may lag its log (its merge comes after the log's commit).
        expected = reference(log, up_to=offset if offset is not None else -1)
    assert current_rows(table) == expected
    return len(expected)


def pipeline(tmp_path, lines, lake_extra="", extra=""):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "accounts.toml").write_text(POLICY)
    events = tmp_path / STREAM
    events.write_text("\n".join(lines) + "\n")
    return write_config(tmp_path, events, [policies], lake_extra=lake_extra, extra=extra)


@pytest.mark.parametrize("max_lag_ms", [0, 3_600_000], ids=["merge-every-commit", "merge-by-size"])
def test_kill_9_at_random_commits_the_current_table_is_always_the_log_replayed(sluice_bin, tmp_path, max_lag_ms):
    lines, live = random_history(seed=max_lag_ms, keys=2000, n=12_000)
    # Many small commits: a kill lands between the log's commit and the current table's, or
    # in a merge; `merge-by-size` merges only when 300 keys wait (several log commits).
    extra = f"[batch]\nmax_rows = 300\nmax_age_ms = 600000\n[current]\nmax_lag_ms = {max_lag_ms}\n"
    extra += "[workers]\nchunk_events = 100\n"
    config = pipeline(tmp_path, lines, extra=extra)
    lake = tmp_path / "lake"
    rng = random.Random(7)
    for kill_after in sorted(rng.sample(range(2, 40), 4)):
        run_until_killed(sluice_bin, config, kill_after_commits=kill_after)
        if (lake / "tables" / "accounts_current").exists():
            assert_current_matches_log(delta_state, lake, "accounts", complete=False)
    run(sluice_bin, "run", "--config", config, "--once")
    n = assert_current_matches_log(delta_state, lake, "accounts", complete=True)
    assert n == len(live), "the reference agrees with the generator's own state"
    log = deltalake.DeltaTable(str(lake / "tables" / "accounts")).to_pyarrow_table()
    positions = log.column("_position").to_pylist()
    assert len(positions) == len(set(positions)) == len(lines), "the log: exactly once"
    # A rerun finds nothing to do and leaves the current table as it is.
    version = deltalake.DeltaTable(str(lake / "tables" / "accounts_current")).version()
    run(sluice_bin, "run", "--config", config, "--once")
    assert deltalake.DeltaTable(str(lake / "tables" / "accounts_current")).version() == version


def test_iceberg_and_delta_current_tables_agree_with_their_logs_across_kills(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    lines, live = random_history(seed=11, keys=1500, n=6_000)
    extra = "[batch]\nmax_rows = 400\nmax_age_ms = 600000\n[current]\nmax_lag_ms = 0\n[workers]\nchunk_events = 100\n"
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "accounts.toml").write_text(POLICY)
    events = tmp_path / STREAM
    events.write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path, events, [policies], lake=lake.root, lake_extra=lake.config("both"), extra=extra)
    for kill_after in (5, 17):
        run_until_killed(sluice_bin, config, kill_after_commits=kill_after, env=lake.env)
        for state in (delta_state, iceberg_state):
            try:
                state(lake, "accounts")
            except Exception:
                continue  # not created yet
            assert_current_matches_log(state, lake, "accounts", complete=False)
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    assert assert_current_matches_log(delta_state, lake, "accounts", complete=True) == len(live)
    assert assert_current_matches_log(iceberg_state, lake, "accounts", complete=True) == len(live)
    # The current table's merges rewrote files (overwrite snapshots committed through the catalog).
    operations = {s.summary.operation.value for s in lake.table("accounts_current").snapshots()}
    assert "overwrite" in operations, operations


def test_two_changes_to_one_row_in_a_commit_and_a_truncate(sluice_bin, tmp_path):
    ts = 1704067200000
    row = {"id": 1, "customer_id": 5, "status": "open", "balance": 10}
    lines = [
        event("c", row, ts),
        event("c", dict(row, id=2), ts),
        event("u", dict(row, balance=20), ts + 1),
        event("u", dict(row, balance=30), ts + 1),
        event("d", dict(row, id=2), ts + 2),
    ]
    config = pipeline(tmp_path, lines)
    run(sluice_bin, "run", "--config", config, "--once")
    lake = tmp_path / "lake"
    _, table, _ = delta_state(lake, "accounts")
    assert [(r["id"], r["balance"], r["_op"]) for r in table.to_pylist()] == [(1, 30, "u")]
    # The columns: the policy's, the metadata the issue names, and the bucket.
    assert table.column_names == ["id", "customer_id_token", "status", "balance", "_op", "_subject",
                                  "_source_ts", "_position", "_updated_at", "_source_db", "_bucket"]
    check = run(sluice_bin, "check", "--config", config, "--tables").stdout
    assert "accounts_current: unchanged" in check and "current table accounts_current" in check, check

    (tmp_path / STREAM).write_text((tmp_path / STREAM).read_text() + "\n".join([
        event("t", None, ts + 3),
        event("c", dict(row, id=3, balance=7), ts + 4),
    ]) + "\n")
    run(sluice_bin, "run", "--config", config, "--once")
    _, table, _ = delta_state(lake, "accounts")
    assert [(r["id"], r["balance"]) for r in table.to_pylist()] == [(3, 7)], "the truncate emptied the table"


def test_forget_removes_the_subject_from_the_current_table_too(sluice_bin, tmp_path):
    lines, _ = random_history(seed=3, keys=600, n=2_000)
    config = pipeline(tmp_path, lines, lake_extra='format = "both"')
    run(sluice_bin, "run", "--config", config, "--once")
    lake = tmp_path / "lake"
    _, before, _ = delta_state(lake, "accounts")
    subject = next(r["after"]["customer_id"] for r in map(json.loads, lines) if r["op"] in ("c", "r") and
                   r["after"]["id"] in before.column("id").to_pylist())
    receipt = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", subject, "--settle-ms", "0").stdout)
    token = receipt["subject_tokens"][0]
    assert token in before.column("_subject").to_pylist()
    assert receipt["verification"] == {"passed": True, "findings": []}
    for label in ("accounts_current", "iceberg/accounts_current", "accounts"):
        assert receipt["tables"][label]["rows_removed"] > 0, label
    for state in (delta_state, iceberg_state):
        log, current, _ = state(lake, "accounts")
        assert token not in current.column("_subject").to_pylist()
        assert token not in log.column("_subject").to_pylist()
        # What remains is still the log replayed.
        assert current_rows(current) == reference(log)
    # No file under the current tables names the token any more (data, logs, manifests).
    for root in (lake / "tables" / "accounts_current", lake / "iceberg"):
        for path in root.rglob("*"):
            if path.is_file() and path.suffix != ".parquet":
                assert token.encode() not in path.read_bytes(), path
            elif path.is_file():
                # Data files, and the checkpoints the erasure left in `_delta_log`.
                assert token not in str(pq.read_table(path).to_pylist()), path


def delta_actions(table_dir):
    """Every add and remove action of a Delta table's commits, by version."""
    out = {}
    for commit in sorted((table_dir / "_delta_log").glob("*.json")):
        actions = [json.loads(line) for line in commit.read_text().splitlines() if line.strip()]
        out[int(commit.stem)] = ([a["add"]["path"] for a in actions if "add" in a],
                                 [a["remove"]["path"] for a in actions if "remove" in a])
    return out


def test_a_merge_rewrites_only_files_that_may_hold_its_keys(sluice_bin, tmp_path):
    """Cost: inserting new keys (a snapshot in several commits) removes no file; changing a few
    keys rewrites at most one file per changed key, never the table."""
    ts = 1704067200000
    snapshot = [event("r", {"id": k, "customer_id": k, "status": "open", "balance": k}, ts) for k in range(3000)]
    extra = "[batch]\nmax_rows = 500\n[current]\nmax_lag_ms = 0\n[workers]\nchunk_events = 100\n"
    config = pipeline(tmp_path, snapshot, extra=extra)
    run(sluice_bin, "run", "--config", config, "--once")
    current = tmp_path / "lake" / "tables" / "accounts_current"
    history = delta_actions(current)
    merges = [v for v, (adds, _) in history.items() if adds]
    assert len(merges) >= 6, "the snapshot was merged in several commits"
    assert not [v for v, (_, removes) in history.items() if removes], "no file rewritten by inserts"
    files_before = set(deltalake.DeltaTable(str(current)).file_uris())

    changed = [7, 1234, 2999]
    (tmp_path / STREAM).write_text((tmp_path / STREAM).read_text() + "\n".join(
        event("u", {"id": k, "customer_id": k, "status": "late", "balance": -k}, ts + 1) for k in changed) + "\n")
    run(sluice_bin, "run", "--config", config, "--once")
    table = deltalake.DeltaTable(str(current))
    (adds, removes), = [delta_actions(current)[table.version()]]
    assert 1 <= len(removes) <= len(changed), f"{len(removes)} of {len(files_before)} files rewritten"
    assert len(files_before) > 3 * len(changed)
    rows = {r["id"]: r for r in table.to_pyarrow_table().to_pylist()}
    assert len(rows) == 3000 and all(rows[k]["status"] == "late" and rows[k]["balance"] == -k for k in changed)
    assert sum(r["status"] == "late" for r in rows.values()) == len(changed)


def test_a_running_daemon_merges_within_max_lag_even_when_the_source_goes_quiet(sluice_bin, tmp_path):
    import signal
    import subprocess

    from conftest import wait_until

    ts = 1704067200000
    lines = [event("c", {"id": k, "customer_id": k, "status": "open", "balance": k}, ts) for k in range(50)]
    # The log commits every 200 ms; the current table waits up to a second for more changes.
    extra = "[batch]\nmax_age_ms = 200\n[current]\nmax_lag_ms = 1000\n"
    config = pipeline(tmp_path, lines, extra=extra)
    config.write_text(config.read_text().replace("max_event_bytes = 65536", "max_event_bytes = 65536\npoll_ms = 100"))
    current = tmp_path / "lake" / "tables" / "accounts_current"
    daemon = subprocess.Popen([str(sluice_bin), "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def ids():
            if not (current / "_delta_log").exists():
                return set()
            return set(deltalake.DeltaTable(str(current)).to_pyarrow_table(columns=["id"]).column("id").to_pylist())
        wait_until(lambda: ids() == set(range(50)), 60, "the first merge")
        with open(tmp_path / STREAM, "a") as f:
            f.write(event("d", {"id": 3, "customer_id": 3, "status": "open", "balance": 3}, ts + 1) + "\n")
        # No event follows: the merge comes from the clock, not from more input.
        wait_until(lambda: ids() == set(range(50)) - {3}, 60, "the delete merged while the source is quiet")
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()


def test_changes_waiting_for_a_merge_while_an_erasure_runs_do_not_bring_the_subject_back(sluice_bin, tmp_path):
    """A daemon's current table holds changes for up to `max_lag_ms`; an erasure that runs
    meanwhile finds nothing of the subject in it, and the merge that comes later (here: at
    shutdown) leaves the subject's held changes out."""
    import signal
    import subprocess

    from conftest import wait_until

    ts = 1704067200000
    lines = [event("c", {"id": k, "customer_id": k % 10, "status": "open", "balance": k}, ts) for k in range(60)]
    extra = "[batch]\nmax_age_ms = 200\n[current]\nmax_lag_ms = 3600000\n"
    config = pipeline(tmp_path, lines, extra=extra)
    text = config.read_text().replace("max_event_bytes = 65536", "max_event_bytes = 65536\npoll_ms = 100")
    config.write_text(text.replace("[keys]\n", "[keys]\nerasure_refresh_ms = 100\n"))
    lake = tmp_path / "lake"
    daemon = subprocess.Popen([str(sluice_bin), "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = lake / "tables" / "accounts"
        wait_until(lambda: (log / "_delta_log").exists() and deltalake.DeltaTable(str(log)).to_pyarrow_table().num_rows == 60,
                   60, "the log's rows")
        receipt = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", 3, "--settle-ms", "500").stdout)
        token = receipt["subject_tokens"][0]
        assert receipt["verification"] == {"passed": True, "findings": []}
        held = deltalake.DeltaTable(str(lake / "tables" / "accounts_current")).to_pyarrow_table()
        assert held.num_rows == 0, "the merge was still waiting"
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    current = deltalake.DeltaTable(str(lake / "tables" / "accounts_current")).to_pyarrow_table()
    assert current.num_rows == 54, "every row but the erased subject's six"
    assert token not in current.column("_subject").to_pylist()
