"""The benchmark's plain-Python reference: the demo policies (schemas/demo) applied to Debezium
events, written to Delta tables and a vault — what a competent data engineer would write in an
afternoon with the standard tools: `json`, `hmac`, `cryptography` (AES-GCM), `pyarrow`,
`deltalake`. One process.

Same work as sluice per event: HMAC-SHA256 tokens (domain-separated like sluice's), a random
AES-256 key per subject (wrapped by the master key, kept in SQLite, created on first sight),
AES-GCM envelopes bound to table/column/subject, vaulted values, derived and generalized
fields, metadata columns, date partitions, batched Delta appends. Not done (sluice does): exactly
once (positions committed with the data), quarantine, schema checks, erasure tombstones.

Usage: python3 sanitize.py EVENTS_FILE OUT_DIR MASTER_KEY_FILE
"""

import datetime
import hmac
import json
import os
import sqlite3
import struct
import sys
import time

import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from deltalake import write_deltalake

BATCH_ROWS = 200_000
EPOCH = datetime.date(1970, 1, 1)
TS = pa.timestamp("us", tz="UTC")


def domain_prefix(domain):
    d = domain.encode()
    return struct.pack(">Q", len(d)) + d


class Keys:
    """Per-subject data keys: created on first sight, wrapped by the master key, written to
    SQLite in one transaction per batch (before the batch's data is written)."""

    def __init__(self, path, master):
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS subject_keys (token TEXT PRIMARY KEY, key_id BLOB, wrapped BLOB)")
        self.master = AESGCM(master)
        self.cache = {}
        self.pending = []
        self.token_key = os.urandom(32)

    def key(self, token):
        k = self.cache.get(token)
        if k is None:
            material, key_id = os.urandom(32), os.urandom(16)
            nonce = os.urandom(12)
            wrapped = b"\x01" + key_id + nonce + self.master.encrypt(nonce, material, b"sluice:keywrap:v2\0" + key_id + b"subject\0" + token.encode())
            self.pending.append((token, key_id, wrapped))
            k = self.cache[token] = (key_id, AESGCM(material))
        return k

    def flush(self):
        if self.pending:
            with self.db:
                self.db.executemany("INSERT OR IGNORE INTO subject_keys VALUES (?, ?, ?)", self.pending)
            self.pending.clear()


class Sanitizer:
    def __init__(self, keys):
        self.keys = keys
        self.prefixes = {d: domain_prefix(d) for d in ("customer", "account", "payment", "contact")}

    def token(self, domain, value):
        if value is None:
            return None
        return hmac.digest(self.keys.token_key, self.prefixes[domain] + str(value).strip().encode(), "sha256")[:16].hex()

    def seal(self, token, table, column, value):
        if value is None:
            return None
        key_id, aes = self.keys.key(token)
        nonce = os.urandom(12)
        aad = b"sluice:field:v1\0" + table.encode() + b"\0" + column.encode() + b"\0" + token.encode() + b"\0"
        return b"\x01" + key_id + nonce + aes.encrypt(nonce, str(value).encode(), aad)


def age_band(dob, event_ms):
    if dob is None:
        return None
    year = datetime.datetime.fromtimestamp(event_ms / 1000, datetime.timezone.utc).year
    age = year - int(dob[:4])
    bands = [18, 25, 35, 45, 55, 65]
    if age < bands[0]:
        return "<18"
    for lo, hi in zip(bands, bands[1:]):
        if age < hi:
            return f"{lo}-{hi - 1}"
    return "65+"


def bucket(x, edges=(1, 10000, 50000, 100000)):
    if x is None:
        return None
    if x < edges[0]:
        return f"<{edges[0]}"
    for lo, hi in zip(edges, edges[1:]):
        if x < hi:
            return f"[{lo},{hi})"
    return f">={edges[-1]}"


def email_domain(v):
    if v is None or "@" not in v:
        return None
    local, dom = v.rsplit("@", 1)
    return dom.strip().lower() if local and dom.strip() else None


def prefix(v, n):
    if v is None:
        return None
    v = v.strip()
    return v[:n] if len(v) > n else None


def ms(v):
    return None if v is None else v * 1000


