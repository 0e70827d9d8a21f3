"""Secured Kafka end to end: the source and the `[publish]` sink over TLS with a CA file, mutual
TLS and SASL (SCRAM-SHA-512, SCRAM-SHA-256, PLAIN) through a real TLS handshake and SASL exchange
(kafka_security.py) in front of the Tansu broker; then a wrong password, an untrusted
certificate and an expired one, each a clear error naming the setting and never a secret."""

import json
import os
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from conftest import DEMO_POLICIES, assert_exactly_once, demo_events, free_port, run, target_of, write_config
from kafka_broker import Tansu
from kafka_security import SecureFront, make_certificates

PASSWORD = "kafka-s3cret-9d2"
TOPIC = "crm"


def client_security(certs, mechanism):
    return {"security.protocol": "SASL_SSL", "ssl.ca.location": str(certs / "ca.pem"),
            "ssl.certificate.location": str(certs / "client.pem"), "ssl.key.location": str(certs / "client.key"),
            "sasl.mechanism": mechanism, "sasl.username": "sluice", "sasl.password": PASSWORD}


def source(front, certs, mechanism, password_env="SLUICE_TEST_KAFKA_PASSWORD", ca="ca.pem", group="secure"):
    tls = f'tls = {{ ca_file = "{certs / ca}", cert_file = "{certs / "client.pem"}", key_file = "{certs / "client.key"}" }}'
    sasl = f'sasl = {{ mechanism = "{mechanism}", username = "sluice", password_env = "{password_env}" }}'
    return (f'kind = "kafka"\nbrokers = "127.0.0.1:{front}"\ngroup_id = "{group}"\ntopics = ["{TOPIC}"]\n'
            f'session_timeout_ms = 6000\n{tls}\n{sasl}')


def test_tls_and_sasl_source_and_publish_and_clear_refusals(sluice_bin, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    env = dict(os.environ, SLUICE_TEST_KAFKA_PASSWORD=PASSWORD, SLUICE_TEST_WRONG_PASSWORD="not-it-4c1")
    front_port, expired_port = free_port(), free_port()
    broker = Tansu(tmp_path / "broker").start(advertised=f"127.0.0.1:{front_port}")
    front = SecureFront(front_port, broker.address, certs / "server.pem", certs / "server.key",
                        client_ca=certs / "ca.pem", users={"sluice": PASSWORD})
    expired = SecureFront(expired_port, broker.address, certs / "expired.pem", certs / "expired.key",
                          client_ca=certs / "ca.pem", users={"sluice": PASSWORD})
    try:
        through_front = {"bootstrap.servers": f"127.0.0.1:{front_port}", **client_security(certs, "SCRAM-SHA-512")}
        broker.create_topic(TOPIC, 2, client=through_front)
        broker.create_topic("sanitized", 1, client=through_front)
        values = demo_events(sluice_bin, tmp_path, 400, seed=11)
        producer = Producer(through_front)
        placed = {}
        for i, value in enumerate(values):
            producer.produce(TOPIC, value=value, partition=i % 2,
                             on_delivery=lambda err, msg, i=i: placed.__setitem__(i, (msg.partition(), msg.offset())))
        assert producer.flush(60) == 0 and len(placed) == len(values)
        expected = {}
        for i, value in enumerate(values):
            partition, offset = placed[i]
            expected.setdefault(target_of(value), []).append(f"kafka/{TOPIC}/{partition}:{offset + 1}")

        # Every mechanism, with mutual TLS; the first also publishes its rows over SASL_SSL.
        for n, mechanism in enumerate(["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]):
            lake = tmp_path / f"lake-{n}"
            publish = ""
            if n == 0:
                publish = (f'\n[publish]\nkind = "kafka"\nbrokers = "127.0.0.1:{front_port}"\ntopic = "sanitized"\n'
                           f'tls = {{ ca_file = "{certs / "ca.pem"}", cert_file = "{certs / "client.pem"}", key_file = "{certs / "client.key"}" }}\n'
                           f'sasl = {{ mechanism = "{mechanism}", username = "sluice", password_env = "SLUICE_TEST_KAFKA_PASSWORD" }}\n')
            config = write_config(tmp_path, None, [DEMO_POLICIES], lake=lake, name=f"sluice-{n}.toml",
                                  source=source(front_port, certs, mechanism, group=f"secure-{n}"), extra=publish)
            result = run(sluice_bin, "--log-format", "json", "run", "--config", config, "--once", env=env)
            assert PASSWORD not in result.stdout + result.stderr
            assert_exactly_once(lake, expected)
        published = read_topic(front_port, certs, "sanitized")
        rows = sum(len(p) for p in expected.values())
        assert len(published) == rows and all(json.loads(m)["_table"] for m in published)

        # A wrong password, a CA that did not sign the broker's certificate, an expired
        # certificate: each stops the run with an error that names the setting.
        for case, text, port, expect in [
            ("wrong password", dict(password_env="SLUICE_TEST_WRONG_PASSWORD"), front_port, "source.sasl"),
            ("untrusted certificate", dict(ca="other-ca.pem"), front_port, "source.tls"),
            ("expired certificate", {}, expired_port, "source.tls"),
        ]:
            config = write_config(tmp_path, None, [DEMO_POLICIES], lake=tmp_path / "lake-refused", name="refused.toml",
                                  source=source(port, certs, "SCRAM-SHA-512", group=f"refused-{port}", **text))
            failed = run(sluice_bin, "run", "--config", config, "--once", env=env, check=False)
            assert failed.returncode != 0, case
            assert expect in failed.stderr, f"{case}: {failed.stderr}"
            assert PASSWORD not in failed.stderr + failed.stdout and "not-it-4c1" not in failed.stderr + failed.stdout, case
            check = run(sluice_bin, "check", "--config", config, env=env)
            assert PASSWORD not in check.stdout + check.stderr
    finally:
        front.close()
        expired.close()
        broker.stop(kill=True)


def read_topic(port, certs, topic):
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "check", "enable.partition.eof": True,
                         "enable.auto.commit": False, **client_security(certs, "SCRAM-SHA-512")})
    consumer.assign([TopicPartition(topic, 0, 0)])
    out = []
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "timed out reading the published topic"
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == -191:  # _PARTITION_EOF
                break
            continue
        out.append(msg.value())
    consumer.close()
    return out
