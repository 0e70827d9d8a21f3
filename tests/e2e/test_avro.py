"""The real Debezium corpus as Avro through Kafka with a Schema Registry: every change event that
carries its Connect schema is converted here the way Confluent's AvroConverter does (Connect
struct → Avro record, `connect.name` on the field types, decimals as the `decimal` logical
type), registered and serialized by an independent client (confluent-kafka's AvroSerializer on
fastavro), produced to a real Kafka-protocol broker, and read by sluice with `format = "avro"`.
Every value Python deltalake reads back must equal what the JSON run's independent decoder
expects. Unreadable messages are quarantined; a wrong registry password stops the run with an
error that names the registry, never the password."""

import base64
import decimal
import itertools
import json
import os

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from conftest import run, write_config
from kafka_broker import Tansu
from schema_registry import SchemaRegistryDouble
from test_debezium_corpus import (check_rows, contradicts, corpus_lines, derive_policies, fate, image_fields, unwrap,
                                  write_policies)

PRIMITIVES = {"int8": "int", "int16": "int", "int32": "int", "int64": "long", "float32": "float",
              "float64": "double", "boolean": "boolean", "string": "string", "bytes": "bytes",
              # Spellings some hand-written schemas in the corpus use.
              "double": "double", "float": "float", "int": "int", "long": "long"}
DECIMAL = "org.apache.kafka.connect.data.Decimal"


def avro_schema(connect, names):
    """Confluent's AvroData mapping of a Connect schema (records get fresh names)."""
    t, name = connect["type"], connect.get("name")
    if t == "struct":
        avro = {"type": "record", "name": f"r{next(names)}", "fields": [
            dict({"name": f["field"], "type": avro_schema(f, names)}, **({"default": None} if f.get("optional") else {}))
            for f in connect["fields"]]}
    elif t == "array":
        avro = {"type": "array", "items": avro_schema(connect["items"], names)}
    elif t == "map":
        avro = {"type": "map", "values": avro_schema(connect["values"], names)}
    elif name == DECIMAL:
        params = connect["parameters"]
        avro = {"type": "bytes", "scale": int(params["scale"]), "precision": int(params.get("connect.decimal.precision", 38)),
                "connect.version": 1, "connect.parameters": params, "connect.name": name, "logicalType": "decimal"}
    elif name:
        avro = {"type": PRIMITIVES[t], "connect.name": name}
    else:
        avro = PRIMITIVES[t]
    return ["null", avro] if connect.get("optional") else avro


def avro_value(connect, value):
    """A JSON-converter value as fastavro takes it for the schema above."""
    if value is None:
        return None
    t = connect["type"]
    if t == "struct":
        return {f["field"]: avro_value(f, value.get(f["field"])) for f in connect["fields"]}
    if t == "array":
        return [avro_value(connect["items"], v) for v in value]
    if t == "map":
        return {k: avro_value(connect["values"], v) for k, v in value.items()}
    if connect.get("name") == DECIMAL:
        n = int.from_bytes(base64.b64decode(value), "big", signed=True)
        return decimal.Decimal(n).scaleb(-int(connect["parameters"]["scale"]))
    if t == "bytes":
        return base64.b64decode(value)
    if t in ("float32", "float64", "float", "double"):
        return float(value)
    return value


def avro_source(broker, registry, topics, password_env):
    # A group of its own per run: the failed run's member would hold partitions until it times out.
    return (f'kind = "kafka"\nbrokers = "{broker.address}"\ngroup_id = "avro-{password_env}"\ntopics = {json.dumps(topics)}\n'
            f'format = "avro"\nschema_registry = {{ url = "{registry.url}", username_env = "SLUICE_TEST_SR_USER", '
            f'password_env = "{password_env}" }}')


def test_debezium_corpus_as_avro_lands_exactly(sluice_bin, tmp_path):
    policies = derive_policies()
    targets, _ = write_policies(tmp_path, policies)
    env = dict(os.environ, SLUICE_TEST_SR_USER="sluice", SLUICE_TEST_SR_PASSWORD="registry-s3cret-7f1",
               SLUICE_TEST_SR_WRONG="not-the-password")
    broker = Tansu(tmp_path / "broker").start()
    try:
        with SchemaRegistryDouble("sluice", "registry-s3cret-7f1") as registry:
            client = SchemaRegistryClient({"url": registry.url, "basic.auth.user.info": "sluice:registry-s3cret-7f1"})
            producer = Producer({"bootstrap.servers": broker.address})
            names = itertools.count()
            expected, offsets, serializers = {}, {}, {}
            for _, _, line in corpus_lines():
                schema, payload = unwrap(json.loads(line))
                f = fate(line, policies, targets)
                if schema is None or f[0] != "row":
                    continue
                # Hand-written messages whose values contradict their own schema cannot be Avro.
                image = payload.get("before") if payload["op"] == "d" else payload.get("after")
                if any(contradicts(field, (image or {}).get(c)) for c, field in image_fields(schema).items()):
                    continue
                # One topic: `--once` ends when the partitions assigned so far are read, and a
                # consumer group may hand several topics' partitions out over more than one round.
                topic = "corpus"
                key = json.dumps(schema, sort_keys=True)
                if key not in serializers:
                    serializers[key] = AvroSerializer(client, json.dumps(avro_schema(schema, names)))
                value = serializers[key](avro_value(schema, payload), SerializationContext(topic, MessageField.VALUE))
                offset = offsets.get(topic, 0)
                offsets[topic] = offset + 1
                producer.produce(topic, value=value, partition=0)
                expected[f"kafka/{topic}/0:{offset + 1}"] = (f[1], f[2])
            framed = value
            # Unreadable messages: not framed, an id the registry lacks, a datum cut short.
            bad = [b"not avro at all", b"\x00\x00\x00\x03\xe7" + framed[5:], framed[: len(framed) // 2]]
            for v in bad:
                producer.produce("corpus", value=v, partition=0)
            assert producer.flush(60) == 0
            topics = ["corpus"]
            assert len(expected) >= 15 and len(serializers) >= 5, (len(expected), len(serializers))

            # A wrong password: a clear error naming the registry, never a credential.
            config = write_config(tmp_path, None, [tmp_path / "policies"], source=avro_source(broker, registry, topics, "SLUICE_TEST_SR_WRONG"))
            failed = run(sluice_bin, "run", "--config", config, "--once", env=env, check=False)
            assert failed.returncode != 0
            assert registry.url in failed.stderr and "401" in failed.stderr, failed.stderr
            assert "not-the-password" not in failed.stderr + failed.stdout
            assert "registry-s3cret-7f1" not in failed.stderr + failed.stdout

            config = write_config(tmp_path, None, [tmp_path / "policies"], source=avro_source(broker, registry, topics, "SLUICE_TEST_SR_PASSWORD"),
                                  name="avro.toml")
            run(sluice_bin, "run", "--config", config, "--once", "--summary-json", tmp_path / "summary.json", env=env)
            # Each writer schema fetched once per pass, whatever the number of messages.
            assert len(registry.fetched) <= 3 * len(serializers) + 2
    finally:
        broker.stop(kill=True)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quarantined"] == {"malformed_avro": 2, "unknown_schema": 1}, summary["quarantined"]
    by_target = {}
    for position, (target, values) in expected.items():
        by_target.setdefault(target, {})[position] = values
    checked = check_rows(tmp_path / "lake", by_target, policies, targets)
    # Exact decimals and timestamps from their Avro encodings were among them.
    assert sum(checked.values()) >= 60 and checked["Decimal"] >= 3 and checked["datetime"] >= 3, checked
