"""Governance: column classes and tags where catalogs read them (Delta column metadata and table
properties, read by Python `deltalake`; Iceberg field docs and table properties, read by
`pyiceberg`), kept in step with the policy; `sluice check` refusals and its `--tags-json`."""

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import deltalake
import pyarrow.parquet as pq

from conftest import DEMO_POLICIES, REPO, pg, run, wait_until, write_config  # noqa: F401 (pg: a fixture)
from lakes import iceberg_lake, weed  # noqa: F401 (fixtures)


def demo_policies(tmp_path):
    """A copy of the demo's policies the test may change."""
    policies = tmp_path / "policies"
    shutil.copytree(DEMO_POLICIES, policies)
    return policies


def delta_classes(table):
    return {f.name: f.metadata.get("sluice.class") for f in table.schema().fields}


def test_classes_and_tags_reach_delta_and_iceberg_and_follow_the_policy(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    policies = demo_policies(tmp_path)
    customers = policies / "customers.toml"
    customers.write_text(customers.read_text().replace(
        '[columns.national_id]\naction = "encrypt"\nclass = "direct_identifier"',
        '[columns.national_id]\naction = "encrypt"\nclass = "direct_identifier"\ntags = ["government-id", "gdpr-art87"]'))
    config = write_config(tmp_path, REPO / "fixtures" / "demo" / "events", [policies], lake=lake.root,
                          lake_extra=lake.config("both"))
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)

    manifest = json.loads(run(sluice_bin, "check", "--config", config, "--tags-json", env=lake.env).stdout)
    columns = manifest["tables"]["customers"]["columns"]
    assert columns["vulnerable"] == {
        "class": "special_category", "tags": [], "action": "keep", "source_column": "vulnerability_flag",
        "type": "Boolean", "comment": "special_category: keep as bool of vulnerability_flag"}
    assert columns["has_email"]["class"] == "operational" and columns["has_email"]["action"] == "derive"
    assert columns["national_id_enc"]["tags"] == ["government-id", "gdpr-art87"]
    assert columns["email_domain"]["tags"] == [], "a derived column does not inherit its source's tags"
    assert columns["_subject"]["class"] == "direct_identifier"
    assert set(manifest["classes"]) >= {"direct_identifier", "quasi_identifier", "special_category", "financial",
                                        "operational"}

    # Delta: column metadata (`comment` is what Spark and Unity Catalog show) and properties.
    delta = lake.delta_table("customers")
    expected = {name: c["class"] for name, c in columns.items()}
    assert {k: v for k, v in delta_classes(delta).items() if k in expected} == expected
    fields = {f.name: f.metadata for f in delta.schema().fields}
    assert fields["age_band"]["comment"] == "quasi_identifier: generalize age_band of date_of_birth"
    assert "sluice.class" not in fields["_op"]
    assert fields["national_id_enc"]["sluice.tags"] == "government-id,gdpr-art87"
    assert fields["national_id_enc"]["comment"].endswith("; tags: government-id, gdpr-art87")
    properties = delta.metadata().configuration
    assert properties["sluice.source_table"] == "public.customers"
    assert properties["sluice.classes"] == "direct_identifier,operational,quasi_identifier,special_category"
    assert json.loads(properties["sluice.classification"]) == {k: v for k, v in expected.items() if v}
    # Iceberg: field docs and table properties.
    iceberg = lake.table("customers")
    docs = {f.name: f.doc for f in iceberg.schema().fields}
    assert docs["age_band"] == fields["age_band"]["comment"]
    assert docs["_op"] is None
    assert iceberg.properties["sluice.classes"] == properties["sluice.classes"]
    assert iceberg.properties["sluice.classification"] == properties["sluice.classification"]
    rows = lake.delta("customers").num_rows

    # The policy changes a class and drops another: both tables follow, no row changes.
    customers.write_text(customers.read_text()
                         .replace('[columns.created_at]\naction = "keep"\nclass = "operational"',
                                  '[columns.created_at]\naction = "keep"\nclass = "financial"')
                         .replace('[columns.postcode]\naction = "generalize"\nclass = "quasi_identifier"\n',
                                  '[columns.postcode]\naction = "generalize"\n'))
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    delta = lake.delta_table("customers")
    classes = delta_classes(delta)
    assert (classes["created_at"], classes["postcode_area"]) == ("financial", None)
    assert delta.schema().fields[[f.name for f in delta.schema().fields].index("postcode_area")].metadata == {
        "comment": "generalize prefix of postcode"}
    assert "financial" in delta.metadata().configuration["sluice.classes"]
    iceberg = lake.table("customers")
    docs = {f.name: f.doc for f in iceberg.schema().fields}
    assert docs["created_at"] == "financial: keep as timestamp of created_at"
    assert docs["postcode_area"] == "generalize prefix of postcode"
    assert "postcode_area" not in json.loads(iceberg.properties["sluice.classification"])
    assert lake.delta("customers").num_rows == lake.iceberg("customers").num_rows == rows


