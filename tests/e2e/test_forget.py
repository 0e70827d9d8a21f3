"""Right to be forgotten (`sluice forget`) with the key store on a real PostgreSQL (started by
tests/run.sh) and on SQLite: crypto-shredding, physical deletion, anonymized tables, replays
that resurrect nothing, kill -9 mid-job, receipts and the audit table.

Envelopes are opened here with Python `cryptography` (AES-GCM) from the key rows read with
psycopg: what an attacker holding the master key could do, independently of the Rust code."""

import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import MASTER_KEY, TEST_POLICIES, read_delta, require_or_skip, run

PEOPLE = (TEST_POLICIES / "people-erasure.toml").read_text()

# Visits stay for statistics after an erasure, unlinked from the person.
VISITS = (TEST_POLICIES / "visits-anonymize.toml").read_text()

TABLES = ("people", "visits")


def keys_section(tmp, backend, db=None):
    if backend == "sqlite":
        return f'[keys]\nstore = {json.dumps(str(tmp / "keys" / "keystore.db"))}\nmaster_key_file = {json.dumps(str(MASTER_KEY))}\n'
    return f"""[keys]
kind = "postgres"
host = {json.dumps(os.environ["SLUICE_PG_HOST"])}
port = {os.environ["SLUICE_PG_PORT"]}
user = {json.dumps(os.environ["SLUICE_PG_USER"])}
password_env = "SLUICE_PG_PASSWORD"
database = "{db.database}"
master_key_file = {json.dumps(str(MASTER_KEY))}
"""


def write_pipeline(tmp, keys, policies, name="test"):
    pol = tmp / "policies"
    pol.mkdir(exist_ok=True)
    paths = []
    for file, text in policies.items():
        (pol / file).write_text(text)
        paths.append(str(pol / file))
    config = tmp / "sluice.toml"
    config.write_text(f"""
name = "{name}"
policies = {json.dumps(paths)}
unknown_tables = "quarantine"

[source]
kind = "file"
path = {json.dumps(str(tmp / "events"))}

[lake]
root = {json.dumps(str(tmp / "lake"))}

[batch]
max_age_ms = 1000

{keys}erasure_refresh_ms = 1000
""")
    return config


def demo_pipeline(tmp, name, keys, source="", tuning=""):
    """A pipeline over generated demo events in `tmp/events`, with the demo policies."""
    from conftest import DEMO_POLICIES

    config = tmp / "sluice.toml"
    config.write_text(f"""
name = "{name}"
policies = [{json.dumps(str(DEMO_POLICIES))}]
[source]
kind = "file"
path = {json.dumps(str(tmp / "events"))}
{source}
[lake]
root = {json.dumps(str(tmp / "lake"))}
{tuning}
{keys}""")
    return config


def created_customers(lines):
    """Ids of the customers the demo events create."""
    return sorted({json.loads(l)["after"]["id"] for l in lines
                   if '"table":"customers"' in l.replace(" ", "") and '"op":"c"' in l.replace(" ", "")})


def envelope(table, op, before, after, ts):
    return json.dumps({"before": before, "after": after, "source": {"db": "clinic", "schema": "public", "table": table, "ts_ms": ts}, "op": op, "ts_ms": ts})


