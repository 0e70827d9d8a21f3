"""PostgreSQL capture against a real server (logical replication, pgoutput), started by
tests/run.sh: snapshot then streaming, kill -9 during both, TOAST, added columns, clear errors.
The source is loaded and read back with psycopg; the lake is read with Python deltalake."""

import collections
import json
import os
import pathlib
import random
import signal
import subprocess
import threading
import uuid

import pytest

from conftest import MASTER_KEY, REPO, read_delta, require_or_skip, run, wait_until

POLICIES = pathlib.Path(__file__).parent / "pg_policies"


SCHEMA = """
CREATE TYPE tier AS ENUM ('basic', 'gold');
CREATE TABLE members (id bigint PRIMARY KEY, owner_id text NOT NULL, email text, birth_date date, tier tier,
                      balance numeric(12,2), bio text, tags text[], prefs jsonb, location point,
                      updated_at timestamptz DEFAULT now());
CREATE TABLE orders (id bigserial PRIMARY KEY, member_id text NOT NULL, amount numeric, status text,
                     card_number text, created_at timestamptz DEFAULT now());
ALTER TABLE members REPLICA IDENTITY FULL;
ALTER TABLE orders REPLICA IDENTITY FULL;
"""


def pg_config(tmp, db, extra="", name="sluice.toml", policies=("members.toml", "orders.toml"), source=None):
    policies_toml = ", ".join(json.dumps(str(POLICIES / p)) for p in policies)
    source = source or f"""kind = "postgres"
host = {json.dumps(os.environ["SLUICE_PG_HOST"])}
port = {os.environ["SLUICE_PG_PORT"]}
user = {json.dumps(os.environ["SLUICE_PG_USER"])}
password_env = "SLUICE_PG_PASSWORD"
database = "{db.database}"
heartbeat_ms = 300"""
    text = f"""
name = "pgtest"
policies = [{policies_toml}]

[source]
{source}

[lake]
root = {json.dumps(str(tmp / "lake"))}

[keys]
store = {json.dumps(str(tmp / "keys" / "keystore.db"))}
master_key_file = {json.dumps(str(MASTER_KEY))}

[batch]
max_age_ms = 300
{extra}
"""
    path = tmp / name
    path.write_text(text)
    return path