def check_refuses(sluice_bin, config, policy, old, new):
    policy.write_text(policy.read_text().replace(old, new))
    result = run(sluice_bin, "check", "--config", config, check=False)
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_check_refuses_a_plain_identifier_without_a_reason_and_unknown_classes(sluice_bin, tmp_path):
    policies = demo_policies(tmp_path)
    customers = policies / "customers.toml"
    original = customers.read_text()
    config = write_config(tmp_path, tmp_path / "events", [policies])
    # The demo keeps `vulnerability_flag` (special category) with a stated reason.
    assert "kept in plain: collections staff must see" in run(sluice_bin, "check", "--config", config).stdout

    reason_line = next(line for line in original.splitlines() if line.startswith("allow_plain"))
    stderr = check_refuses(sluice_bin, config, customers, reason_line + "\n", "")
    header = original.splitlines().index("[columns.vulnerability_flag]") + 1
    assert f"customers.toml:{header}: columns.vulnerability_flag.action: `keep` writes a special_category column in plain" in stderr, stderr

    customers.write_text(original)
    stderr = check_refuses(sluice_bin, config, customers, '[columns.postcode]\naction = "generalize"\nclass = "quasi_identifier"',
                           '[columns.postcode]\naction = "generalize"\nclass = "criminal_offence"')
    line = original.splitlines().index("[columns.postcode]") + 3
    assert f"customers.toml:{line}: columns.postcode.class: unknown class `criminal_offence`" in stderr, stderr
    # The pipeline may add classes to the vocabulary.
    config.write_text(config.read_text() + '\n[governance]\nclasses = ["criminal_offence"]\n')
    run(sluice_bin, "check", "--config", config)
    manifest = json.loads(run(sluice_bin, "check", "--config", config, "--tags-json").stdout)
    assert manifest["tables"]["customers"]["columns"]["postcode_area"]["class"] == "criminal_offence"


def canary_people(canary_dir, n):
    return [json.loads(line) for line in (canary_dir / "people.jsonl").read_text().splitlines()[:n]]


def people_event(op, row, ts):
    return json.dumps({"before": None, "after": row, "source": {"db": "bank", "schema": "public", "table": "people",
                                                                  "ts_ms": ts}, "op": op, "ts_ms": ts})