# Per table: output columns (name, arrow type, function of (row, token, event_ms)).
def rules(s):
    tok = s.token

    def enc(table, column):
        return lambda r, t, e: s.seal(t, table, column, r.get(column))

    return {
        "customers": [
            ("id_token", pa.string(), lambda r, t, e: t),
            ("has_email", pa.bool_(), lambda r, t, e: r.get("email") is not None),
            ("email_domain", pa.string(), lambda r, t, e: email_domain(r.get("email"))),
            ("has_phone", pa.bool_(), lambda r, t, e: r.get("phone") is not None),
            ("national_id_enc", pa.binary(), enc("customers", "national_id")),
            ("age_band", pa.string(), lambda r, t, e: age_band(r.get("date_of_birth"), e)),
            ("postcode_area", pa.string(), lambda r, t, e: prefix(r.get("postcode"), 2)),
            ("vulnerable", pa.bool_(), lambda r, t, e: r.get("vulnerability_flag")),
            ("has_vulnerability_note", pa.bool_(), lambda r, t, e: r.get("vulnerability_note") is not None),
            ("created_at", TS, lambda r, t, e: ms(r.get("created_at"))),
        ],
        "accounts": [
            ("account_token", pa.string(), lambda r, t, e: tok("account", r.get("id"))),
            ("customer_id_token", pa.string(), lambda r, t, e: t),
            ("product", pa.string(), lambda r, t, e: r.get("product")),
            ("iban_enc", pa.binary(), enc("accounts", "iban")),
            ("opened_year", pa.int32(), lambda r, t, e: None if r.get("opened_on") is None else int(r["opened_on"][:4])),
            ("balance_pence", pa.int64(), lambda r, t, e: r.get("balance_pence")),
            ("arrears_pence", pa.int64(), lambda r, t, e: r.get("arrears_pence")),
            ("arrears_band", pa.string(), lambda r, t, e: bucket(r.get("arrears_pence"))),
            ("credit_limit_pence", pa.int64(), lambda r, t, e: r.get("credit_limit_pence")),
            ("status", pa.string(), lambda r, t, e: r.get("status")),
        ],
        "payments": [
            ("payment_token", pa.string(), lambda r, t, e: tok("payment", r.get("id"))),
            ("account_id_token", pa.string(), lambda r, t, e: tok("account", r.get("account_id"))),
            ("customer_id_token", pa.string(), lambda r, t, e: t),
            ("amount_pence", pa.int64(), lambda r, t, e: r.get("amount_pence")),
            ("channel", pa.string(), lambda r, t, e: r.get("channel")),
            ("paid_by_card", pa.bool_(), lambda r, t, e: r.get("card_number") is not None),
            ("paid_at", TS, lambda r, t, e: ms(r.get("paid_at"))),
        ],
        "contact_attempts": [
            ("contact_token", pa.string(), lambda r, t, e: tok("contact", r.get("id"))),
            ("customer_id_token", pa.string(), lambda r, t, e: t),
            ("channel", pa.string(), lambda r, t, e: r.get("channel")),
            ("has_phone", pa.bool_(), lambda r, t, e: r.get("phone") is not None),
            ("outcome", pa.string(), lambda r, t, e: r.get("outcome")),
            ("agent_notes_length", pa.int32(), lambda r, t, e: None if r.get("agent_notes") is None else len(r["agent_notes"])),
            ("attempted_at", TS, lambda r, t, e: ms(r.get("attempted_at"))),
        ],
    }


SUBJECT = {"customers": "id", "accounts": "customer_id", "payments": "customer_id", "contact_attempts": "customer_id"}
VAULTED = {"customers": ("full_name", "email", "phone", "street_address"), "contact_attempts": ("phone",)}
META = [("_op", pa.string()), ("_subject", pa.string()), ("_source_ts", TS), ("_position", pa.string()),
        ("_ingested_at", TS), ("_date", pa.date32()), ("_source_db", pa.string())]
VAULT = pa.schema([("subject_token", pa.string()), ("table", pa.string()), ("column", pa.string()),
                   ("ciphertext", pa.binary()), ("_op", pa.string()), ("_source_ts", TS), ("_ingested_at", TS)])


def main(events_path, out, master_file):
    master = bytes.fromhex(open(master_file).read().strip())
    os.makedirs(out, exist_ok=True)
    keys = Keys(os.path.join(out, "keys.db"), master)
    s = Sanitizer(keys)
    table_rules = rules(s)
    schemas = {t: pa.schema([(n, ty) for n, ty, _ in rs] + META) for t, rs in table_rules.items()}
    buffers = {t: [] for t in table_rules}
    vault = []
    stream = os.path.basename(events_path)

    def flush():
        keys.flush()  # keys durable before the data that needs them
        now = int(time.time() * 1_000_000)
        for table, rows in buffers.items():
            if rows:
                columns = list(zip(*rows))
                arrays = [pa.array(c, type=f.type) for c, f in zip(columns, schemas[table])]
                batch = pa.Table.from_arrays(arrays, schema=schemas[table])
                batch = batch.set_column(batch.schema.get_field_index("_ingested_at"), "_ingested_at",
                                         pa.array([now] * batch.num_rows, type=TS))
                write_deltalake(os.path.join(out, "tables", table), batch, mode="append", partition_by=["_date"])
                rows.clear()
        if vault:
            write_deltalake(os.path.join(out, "vault"), pa.Table.from_pylist(vault, schema=VAULT), mode="append")
            vault.clear()

    pending = 0
    offset = 0
    with open(events_path, "rb") as f:
        for line in f:
            offset += len(line)
            event = json.loads(line)
            source = event["source"]
            table = source["table"]
            rs = table_rules.get(table)
            if rs is None:
                continue
            op = event["op"]
            row = event["before"] if op == "d" else event["after"]
            event_ms = source.get("ts_ms") or event.get("ts_ms")
            token = s.token("customer", row.get(SUBJECT[table]))
            values = [fn(row, token, event_ms) for _, _, fn in rs]
            values += [op, token, event_ms * 1000, f"{stream}:{offset}", 0,
                       (EPOCH + datetime.timedelta(days=event_ms // 86_400_000)), source.get("db")]
            buffers[table].append(values)
            if op != "d":
                for column in VAULTED.get(table, ()):
                    ct = s.seal(token, table, column, row.get(column))
                    if ct is not None:
                        vault.append({"subject_token": token, "table": table, "column": column, "ciphertext": ct,
                                      "_op": op, "_source_ts": event_ms * 1000, "_ingested_at": 0})
            pending += 1
            if pending >= BATCH_ROWS:
                flush()
                pending = 0
    flush()


if __name__ == "__main__":
    main(*sys.argv[1:4])