def daemon(sluice_bin, config, log):
    return subprocess.Popen([str(sluice_bin), "--log-format", "json", "capture", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def lake_rows(tmp, table):
    path = tmp / "lake" / "tables" / table
    if not (path / "_delta_log").exists():
        return []
    return read_delta(path).to_pylist()


def lsn_of(position):
    stream, _, offset = position.rpartition(":")
    return (0 if "/snapshot/" in stream else 1, int(offset))


def replay_state(rows, key="id"):
    """The table state the lake's change log describes: snapshot rows, then changes in commit order."""
    state = {}
    for r in sorted(rows, key=lambda r: lsn_of(r["_position"])):
        if r["_op"] == "t":
            state.clear()
        elif r["_op"] == "d":
            state.pop(r[key], None)
        else:
            state[r[key]] = r
    return state


def catch_up(sluice_bin, config):
    """Everything committed in the source before now reaches the lake (capture --once)."""
    run(sluice_bin, "capture", "--config", config, "--once")


def test_snapshot_then_stream_equals_the_source_and_keeps_toast_values(sluice_bin, pg, tmp_path):
    pg.execute(SCHEMA)
    pg.execute("""INSERT INTO members SELECT g, 'cust-' || (g % 50), CASE WHEN g % 7 = 0 THEN NULL ELSE 'm' || g || '@example.test' END,
                  date '1950-01-01' + g * 30, CASE WHEN g % 2 = 0 THEN 'gold' ELSE 'basic' END::tier, g * 1.25,
                  'bio ' || g, ARRAY['a', 'b' || g], '{"k": 1}', point(g, g) FROM generate_series(1, 300) g""")
    pg.execute("INSERT INTO orders (member_id, amount, status, card_number) SELECT 'cust-' || (g % 50), g, 'new', '4111111111111111' FROM generate_series(1, 200) g")
    config = pg_config(tmp_path, pg)
    log = tmp_path / "daemon.log"
    proc = daemon(sluice_bin, config, log)
    try:
        wait_until(lambda: len(lake_rows(tmp_path, "members")) >= 300, 60, "the snapshot in the lake")
        big = "".join(random.Random(7).choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(200_000))
        with pg.connect(autocommit=False) as c:
            c.execute("INSERT INTO members VALUES (1001, 'cust-1', 'x@example.test', '1990-01-01', 'gold', 5, %s, '{}', NULL, NULL)", (big,))
            c.execute("UPDATE orders SET status = 'paid' WHERE id <= 20")
        # Touches other columns only: the TOASTed bio must not be overwritten with a placeholder.
        pg.execute("UPDATE members SET balance = 6, tier = 'basic' WHERE id = 1001")
        pg.execute("DELETE FROM members WHERE id BETWEEN 10 AND 19")
        pg.execute("UPDATE members SET tags = ARRAY['x, y', 'q\"uote', NULL] WHERE id = 20")
        pg.execute("DELETE FROM orders WHERE id = 21")
        with pg.connect(autocommit=False) as c:
            c.execute("TRUNCATE orders")
            c.execute("INSERT INTO orders (member_id, amount, status, card_number) VALUES ('cust-3', 9.5, 'new', '4000000000000002')")
        pg.execute("UPDATE members SET email = NULL WHERE id = 21")
        wait_until(lambda: any(r["_op"] == "u" and r["id"] == 21 for r in lake_rows(tmp_path, "members")), 60, "the last change in the lake")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    catch_up(sluice_bin, config)

    members = replay_state(lake_rows(tmp_path, "members"))
    source = {r[0]: r for r in pg.execute("SELECT id, tier::text, balance::float8, bio, tags, email IS NOT NULL FROM members")}
    assert set(members) == set(source)
    for id_, (_, tier, balance, bio, tags, has_email) in source.items():
        got = members[id_]
        assert (got["tier"], got["balance"], got["bio"], json.loads(got["tags"]), got["has_email"]) == (tier, balance, bio, tags, has_email), id_
        assert (got["email_enc"] is not None) == has_email
    # The large value: every row of 1001 carries it in full.
    assert [len(r["bio"]) for r in lake_rows(tmp_path, "members") if r["id"] == 1001] == [len(big), len(big)]

    orders = replay_state(lake_rows(tmp_path, "orders"))
    source_orders = {r[0]: r for r in pg.execute("SELECT id, amount::float8, status FROM orders")}
    assert {k: (v["amount"], v["status"]) for k, v in orders.items()} == {k: (a, s) for k, (_, a, s) in source_orders.items()}
    assert sum(r["_op"] == "t" for r in lake_rows(tmp_path, "orders")) == 1
    # Each change once: (position, id, op) never repeats.
    for table in ("members", "orders"):
        keys = [(r["_position"], r["id"], r["_op"]) for r in lake_rows(tmp_path, table) if r["_op"] != "t"]
        assert not [k for k, n in collections.Counter(keys).items() if n > 1], table
    # Card numbers only in the vault; the unsupported `point` column and the unnamed `prefs` never land.
    assert "card_number" not in read_delta(tmp_path / "lake" / "tables" / "orders").schema.names
    assert not {"location", "prefs"} & set(read_delta(tmp_path / "lake" / "tables" / "members").schema.names)
    # The slot was acknowledged: its confirmed position moved past the start.
    flushed = pg.execute("SELECT confirmed_flush_lsn > '0/0' FROM pg_replication_slots WHERE database = current_database()")
    assert flushed == [(True,)]
    # The spools are gone once every sink holds the snapshot; only their meta remain.
    assert not list((tmp_path / "keys" / "spool").rglob("*.spool"))


def test_kill_9_during_snapshot_and_streaming_exactly_once(sluice_bin, pg, tmp_path):
    pg.execute(SCHEMA)
    n = 30_000
    pg.execute(f"INSERT INTO members SELECT g, 'cust-' || (g % 500), 'm' || g || '@example.test', '1980-01-01', 'basic', g, 'b', '{{}}', NULL, NULL FROM generate_series(1, {n}) g")
    config = pg_config(tmp_path, pg, extra="max_rows = 1000\n[workers]\nchunk_events = 250\n")
    log = tmp_path / "daemon.log"

    # Snapshot: kill -9 while the lake holds part of it, three times.
    killed_mid_snapshot = 0
    for _ in range(3):
        before = len(lake_rows(tmp_path, "members"))
        if before >= n:
            break
        proc = daemon(sluice_bin, config, log)
        wait_until(lambda: len(lake_rows(tmp_path, "members")) > before, 60, "snapshot progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_mid_snapshot += len(lake_rows(tmp_path, "members")) < n
    assert killed_mid_snapshot >= 1, "never caught the daemon in the middle of the snapshot"

    # Streaming: a writer updates rows in transactions while the daemon is killed twice.
    updates = 0
    stop = threading.Event()

    def writer():
        nonlocal updates
        rng = random.Random(1)
        with pg.connect(autocommit=False) as c:
            while not stop.is_set():
                ids = rng.sample(range(1, n + 1), 10)
                for i in ids:
                    c.execute("UPDATE members SET balance = balance + 1 WHERE id = %s", (i,))
                c.commit()
                updates += 10

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(2):
            proc = daemon(sluice_bin, config, log)
            seen = sum(r["_op"] == "u" for r in lake_rows(tmp_path, "members"))
            wait_until(lambda: sum(r["_op"] == "u" for r in lake_rows(tmp_path, "members")) > seen + 100, 90, "streaming progress")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    finally:
        stop.set()
        thread.join()
    catch_up(sluice_bin, config)

    rows = lake_rows(tmp_path, "members")
    snapshot = collections.Counter(r["id"] for r in rows if r["_op"] == "r")
    assert len(snapshot) == n and set(snapshot.values()) == {1}, "snapshot rows lost or written twice"
    changes = collections.Counter((r["_position"], r["id"]) for r in rows if r["_op"] == "u")
    assert not [k for k, c in changes.items() if c > 1], "a change was written twice"
    assert sum(changes.values()) == updates, f"{updates} updates made, {sum(changes.values())} in the lake"
    state = replay_state(rows)
    source = dict(pg.execute("SELECT id, balance::float8 FROM members"))
    assert {k: v["balance"] for k, v in state.items()} == source


def test_added_column_never_reaches_the_lake_until_a_policy_names_it(sluice_bin, pg, canary_dir, tmp_path):
    people = [json.loads(l) for l in (canary_dir / "people.jsonl").read_text().splitlines() if l.strip()][:200]
    pg.execute(SCHEMA)
    with pg.connect() as c:
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO members VALUES (%s, %s, %s, %s, 'gold', %s, %s, ARRAY[%s], NULL, NULL)",
                [(p["id"], p["national_id"], p["email"], p["date_of_birth"], p["balance_pence"] / 100, p["free_text_note"], p["street_address"]) for p in people[:100]])
    config = pg_config(tmp_path, pg, policies=("members_no_tags.toml",))
    log = tmp_path / "capture.log"
    with open(log, "ab") as err:
        subprocess.run([str(sluice_bin), "capture", "--config", str(config), "--once"], check=True, stderr=err, stdout=err)
    # A new column full of sensitive values, then more rows through the stream.
    pg.execute("ALTER TABLE members ADD COLUMN full_name text, ADD COLUMN phone text")
    with pg.connect() as c:
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO members (id, owner_id, email, birth_date, tier, balance, bio, tags, full_name, phone) VALUES (%s, %s, %s, %s, 'basic', 1, %s, ARRAY[%s], %s, %s)",
                [(p["id"], p["national_id"], p["email"], p["date_of_birth"], p["free_text_note"], p["street_address"], p["full_name"], p["phone"]) for p in people[100:]])
            cur.execute("UPDATE members SET full_name = 'x' || full_name WHERE full_name IS NOT NULL")
    with open(log, "ab") as err:
        subprocess.run([str(sluice_bin), "capture", "--config", str(config), "--once"], check=True, stderr=err, stdout=err)

    rows = lake_rows(tmp_path, "members")
    assert len({r["id"] for r in rows}) == 200
    names = read_delta(tmp_path / "lake" / "tables" / "members").schema.names
    assert not {"full_name", "phone", "tags"} & set(names)
    assert "full_name" in log.read_text(), "the added column is reported by name"
    # Every byte written (lake, vault, quarantine, key store, spool, logs): no canary value.
    scan = run(sluice_bin, "audit-leaks", "--values", canary_dir / "canaries.txt", tmp_path / "lake", tmp_path / "keys", log, check=False)
    assert scan.returncode == 0, scan.stdout + scan.stderr


def test_clear_errors_for_replica_identity_privilege_and_a_busy_slot(sluice_bin, pg, tmp_path):
    pg.execute(SCHEMA)
    pg.execute("ALTER TABLE orders REPLICA IDENTITY DEFAULT")
    config = pg_config(tmp_path, pg)
    err = run(sluice_bin, "capture", "--config", config, "--once", check=False)
    assert err.returncode != 0 and "ALTER TABLE \"public\".\"orders\" REPLICA IDENTITY FULL" in err.stderr, err.stderr
    pg.execute("ALTER TABLE orders REPLICA IDENTITY FULL")

    role = f"r_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        text = config.read_text().replace(f'user = {json.dumps(os.environ["SLUICE_PG_USER"])}', f'user = "{role}"').replace('password_env = "SLUICE_PG_PASSWORD"', 'password_env = "ROLE_PW"')
        other = tmp_path / "role.toml"
        other.write_text(text)
        err = run(sluice_bin, "capture", "--config", other, "--once", check=False, env={**os.environ, "ROLE_PW": "pw"})
        assert err.returncode != 0 and f"ALTER ROLE {role} WITH REPLICATION" in err.stderr, err.stderr
    finally:
        pg.execute(f"DROP ROLE {role}")

    log = tmp_path / "daemon.log"
    proc = daemon(sluice_bin, config, log)
    try:
        wait_until(lambda: pg.execute("SELECT active FROM pg_replication_slots WHERE database = current_database()") == [(True,)], 60, "the first daemon streaming")
        err = run(sluice_bin, "capture", "--config", config, "--once", check=False)
        assert err.returncode != 0 and "another capture of slot `sluice_pgtest` is running" in err.stderr, err.stderr
        # Elsewhere (another spool directory, another host): the server says the slot is busy.
        (tmp_path / "elsewhere").mkdir()
        elsewhere = pg_config(tmp_path / "elsewhere", pg)
        err = run(sluice_bin, "capture", "--config", elsewhere, "--once", check=False)
        assert err.returncode != 0 and "is in use by another connection" in err.stderr, err.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_wal_level_replica_is_refused_with_the_fix(sluice_bin, tmp_path):
    """A second, tiny cluster with wal_level = replica."""
    pg_bin = os.environ.get("SLUICE_PG_BIN")
    if not pg_bin:
        require_or_skip("no PostgreSQL binaries (SLUICE_PG_BIN, set by tests/run.sh)")
    from conftest import free_port

    import shutil
    import tempfile

    # Outside pytest's private tmp: the server runs as the postgres user when we are root.
    data = pathlib.Path(tempfile.mkdtemp(prefix="sluice-pg-"))
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        subprocess.run(["chown", "postgres", str(data)], check=True)
    subprocess.run([*as_pg, f"{pg_bin}/initdb", "-D", str(data / "d"), "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
    port = free_port()
    subprocess.run([*as_pg, f"{pg_bin}/pg_ctl", "-D", str(data / "d"), "-w", "-l", str(data / "log"), "start", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={data} -c wal_level=replica"], check=True, capture_output=True)
    try:
        text = f"""
name = "walcheck"
policies = [{json.dumps(str(POLICIES / "orders.toml"))}]
[source]
kind = "postgres"
port = {port}
user = "postgres"
database = "postgres"
[lake]
root = {json.dumps(str(tmp_path / "lake"))}
[keys]
store = {json.dumps(str(tmp_path / "keys" / "keystore.db"))}
master_key_file = {json.dumps(str(MASTER_KEY))}
"""
        config = tmp_path / "sluice.toml"
        config.write_text(text)
        err = run(sluice_bin, "capture", "--config", config, "--once", check=False)
        assert err.returncode != 0 and "wal_level = logical" in err.stderr, err.stderr
    finally:
        subprocess.run([*as_pg, f"{pg_bin}/pg_ctl", "-D", str(data / "d"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_raw_mode_pushes_debezium_events_to_kafka_for_a_separate_worker_pool(sluice_bin, pg, tmp_path):
    """capture → raw topic (trusted zone) → `sluice run` on the topic → the same lake state."""
    from kafka_broker import Tansu

    pg.execute(SCHEMA)
    pg.execute("INSERT INTO orders (member_id, amount, status, card_number) SELECT 'cust-' || g, g, 'new', '4111111111111111' FROM generate_series(1, 50) g")
    broker = Tansu(tmp_path / "broker").start()
    try:
        broker.create_topic("pgraw", 3)
        raw_stream = f'[raw_stream]\nkind = "kafka"\nbrokers = "{broker.address}"\ntopic = "pgraw"\n'
        config = pg_config(tmp_path, pg, extra=raw_stream, policies=("orders.toml",))
        run(sluice_bin, "capture", "--config", config, "--once")
        pg.execute("UPDATE orders SET status = 'paid' WHERE id <= 5")
        pg.execute("DELETE FROM orders WHERE id = 6")
        out = run(sluice_bin, "capture", "--config", config, "--once")
        assert "6 events pushed" in out.stdout, out.stdout

        events = [json.loads(v) for v in broker.read_all("pgraw", 3)]
        assert collections.Counter(e["op"] for e in events) == {"r": 50, "u": 5, "d": 1}
        # Raw means raw: the card numbers are there, in the trusted zone only.
        assert {e["after"]["card_number"] for e in events if e["op"] == "r"} == {"4111111111111111"}

        # A separate worker pool sanitizes the topic into the lake.
        source = f'kind = "kafka"\nbrokers = "{broker.address}"\ngroup_id = "workers"\ntopics = ["pgraw"]'
        run(sluice_bin, "run", "--config", pg_config(tmp_path, pg, policies=("orders.toml",), source=source, name="workers.toml"), "--once")
    finally:
        broker.stop()
    ops = collections.defaultdict(list)
    for r in lake_rows(tmp_path, "orders"):
        ops[r["id"]].append(r["_op"])
    assert {k: sorted(v) for k, v in ops.items()} == {i: sorted(["r", "u"] if i <= 5 else ["r", "d"] if i == 6 else ["r"]) for i in range(1, 51)}
    assert "card_number" not in read_delta(tmp_path / "lake" / "tables" / "orders").schema.names


def test_a_large_transaction_lands_whole_and_a_table_added_later_gets_only_its_own_snapshot(sluice_bin, pg, tmp_path):
    pg.execute(SCHEMA)
    pg.execute("INSERT INTO orders (member_id, amount, status, card_number) SELECT 'cust-' || g, g, 'new', '4111' FROM generate_series(1, 3000) g")
    # Small batches: the transaction below spans many of them (files spilled, one commit).
    config = pg_config(tmp_path, pg, policies=("orders.toml",), extra="max_rows = 500\n[workers]\nchunk_events = 200\n")
    catch_up(sluice_bin, config)
    path = tmp_path / "lake" / "tables" / "orders"
    import deltalake
    v0 = deltalake.DeltaTable(str(path)).version()
    pg.execute("UPDATE orders SET status = 'paid'")
    catch_up(sluice_bin, config)
    table = deltalake.DeltaTable(str(path))
    updates = [r for r in table.to_pyarrow_table().to_pylist() if r["_op"] == "u"]
    assert len(updates) == 3000 and len({r["_position"] for r in updates}) == 1
    # A `--once` run acknowledges its last commit: the slot holds no WAL the lake already has.
    committed = table.transaction_version("sluice/pgtest/pg/sluice_pgtest")
    confirmed = pg.execute("SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE database = current_database()")
    assert committed and int(confirmed[0][0]) >= committed
    position = updates[0]["_position"]
    for v in range(v0 + 1, table.version() + 1):
        at = [r for r in deltalake.DeltaTable(str(path), version=v).to_pyarrow_table().to_pylist() if r["_position"] == position]
        assert len(at) in (0, 3000), f"version {v} holds part of the transaction ({len(at)} rows)"

    # A second policy table: the publication must be widened by hand (the error says how).
    config = pg_config(tmp_path, pg, policies=("orders.toml", "members.toml"))
    err = run(sluice_bin, "capture", "--config", config, "--once", check=False)
    assert err.returncode != 0 and "ALTER PUBLICATION sluice_pgtest SET TABLE" in err.stderr, err.stderr
    pg.execute("ALTER PUBLICATION sluice_pgtest ADD TABLE members")
    pg.execute("INSERT INTO members SELECT g, 'cust-' || g, NULL, NULL, 'gold', g, 'b', '{}', NULL, NULL FROM generate_series(1, 40) g")
    pg.execute("UPDATE orders SET status = 'shipped' WHERE id <= 10")
    catch_up(sluice_bin, config)
    orders = lake_rows(tmp_path, "orders")
    assert collections.Counter(r["_op"] for r in orders) == {"r": 3000, "u": 3010}, "orders were not read again"
    members = lake_rows(tmp_path, "members")
    assert sorted(r["id"] for r in members if r["_op"] == "r") == list(range(1, 41))
    assert len(members) == 40


def test_changes_to_one_row_inside_one_transaction_resolve_in_their_order_in_the_current_table(sluice_bin, pg, tmp_path):
    """All events of a PostgreSQL transaction share its commit position: the current table takes
    them in the transaction's own order (the WAL's), so the row's last change wins. An update of
    the key is a delete and an insert."""
    pg.execute(SCHEMA)
    pg.execute("INSERT INTO orders (member_id, amount, status) SELECT 'cust-' || g, g, 'new' FROM generate_series(1, 50) g")
    config = pg_config(tmp_path, pg, policies=("orders_current.toml",))
    catch_up(sluice_bin, config)
    pg.execute("BEGIN; UPDATE orders SET status = 'paid' WHERE id = 1; UPDATE orders SET status = 'refunded' WHERE id = 1;"
               " UPDATE orders SET amount = 7 WHERE id = 1; DELETE FROM orders WHERE id = 2;"
               " INSERT INTO orders (id, member_id, amount, status) VALUES (100, 'cust-100', 1, 'new');"
               " DELETE FROM orders WHERE id = 100; UPDATE orders SET status = 'gone' WHERE id = 3;"
               " DELETE FROM orders WHERE id = 3; INSERT INTO orders (id, member_id, amount, status) VALUES (3, 'cust-3', 3, 'again'); COMMIT;")
    # An update of the key: the old row goes (a delete, then an insert, as Debezium writes it).
    pg.execute("UPDATE orders SET id = 200 WHERE id = 4")
    catch_up(sluice_bin, config)
    import deltalake
    current = deltalake.DeltaTable(str(tmp_path / "lake" / "tables" / "orders_current"))
    got = sorted((r["id"], r["status"], r["amount"]) for r in current.to_pyarrow_table().to_pylist())
    source = sorted((i, s, float(a)) for i, s, a in pg.execute("SELECT id, status, amount FROM orders"))
    assert got == source
    assert (1, "refunded", 7.0) in got and (3, "again", 3.0) in got and not [g for g in got if g[0] in (2, 4, 100)]
    assert (200, "new", 4.0) in got
    log = lake_rows(tmp_path, "orders")
    moved = sorted((r["_op"], r["id"]) for r in log if r["id"] in (4, 200) and r["_op"] != "r")
    assert moved == [("c", 200), ("d", 4)], moved
    # The slot lets go of WAL only up to what the current table holds too.
    committed = current.transaction_version("sluice/pgtest/pg/sluice_pgtest")
    confirmed = pg.execute("SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE database = current_database()")
    assert committed and int(confirmed[0][0]) >= committed