def test_reveal_needs_another_persons_approval_runs_once_and_leaks_nothing(sluice_bin, tmp_path, canary_dir):
    people = canary_people(canary_dir, 30)
    events = tmp_path / "events"
    events.mkdir()
    first, second = people[3], people[7]
    moved = dict(first, email=first["email"].replace("@", ".moved@"))
    lines = [people_event("c", p, 1_718_000_000_000 + i) for i, p in enumerate(people)]
    lines.append(people_event("u", moved, 1_718_000_100_000))
    (events / "people-000.jsonl").write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path, events, [REPO / "fixtures" / "test-policies" / "people-canary.toml"])
    log = []

    def sluice(*args, expect=0):
        result = run(sluice_bin, *args, check=False)
        log.append(result.stdout + result.stderr)
        assert result.returncode == expect, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    sluice("run", "--config", config, "--once")
    request = json.loads(sluice(
        "reveal", "request", "--config", config, "--subject", str(first["id"]), "--subject", f" {second['id']} ",
        "--columns", "people.email,people.phone", "--reason", "court order 2026/117 (case review)",
        "--requested-by", "alice@bank.example").stdout)
    rid = request["id"]
    assert request["status"] == "pending approval" and len(request["subject_tokens"]) == 2
    assert request["columns"] == ["people.email", "people.phone"]
    # A column that holds no ciphertext cannot be asked for: it is in the lake already.
    refused = sluice("reveal", "request", "--config", config, "--subject", "1", "--columns", "people.balance_pence",
                     "--reason", "x", "--requested-by", "alice", expect=1)
    assert "keeps no ciphertext" in refused.stderr

    out = tmp_path / "case" / "revealed.jsonl"
    out.parent.mkdir()
    assert "0 of 1 approvals" in sluice("reveal", "run", "--config", config, rid, "--run-by", "alice@bank.example",
                                        "--out", out, expect=1).stderr
    assert not out.exists()
    assert "cannot approve their own request" in sluice(
        "reveal", "approve", "--config", config, rid, "--approved-by", " ALICE@bank.example ", expect=1).stderr
    approved = json.loads(sluice("reveal", "approve", "--config", config, rid, "--approved-by", "bob@bank.example").stdout)
    assert approved["status"] == "approved"
    # The second subject is erased between approval and run: their keys are gone.
    sluice("forget", "--config", config, "--subject", str(second["id"]), "--settle-ms", "0")
    # Never into the lake (a wrong destination, not an access: refused, nothing recorded).
    assert "inside the lake" in sluice("reveal", "run", "--config", config, rid, "--run-by", "alice@bank.example",
                                       "--out", tmp_path / "case" / ".." / "lake" / "x.jsonl", expect=1).stderr

    stderr = sluice("reveal", "run", "--config", config, rid, "--run-by", "alice@bank.example", "--out", out).stderr
    summary = json.loads(stderr[stderr.index("{\n"):])
    assert out.stat().st_mode & 0o777 == 0o600
    revealed = [json.loads(line) for line in out.read_text().splitlines()]
    erased = [r for r in revealed if r.get("erased")]
    values = sorted((r["column"], r["value"]) for r in revealed if not r.get("erased"))
    assert values == sorted([("email", first["email"]), ("email", moved["email"]), ("phone", first["phone"]),
                             ("phone", first["phone"])])
    assert len(erased) == 1 and erased[0]["subject_token"] != revealed[-1]["subject_token"]
    assert summary["values_revealed"] == 4
    assert sorted(summary["subjects"].values()) == ["4 values", "erased: keys destroyed"]
    # Once only.
    assert "run already" in sluice("reveal", "run", "--config", config, rid, "--run-by", "alice@bank.example",
                                   "--out", tmp_path / "again.jsonl", expect=1).stderr

    # A request not run before it expires can no longer be (its expiry moved into the past, as
    # the hours passing would).
    late = json.loads(sluice("reveal", "request", "--config", config, "--subject", str(first["id"]), "--columns",
                             "people.full_name", "--reason", "vulnerable customer review",
                             "--requested-by", "carol@bank.example").stdout)["id"]
    sluice("reveal", "approve", "--config", config, late, "--approved-by", "bob@bank.example")
    with sqlite3.connect(tmp_path / "keys" / "keystore.db") as db:
        db.execute("UPDATE erasure_jobs SET state = json_set(state, '$.expires_at', '2020-01-01T00:00:00.000Z') "
                   "WHERE job_id = ?", (f"reveal/{late}",))
    assert "expired" in sluice("reveal", "run", "--config", config, late, "--run-by", "carol@bank.example",
                               "--out", tmp_path / "late.jsonl", expect=1).stderr
    assert not (tmp_path / "late.jsonl").exists()

    # Every step is an audit row, readable by any Delta reader.
    audit = deltalake.DeltaTable(str(tmp_path / "lake" / "audit" / "erasures")).to_pyarrow_table().to_pylist()
    steps = sorted((r for r in audit if r["request_id"] == rid), key=lambda r: r["finished_at"])
    assert [(r["event"], r["actor"]) for r in steps] == [
        ("reveal_request", "alice@bank.example"), ("reveal_refused", "alice@bank.example"),
        ("reveal_refused", "ALICE@bank.example"), ("reveal_approve", "bob@bank.example"),
        ("reveal_run", "alice@bank.example"), ("reveal_run", "alice@bank.example"),
        ("reveal_refused", "alice@bank.example")]
    for r in steps:
        assert json.loads(r["subject_tokens"]) == request["subject_tokens"]
        assert json.loads(r["columns"]) == ["people.email", "people.phone"]
    assert steps[4]["outcome"] == "started"
    assert steps[5]["outcome"] == "revealed 4 values of 1 subjects (2 subjects requested, 1 erased)"
    assert "run already" in steps[6]["outcome"] and not steps[6]["verified"]
    late_steps = sorted((r for r in audit if r["request_id"] == late), key=lambda r: r["finished_at"])
    assert [r["event"] for r in late_steps] == ["reveal_request", "reveal_approve", "reveal_refused"]
    assert "expired" in late_steps[-1]["outcome"]
    printed = [json.loads(line) for line in sluice("audit", "--config", config, "--json").stdout.splitlines()]
    assert [r["event"] for r in printed if r["request_id"] == rid] == [r["event"] for r in steps]
    assert any(r["event"] == "erasure" for r in printed)
    assert "reveal_approve" in sluice("audit", "--config", config).stdout

    # Nothing revealed reached the lake, the key store or any command's output but the file.
    (tmp_path / "logs.txt").write_text("\n".join(log))
    scan = run(sluice_bin, "audit-leaks", "--values", canary_dir / "canaries.txt", tmp_path / "lake",
               tmp_path / "keys", tmp_path / "logs.txt", check=False)
    assert scan.returncode == 0, scan.stdout
    assert "no leaks found" in scan.stdout