def unwrap(wrapped, key_id, owner, purpose="subject"):
    """A data key, unwrapped with the (test-only) master key: format 0x01 | id | nonce | ct+tag,
    bound to its id and to whose it is (a subject's token, or a system key's name)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    master = bytes.fromhex(MASTER_KEY.read_text().strip())
    aad = b"sluice:keywrap:v2\0" + key_id + purpose.encode() + b"\0" + owner.encode()
    return AESGCM(master).decrypt(wrapped[17:29], wrapped[29:], aad)


def open_field(key, envelope_bytes, table, column, token):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aad = b"sluice:field:v1\0" + b"".join(p.encode() + b"\0" for p in (table, column, token))
    return AESGCM(key).decrypt(envelope_bytes[17:29], envelope_bytes[29:], aad).decode()


def files_holding(table_dir, column, tokens):
    """Every Parquet file under a table directory (any version, or none) holding one of `tokens`."""
    out = set()
    for f in table_dir.rglob("*.parquet"):
        if "_delta_log" in f.parts:
            continue
        values = pq.read_table(f, columns=[column]).column(0)
        if pc.any(pc.is_in(values, value_set=__import__("pyarrow").array(sorted(tokens)))).as_py():
            out.add(f)
    return out


def history_free_of(table_dir, tokens):
    """No commit file or checkpoint mentions the tokens (file statistics would), and every
    version that can still be loaded holds none of their rows. Returns how many can be loaded."""
    import deltalake

    for f in (table_dir / "_delta_log").iterdir():
        data = f.read_bytes()
        assert not [t for t in tokens if t.encode() in data], f"{f.relative_to(table_dir.parent)} names an erased subject"
    latest = deltalake.DeltaTable(str(table_dir)).version()
    readable = 0
    for v in range(latest + 1):
        try:
            t = deltalake.DeltaTable(str(table_dir), version=v).to_pyarrow_table()
        except Exception:  # noqa: BLE001 - versions before the erasure are gone with their log
            assert v < latest
            continue
        readable += 1
        if t.num_rows and "_subject" in t.column_names:
            assert not set(t.column("_subject").to_pylist()) & set(tokens), f"version {v} of {table_dir.name}"
    return readable


def test_forget_one_subject_everywhere_with_the_key_store_on_postgres(sluice_bin, canary_dir, pg, tmp_path):
    people = [json.loads(l) for l in (canary_dir / "people.jsonl").read_text().splitlines() if l.strip()][:40]
    victim, other = people[0], people[1]
    lines, ts = [], 1_718_000_000_000
    for i, p in enumerate(people):
        lines.append(envelope("people", "c", None, p, ts + i))
        if i % 2 == 0:
            lines.append(envelope("people", "u", p, dict(p, email=p["email"].upper()), ts + 86_400_000 + i))
        for v in range(3):
            lines.append(envelope("visits", "c", None, {"id": i * 10 + v, "person_id": p["id"], "clinic": f"c{v}", "cost": 100 + v}, ts + v * 86_400_000 + i))
    lines.append(envelope("people", "c", None, dict(victim, balance_pence=victim["full_name"]), ts))   # type drift: quarantined
    lines.append(envelope("people", "c", None, dict(other, balance_pence=other["full_name"]), ts))     # another's: stays
    lines.append(envelope("people", "c", None, people[2], ts)[:-30])                                  # malformed, another's: stays
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "clinic.jsonl").write_text("\n".join(lines) + "\n")
    config = write_pipeline(tmp_path, keys_section(tmp_path, "postgres", pg), {"people.toml": PEOPLE, "visits.toml": VISITS})
    run(sluice_bin, "run", "--config", config, "--once")
    lake = tmp_path / "lake"

    all_files = lambda: sorted(p for p in lake.rglob("*") if p.is_file())  # noqa: E731
    files_at_start = all_files()
    dry = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", victim["id"], "--dry-run").stdout)
    token = dry["subject_tokens"][0]
    assert all_files() == files_at_start, "a dry run changes nothing"
    before = {t: read_delta(lake / "tables" / t).to_pylist() for t in TABLES}
    vault_before = read_delta(lake / "vault").to_pylist()
    victim_rows = {t: [r for r in rows if r["_subject"] == token] for t, rows in before.items()}
    assert len(victim_rows["people"]) == 2 and len(victim_rows["visits"]) == 3
    assert dry["tables"]["people"]["rows_removed"] == 2 and dry["tables"]["visits"]["rows_anonymized"] == 3
    assert dry["tables"]["quarantine"]["rows_removed"] == 1 and dry["keys_destroyed"] == 1
    assert dry["tables"]["vault"]["rows_removed"] == sum(1 for r in vault_before if r["subject_token"] == token) == 4
    files_before = {t: files_holding(lake / "tables" / t, "_subject", {token}) for t in TABLES}
    files_before["vault"] = files_holding(lake / "vault", "subject_token", {token})
    assert all(files_before.values())

    # Copied aside before the job: the victim's ciphertexts and their key as stored. A positive
    # control first: with the key, they open.
    (key_id, wrapped), = pg.execute("SELECT k.id, k.wrapped FROM sluice_keys.subject_keys s JOIN sluice_keys.keys k ON k.id = s.key_id WHERE s.token = %s", (token,))
    key = unwrap(bytes(wrapped), bytes(key_id), token)
    saved = [(r["table"], r["column"], r["ciphertext"]) for r in vault_before if r["subject_token"] == token]
    saved += [("people", "phone", r["phone_enc"]) for r in victim_rows["people"]]
    opened = {open_field(key, ct, t, c, token) for t, c, ct in saved}
    assert {victim["full_name"], victim["phone"], victim["email"]} <= opened

    result = run(sluice_bin, "forget", "--config", config, "--subject", victim["id"], "--request-id", "DSR-2026-001", "--requested-by", "dpo@clinic.test")
    receipt = json.loads(result.stdout)
    assert receipt["verification"] == {"passed": True, "findings": []}
    assert (receipt["keys_destroyed"], receipt["tombstones_written"]) == (1, 1)
    assert receipt["tables"]["people"]["rows_removed"] == 2 and receipt["tables"]["visits"]["rows_anonymized"] == 3
    assert receipt["tables"]["vault"]["rows_removed"] == 4 and receipt["tables"]["quarantine"]["rows_removed"] == 1
    # The id as a number of its own (a time's fraction `.900000` is not it).
    assert not re.search(rf"(?<![\d.]){victim['id']}(?!\d)", result.stdout + result.stderr)
    assert victim["full_name"] not in result.stderr
    assert receipt["subjects_without_rows"] == 0 and receipt["review_quarantined"] == []
    reuse = run(sluice_bin, "forget", "--config", config, "--subject", other["id"], "--request-id", "DSR-2026-001", check=False)
    assert reuse.returncode == 2 and "exists for other subjects" in reuse.stderr, "a request id names one set of subjects"
    unknown = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", "no-such-person", "--dry-run", "--allow-absent").stdout)
    assert unknown["subjects_without_rows"] == 1

    # The key is gone from the store (only a tombstone, without the id, remains), so what was
    # copied aside can no longer be opened by anyone.
    assert pg.execute("SELECT count(*) FROM sluice_keys.subject_keys WHERE token = %s", (token,)) == [(0,)]
    assert pg.execute("SELECT count(*) FROM sluice_keys.keys WHERE id = %s", (bytes(key_id),)) == [(0,)]
    assert pg.execute("SELECT job_id, key_destroyed FROM sluice_keys.tombstones WHERE token = %s", (token,)) == [(receipt["job_id"], True)]
    for _, _, ct in saved:
        assert pg.execute("SELECT count(*) FROM sluice_keys.keys WHERE id = %s", (ct[1:17],)) == [(0,)]

    # Tables: no current row carries the token; every file that held their rows is gone; older
    # versions either fail to load or hold nothing of them; anonymized rows stay, unlinked.
    after = {t: read_delta(lake / "tables" / t).to_pylist() for t in TABLES}
    for t in TABLES:
        assert not any(token in (r["_subject"], r.get("id_token"), r.get("person_id_token")) for r in after[t])
        assert not any(f.exists() for f in files_before[t]), f"{t}: a file that held the subject is still there"
        assert not files_holding(lake / "tables" / t, "_subject", {token})
        assert history_free_of(lake / "tables" / t, [token]) >= 1
    assert not any(f.exists() for f in files_before["vault"])
    history_free_of(lake / "vault", [token])
    assert not [r for r in read_delta(lake / "vault").to_pylist() if r["subject_token"] == token]
    others = lambda rows: sorted((r for r in rows if r["_subject"] not in (token, "")), key=lambda r: (r["_position"], json.dumps(r, default=str)))  # noqa: E731
    for t in TABLES:
        assert others(after[t]) == others(before[t]), f"{t}: other subjects changed"
    assert [r for r in read_delta(lake / "vault").to_pylist()] == [r for r in vault_before if r["subject_token"] != token]
    anonymized = [r for r in after["visits"] if r["_subject"] == ""]
    assert len(anonymized) == 3 and len(after["visits"]) == len(before["visits"])
    assert all(r["person_id_token"] is None and r["id_token"] is None and r["_position"] == "" for r in anonymized)
    assert sorted(r["cost"] for r in anonymized) == [100, 101, 102], "statistics survive"
    quarantine = read_delta(lake / "quarantine").to_pylist()
    assert sorted(q["reason"] for q in quarantine) == ["malformed_json", "type_mismatch"], "only the victim's event left"

    # The receipt is in the append-only audit table, with tokens only.
    audit = read_delta(lake / "audit" / "erasures").to_pylist()
    assert len(audit) == 1 and audit[0]["job_id"] == receipt["job_id"] and audit[0]["verified"]
    assert (audit[0]["request_id"], audit[0]["requested_by"], audit[0]["keys_destroyed"]) == (receipt["request_id"], receipt["requested_by"], 1)
    # The reference and the requester are keyed tokens: an email there is no one's plaintext.
    assert re.fullmatch("[0-9a-f]{32}", receipt["request_id"]) and re.fullmatch("[0-9a-f]{32}", receipt["requested_by"])
    assert b"dpo@clinic.test" not in b"".join(f.read_bytes() for f in (tmp_path / "lake" / "audit").rglob("*") if f.is_file())
    # Times left out of the search: `…:55.900000` once held the digits of id 900000.
    untimed = {k: v for k, v in audit[0].items() if not isinstance(v, datetime.datetime)}
    assert json.loads(audit[0]["subject_tokens"]) == [token] and str(victim["id"]) not in json.dumps(untimed, default=str)
    assert (audit[0]["rows_removed"], audit[0]["rows_anonymized"], audit[0]["vault_rows_removed"]) == (3, 3, 4)

    # Rerunning the request changes nothing and prints the same receipt.
    again = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", victim["id"], "--request-id", "DSR-2026-001").stdout)
    assert again == receipt and len(read_delta(lake / "audit" / "erasures").to_pylist()) == 1

    # The lake's positions survived the erasure (kept by the checkpoint that replaced the older
    # commits): running again reads nothing twice.
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "again.json")
    again_summary = json.loads((tmp_path / "again.json").read_text())
    assert again_summary["rows_written"] == {} and again_summary["vault_rows_written"] == 0, again_summary

    # Replaying every old event into an empty lake (same key store) writes nothing of theirs.
    for d in ("tables", "vault", "quarantine"):
        shutil.rmtree(lake / d)
    run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "replay.json")
    summary = json.loads((tmp_path / "replay.json").read_text())
    assert summary["erased_subject_rows"] == 2 + 3 + 1, "their create and update, visits and drifted event"
    for t in TABLES:
        replayed = read_delta(lake / "tables" / t).to_pylist()
        assert not [r for r in replayed if r["_subject"] == token]
        assert len(replayed) == len(before[t]) - len(victim_rows[t])
    assert not [r for r in read_delta(lake / "vault").to_pylist() if r["subject_token"] == token]
    assert pg.execute("SELECT count(*) FROM sluice_keys.subject_keys WHERE token = %s", (token,)) == [(0,)], "no new key"

    # Everything any key in the store can still open, decrypted, and the lake itself: none of
    # the victim's values. (A positive control: another person's values are in the dump.)
    dump = tmp_path / "decrypted"
    dump.mkdir()
    stored = {bytes(i): (bytes(w), "subject" if t else "system", t or n) for i, w, t, n in pg.execute(
        "SELECT k.id, k.wrapped, s.token, y.name FROM sluice_keys.keys k LEFT JOIN sluice_keys.subject_keys s ON s.key_id = k.id"
        " LEFT JOIN sluice_keys.system_keys y ON y.key_id = k.id")}
    key_of = lambda kid: unwrap(stored[kid][0], kid, stored[kid][2], stored[kid][1])  # noqa: E731
    plain = []
    envelopes = [(r["table"], r["column"], r["subject_token"], r["ciphertext"]) for r in read_delta(lake / "vault").to_pylist()]
    for r in read_delta(lake / "tables" / "people").to_pylist():
        envelopes += [("people", c, r["_subject"], r[f"{c}_enc"]) for c in ("phone", "national_id") if r[f"{c}_enc"]]
    envelopes += [(t, c, token, ct) for t, c, ct in saved]
    for t, c, subject, ct in envelopes:
        if ct[1:17] in stored:
            plain.append(open_field(key_of(ct[1:17]), ct, t, c, subject))
    # The quarantine's raw events, under their subject's key or the quarantine system key.
    for q in read_delta(lake / "quarantine").to_pylist():
        plain.append(open_field(key_of(q["event_enc"][1:17]), q["event_enc"], "_quarantine", "event", q["_position"]))
    assert any(other["full_name"] in p for p in plain[-3:]), "positive control: quarantined events open"
    (dump / "plaintexts.txt").write_text("\n".join(plain))
    assert other["full_name"] in plain
    values = tmp_path / "victim-values.txt"
    values.write_text("\n".join(victim[k] for k in ("full_name", "email", "phone", "national_id", "street_address", "iban", "card_number")))
    scan = run(sluice_bin, "audit-leaks", "--values", values, lake, dump, check=False)
    assert scan.returncode == 0 and "no leaks found" in scan.stdout, scan.stdout


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_kill_9_during_a_batch_erasure_then_rerun_completes(sluice_bin, backend, tmp_path, request):
    db = request.getfixturevalue("pg") if backend == "postgres" else None
    (tmp_path / "events").mkdir()
    run(sluice_bin, "generate", "--events", 30000, "--seed", 7, "--out", tmp_path / "events" / "crm.jsonl")
    config = demo_pipeline(tmp_path, "batch", keys_section(tmp_path, backend, db), tuning="[batch]\nmax_rows = 4000")
    run(sluice_bin, "run", "--config", config, "--once")
    customers = created_customers((tmp_path / "events" / "crm.jsonl").read_text().splitlines())
    chosen = random.Random(5).sample(customers, 300)
    subjects = tmp_path / "subjects.csv"
    # As a spreadsheet exports it: a byte-order mark, a header, a second column.
    subjects.write_text("\ufeffid,reason\n" + "".join(f"{c},art17\n" for c in chosen), encoding="utf-8")
    args = ["forget", "--config", config, "--subjects-file", subjects, "--request-id", "BATCH-1"]
    dry = json.loads(run(sluice_bin, *args, "--dry-run").stdout)
    tokens = set(dry["subject_tokens"])
    assert len(tokens) == 300 and dry["keys_destroyed"] == 300 and dry["subjects_without_rows"] == 0
    lake = tmp_path / "lake"
    tables = {"customers", "accounts", "payments", "contact_attempts"}
    rows_before = {t: read_delta(lake / "tables" / t).num_rows for t in tables}

    # Interrupted (abort, like kill -9) at every step in turn, each run resuming the last one,
    # then run to the end.
    steps = ["after-shred", "before-commit:accounts", "after-commit:contact_attempts", "after-table:customers",
             "before-commit:vault", "after-commit:vault", "after-verify", "after-audit"]
    for step in steps:
        aborted = run(sluice_bin, *args, "--settle-ms", 0, check=False, env=dict(os.environ, SLUICE_FAILPOINT=step))
        assert aborted.returncode == -signal.SIGABRT, f"{step}: the job did not reach it ({aborted.returncode}): {aborted.stderr[-2000:]}"
    result = run(sluice_bin, *args, "--settle-ms", 0)
    receipt = json.loads(result.stdout)
    assert receipt["verification"] == {"passed": True, "findings": []}, receipt["verification"]
    assert receipt["keys_destroyed"] == 300 and receipt["tombstones_written"] == 300
    assert receipt["subjects_without_rows"] == 0, "whom each table held survives the interruptions"
    for t in tables | {"vault", "quarantine"}:
        assert receipt["tables"][t]["rows_removed"] == dry["tables"][t]["rows_removed"], f"{t}: receipt counts after {len(steps)} aborts"
        assert receipt["tables"][t]["files_removed"] == dry["tables"][t]["files_removed"], t
    import deltalake

    for t in tables:
        table_dir = lake / "tables" / t
        assert not files_holding(table_dir, "_subject", tokens), t
        history = [h["operation"] for h in deltalake.DeltaTable(str(table_dir)).history()]
        assert history.count("DELETE") == 1, f"{t}: one erasure commit: each file rewritten once"
        history_free_of(table_dir, tokens)
        assert read_delta(table_dir).num_rows == rows_before[t] - dry["tables"][t]["rows_removed"], t
    assert not files_holding(lake / "vault", "subject_token", tokens)
    audit = read_delta(lake / "audit" / "erasures").to_pylist()
    assert [a["job_id"] for a in audit] == [receipt["job_id"]] and audit[0]["subjects"] == 300
    assert audit[0]["rows_removed"] == sum(dry["tables"][t]["rows_removed"] for t in tables | {"quarantine"})


def test_a_running_daemon_keeps_going_through_an_erasure_and_drops_the_subjects_events(sluice_bin, tmp_path):
    from conftest import wait_until

    import deltalake

    events = tmp_path / "events"
    events.mkdir()
    run(sluice_bin, "generate", "--events", 6000, "--seed", 3, "--out", tmp_path / "crm.jsonl")
    lines = (tmp_path / "crm.jsonl").read_text().splitlines()
    (events / "crm-000.jsonl").write_text("\n".join(lines) + "\n")
    config = demo_pipeline(tmp_path, "live", keys_section(tmp_path, "sqlite") + "erasure_refresh_ms = 300\n",
                           source="poll_ms = 100", tuning="[batch]\nmax_age_ms = 300")
    lake = tmp_path / "lake"

    def committed(stream, size):
        def check():
            try:
                return deltalake.DeltaTable(str(lake / "tables" / "customers")).transaction_version(f"sluice/live/{stream}") == size
            except Exception:  # noqa: BLE001 - the table may not exist yet
                return False
        return check

    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen([str(sluice_bin), "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until(committed("crm-000.jsonl", (events / "crm-000.jsonl").stat().st_size), 120, "the daemon to commit the first file")
        customers = created_customers(lines)
        erased = customers[:40]
        subjects = tmp_path / "ids.txt"
        subjects.write_text("\n".join(map(str, erased)) + "\n")
        receipt = json.loads(run(sluice_bin, "forget", "--config", config, "--subjects-file", subjects).stdout)
        assert receipt["verification"]["passed"], receipt["verification"]
        tokens = set(receipt["subject_tokens"])

        # The same events again, appended to the file the daemon is following (a replay): its
        # next commits come after the erasure's on its old snapshot (it must catch up, not
        # fail), and nothing of theirs lands.
        first_size = (events / "crm-000.jsonl").stat().st_size
        with open(events / "crm-000.jsonl", "a") as f:
            f.write("\n".join(lines) + "\n")
        wait_until(committed("crm-000.jsonl", (events / "crm-000.jsonl").stat().st_size), 120, "the daemon to commit the replayed events")
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
        # Its snapshot predated the erasure, whose history removal took the commits it was read
        # from: it reads the table again from the checkpoint and goes on.
        assert "reading the table again before committing" in (tmp_path / "daemon.log").read_text(), "the daemon's snapshot predated the erasure"
        for t in ("customers", "accounts", "payments", "contact_attempts"):
            table = read_delta(lake / "tables" / t)
            assert not set(table.column("_subject").to_pylist()) & tokens, t
            offsets = [int(p.rsplit(":", 1)[1]) for p in table.column("_position").to_pylist()]
            assert any(o > first_size for o in offsets), f"{t}: others' replayed rows land"
        assert not files_holding(lake / "vault", "subject_token", tokens)
    finally:
        daemon.kill()
        daemon.wait()
        log.close()


def test_statistics_that_name_a_subject_in_an_old_commit_are_removed_by_the_erasure(sluice_bin, tmp_path):
    """Tables written before statistics were restricted: the pipeline restricts them when it
    opens the table, and an erasure removes the old commits that still name the subject (the
    history before its commit, with the files only those versions held)."""
    import deltalake

    (tmp_path / "events").mkdir()
    run(sluice_bin, "generate", "--events", 300, "--seed", 9, "--out", tmp_path / "events" / "crm.jsonl")
    config = demo_pipeline(tmp_path, "legacy", keys_section(tmp_path, "sqlite"))
    run(sluice_bin, "run", "--config", config, "--once")
    customers = tmp_path / "lake" / "tables" / "customers"
    restricted = deltalake.DeltaTable(str(customers)).metadata().configuration["delta.dataSkippingStatsColumns"]
    assert restricted.split(",") == ["_op", "_ingested_at", "_source_db"]

    # An old-style commit: statistics on every column, a row of customer 1 among them.
    dt = deltalake.DeltaTable(str(customers))
    dt.alter.set_table_properties({"delta.dataSkippingStatsColumns": ",".join(dt.schema().to_arrow().names)})
    victim = created_customers((tmp_path / "events" / "crm.jsonl").read_text().splitlines())[0]
    token = json.loads(run(sluice_bin, "forget", "--config", config, "--subject", victim, "--dry-run").stdout)["subject_tokens"][0]
    row = [r for r in read_delta(customers).to_pylist() if r["_subject"] == token][:1]
    assert row
    deltalake.write_deltalake(str(customers), __import__("pyarrow").Table.from_pylist(row, schema=read_delta(customers).schema), mode="append")
    assert any(token in f.read_text() for f in (customers / "_delta_log").glob("*.json")), "positive control"

    result = run(sluice_bin, "forget", "--config", config, "--subject", victim, "--settle-ms", 0)
    receipt = json.loads(result.stdout)
    assert receipt["verification"] == {"passed": True, "findings": []}, receipt["verification"]
    table = receipt["tables"]["customers"]
    assert table["log_files_removed"] > 0 and table["history_removed_before"] is not None, table
    assert not any(token.encode() in f.read_bytes() for f in (customers / "_delta_log").iterdir())
    assert not [r for r in read_delta(customers).to_pylist() if r["_subject"] == token]
    assert len(read_delta(tmp_path / "lake" / "audit" / "erasures").to_pylist()) == 1

    # The pipeline puts the restriction back when it opens the table.
    run(sluice_bin, "run", "--config", config, "--once")
    assert deltalake.DeltaTable(str(customers)).metadata().configuration["delta.dataSkippingStatsColumns"] == restricted