def parquet_positions(root):
    """Every `_position` in every Parquet file under `root`, referenced by the table or not."""
    found = set()
    for path in root.rglob("*.parquet"):
        table = pq.read_table(path)
        if "_position" in table.column_names:
            found.update(table.column("_position").to_pylist())
    return found


def test_retention_removes_old_rows_everywhere_with_a_daemon_running_exactly_once(sluice_bin, tmp_path, canary_dir):
    people = canary_people(canary_dir, 45)
    now_ms = int(time.time() * 1000)
    old_ms, recent_ms = now_ms - 400 * 86_400_000, now_ms - 86_400_000
    events = tmp_path / "events"
    events.mkdir()
    policy = tmp_path / "people.toml"
    policy.write_text((REPO / "fixtures" / "test-policies" / "people-canary.toml").read_text()
                      .replace('token_domain = "person"', 'token_domain = "person"\nretention_days = 365\n'
                               'key = ["id"]\ncurrent = true'))
    # Old: people 0-19 (person 5 changes again recently); recent: people 20-29.
    first = [people_event("c", p, old_ms + i) for i, p in enumerate(people[:20])]
    first += [people_event("c", p, recent_ms + i) for i, p in enumerate(people[20:30])]
    first.append(people_event("u", dict(people[5], balance_pence=1), recent_ms + 100))
    (events / "people-000.jsonl").write_text("\n".join(first) + "\n")
    extra = ("[batch]\nmax_age_ms = 200\n[current]\nmax_lag_ms = 200\n[retention]\ninterval_ms = 300\nshred_keys = true\n"
             '[[aggregates]]\nname = "people_by_band"\nfrom = "people"\ndimensions = ["balance_band"]\n'
             'measures = [{fn = "count"}]\nk_anonymity = 2\nretention_days = 30\n')
    config = write_config(tmp_path, events, [policy], extra=extra)
    config.write_text(config.read_text().replace("max_event_bytes = 65536", "max_event_bytes = 65536\npoll_ms = 100"))
    lake = tmp_path / "lake"
    log_dir, current_dir = lake / "tables" / "people", lake / "tables" / "people_current"

    def rows(path, columns=None):
        if not (path / "_delta_log").exists():
            return []
        return deltalake.DeltaTable(str(path)).to_pyarrow_table(columns=columns).to_pylist()

    def retention_rows():
        return [r for r in rows(lake / "audit" / "erasures") if r["event"] == "retention"]

    def removed_from(table):
        return sum(json.loads(r["tables"]).get(table, {}).get("rows_removed", 0) for r in retention_rows())

    # A job: everything read, then retention.
    run(sluice_bin, "run", "--config", config, "--once")
    assert len(rows(log_dir)) == 31 and len(rows(current_dir)) == 30
    dry = json.loads(run(sluice_bin, "retain", "--config", config, "--dry-run").stdout)
    assert dry["tables"]["people"]["rows_removed"] == 20 and len(rows(log_dir)) == 31 and not retention_rows()
    hours = lambda: {r["hour"].timestamp() * 1000 for r in rows(lake / "aggregates" / "people_by_band")}
    assert min(hours()) < old_ms and max(hours()) > recent_ms - 3_600_000
    report = json.loads(run(sluice_bin, "retain", "--config", config).stdout)
    removed = {name: t["rows_removed"] for name, t in report["tables"].items()}
    assert removed.pop("aggregates/people_by_band") > 0 and removed.pop("aggregates/people_by_band_suppressions") >= 0
    assert removed == {"people": 20, "people_current": 19, "vault/people": 60, "quarantine/public.people": 0}
    # Aggregates keep their own limit (30 days): only the recent hours are left.
    assert hours() and min(hours()) >= now_ms - 30 * 86_400_000
    assert report["keys_shredded"] == 19, "people 0-19 but 5, who has a recent row"
    assert len(rows(log_dir)) == 11 and len(rows(current_dir)) == 11

    # A daemon: more arrives while retention runs every 300 ms — recent people 30-39, and
    # people 40-44 whose only change is old.
    daemon = subprocess.Popen([str(sluice_bin), "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        second = [people_event("c", p, recent_ms + 200 + i) for i, p in enumerate(people[30:40])]
        second += [people_event("c", p, old_ms + 500 + i) for i, p in enumerate(people[40:45])]
        (events / "people-001.jsonl").write_text("\n".join(second) + "\n")
        def settled():
            try:
                log, vault = rows(log_dir, ["_source_ts"]), rows(lake / "vault", ["_source_ts"])
                current, removed = rows(current_dir), removed_from("people")
            except (deltalake.exceptions.DeltaError, OSError):
                # Read while a retention run (or a merge) removed the log or files it started
                # from, as any reader racing a removal can be: read again.
                return False
            recent = lambda rs: all(r["_source_ts"].timestamp() * 1000 >= recent_ms for r in rs)
            return len(log) == 21 and recent(log) and len(vault) == 21 * 3 and recent(vault) and \
                len(current) == 21 and removed == 25
        wait_until(settled, 120, "the second file's recent rows in and its old ones removed everywhere")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0

    # Exactly once: every recent event once, no old one, in the log; the current table holds
    # the people whose latest change is recent.
    log = rows(log_dir)
    positions = [r["_position"] for r in log]
    assert len(positions) == len(set(positions)) == 21
    assert all(r["_source_ts"].timestamp() * 1000 >= recent_ms for r in log)
    current = rows(current_dir)
    assert len(current) == 21 and len({r["_subject"] for r in current}) == 21
    # Vault: the recent events' values only (full name, email, street address of each).
    vault = rows(lake / "vault")
    assert len(vault) == 21 * 3 and all(r["_source_ts"].timestamp() * 1000 >= recent_ms for r in vault)
    # History: no file of any table, referenced or not, holds an old row; no log entry before
    # the last retention's checkpoint is left to time-travel to.
    kept = set(positions) | {r["_position"] for r in vault} | {r["_position"] for r in current}
    assert not parquet_positions(lake / "tables") - kept, "files still holding old rows"
    assert not parquet_positions(lake / "vault") - kept, "vault files still holding old rows"
    for table in (log_dir, current_dir, lake / "vault"):
        versions = [int(f.stem) for f in (table / "_delta_log").glob("*.json")]
        checkpoints = [int(f.name.split(".")[0]) for f in (table / "_delta_log").glob("*.checkpoint.parquet")]
        assert checkpoints and min(versions) > max(checkpoints) - 1, f"{table.name}: log before the checkpoint left"
    # Receipts; the keys of the people with nothing left (0-4, 6-19, then 40-44) destroyed.
    audit = retention_rows()
    assert sum(r["vault_rows_removed"] for r in audit) == 25 * 3
    assert (removed_from("people"), removed_from("people_current")) == (25, 24)
    assert sum(r["keys_destroyed"] for r in audit) == 24
    with sqlite3.connect(tmp_path / "keys" / "keystore.db") as db:
        shredded = db.execute("SELECT count(*) FROM tombstones WHERE job_id LIKE 'retention-%'").fetchone()[0]
    assert shredded == 24
    # A run with nothing past its limit removes nothing; the input read again adds nothing.
    report = json.loads(run(sluice_bin, "retain", "--config", config).stdout)
    assert sum(t["rows_removed"] for t in report["tables"].values()) == 0
    run(sluice_bin, "run", "--config", config, "--once")
    assert len(rows(log_dir)) == 21 and len(rows(current_dir)) == 21


def test_retention_on_iceberg_leaves_no_snapshot_or_file_with_an_old_row(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    people = [{"id": k, "full_name": f"Person {k}", "balance_pence": k} for k in range(12)]
    now_ms = int(time.time() * 1000)
    old_ms, recent_ms = now_ms - 400 * 86_400_000, now_ms - 86_400_000
    events = tmp_path / "events"
    events.mkdir()
    lines = [people_event("c", p, (old_ms if k < 8 else recent_ms) + k) for k, p in enumerate(people)]
    (events / "people-000.jsonl").write_text("\n".join(lines) + "\n")
    policy = tmp_path / "people.toml"
    policy.write_text((REPO / "fixtures" / "test-policies" / "people-canary.toml").read_text()
                      .replace('token_domain = "person"', 'token_domain = "person"\nretention_days = 365\n'
                               'key = ["id"]\ncurrent = true'))
    config = write_config(tmp_path, events, [policy], lake=lake.root, lake_extra=lake.config("both"))
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    old_positions = {r["_position"] for r in lake.iceberg("people").to_pylist()
                     if r["_source_ts"].timestamp() * 1000 < recent_ms}
    assert len(old_positions) == 8
    report = json.loads(run(sluice_bin, "retain", "--config", config, env=lake.env).stdout)
    assert report["tables"]["iceberg/people"]["rows_removed"] == 8
    assert report["tables"]["iceberg/people_current"]["rows_removed"] == 8
    for name in ("people", "people_current"):
        table = lake.table(name)
        assert sorted(r["balance_pence"] for r in table.scan().to_arrow().to_pylist()) == [8, 9, 10, 11]
        assert len(table.snapshots()) == 1, f"{name}: snapshots before the retention commit are left"
    for url in lake.iceberg_files():
        if url.endswith(".parquet"):
            positions = pq.read_table(io.BytesIO(lake.read(url))).column("_position").to_pylist()
            assert not old_positions & set(positions), url
    assert lake.iceberg("people").num_rows == lake.delta("people").num_rows == 4


def test_retention_shreds_keys_in_a_postgres_key_store_once(sluice_bin, tmp_path, pg):
    people = [{"id": k, "full_name": f"Person {k}", "balance_pence": k} for k in range(6)]
    now_ms = int(time.time() * 1000)
    old_ms, recent_ms = now_ms - 400 * 86_400_000, now_ms - 86_400_000
    events = tmp_path / "events"
    events.mkdir()
    lines = [people_event("c", p, old_ms + k) for k, p in enumerate(people)]
    lines.append(people_event("u", dict(people[2], balance_pence=99), recent_ms))
    (events / "people-000.jsonl").write_text("\n".join(lines) + "\n")
    policy = tmp_path / "people.toml"
    policy.write_text((REPO / "fixtures" / "test-policies" / "people-canary.toml").read_text()
                      .replace('token_domain = "person"', 'token_domain = "person"\nretention_days = 365'))
    config = write_config(tmp_path, events, [policy], extra="[retention]\nshred_keys = true\n")
    store_line = next(line for line in config.read_text().splitlines() if line.startswith("store = "))
    config.write_text(config.read_text().replace(store_line, (
        f'kind = "postgres"\nhost = "{os.environ["SLUICE_PG_HOST"]}"\nport = {os.environ["SLUICE_PG_PORT"]}\n'
        f'user = "{os.environ["SLUICE_PG_USER"]}"\npassword_env = "SLUICE_PG_PASSWORD"\ndatabase = "{pg.database}"')))
    run(sluice_bin, "run", "--config", config, "--once")
    report = json.loads(run(sluice_bin, "retain", "--config", config).stdout)
    assert report["tables"]["people"]["rows_removed"] == 6
    assert report["keys_shredded"] == 5, "everyone's but person 2's, who has a recent row"
    with pg.connect() as db:
        tombstones = db.execute("SELECT reusable_after_ms, key_destroyed FROM sluice_keys.tombstones").fetchall()
    assert tombstones == [(-2**63, True)] * 5
    # Shredded, not erased: a later event of theirs is kept, under a new key.
    (events / "people-001.jsonl").write_text(people_event("u", dict(people[0], balance_pence=7), now_ms) + "\n")
    run(sluice_bin, "run", "--config", config, "--once")
    log = deltalake.DeltaTable(str(tmp_path / "lake" / "tables" / "people")).to_pyarrow_table().to_pylist()
    assert sorted(r["balance_pence"] for r in log) == [7, 99]
    vault = deltalake.DeltaTable(str(tmp_path / "lake" / "vault")).to_pyarrow_table().to_pylist()
    assert len(vault) == 2, "person 2's recent name and person 0's new one, under their keys"
    again = json.loads(run(sluice_bin, "retain", "--config", config).stdout)
    assert again["keys_shredded"] == 0
