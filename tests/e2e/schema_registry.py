"""A TEST DOUBLE of a Confluent Schema Registry: the REST calls a producer and a consumer make
(register a schema under a subject, look one up, fetch one by id), in memory, with HTTP Basic
auth. No real registry installs from the package registries we may use (Karapace is not on PyPI;
Confluent's and Apicurio's are Java from Maven), so the tests run this one; the schemas in it are
registered by an independent client (confluent-kafka's AvroSerializer), never by sluice."""

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class SchemaRegistryDouble:
    def __init__(self, username, password):
        self.credentials = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.schemas = {}  # id → {"schema", "schemaType"}
        self.subjects = {}  # subject → [id, …]
        self.fetched = []  # ids fetched by GET /schemas/ids/{id}
        self.lock = threading.Lock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorized(self):
                if self.headers.get("Authorization") == registry.credentials:
                    return True
                self.send(401, {"error_code": 40101, "message": "Unauthorized"})
                return False

            def do_GET(self):
                if not self.authorized():
                    return
                path = self.path.split("?")[0]
                if m := re.fullmatch(r"/schemas/ids/(\d+)", path):
                    registry.fetched.append(int(m[1]))
                    found = registry.schemas.get(int(m[1]))
                    return self.send(200, found) if found else self.send(404, {"error_code": 40403, "message": "Schema not found"})
                if m := re.fullmatch(r"/subjects/([^/]+)/versions/latest", path):
                    ids = registry.subjects.get(m[1])
                    if not ids:
                        return self.send(404, {"error_code": 40401, "message": "Subject not found"})
                    return self.send(200, {"subject": m[1], "version": len(ids), "id": ids[-1], **registry.schemas[ids[-1]]})
                self.send(404, {"error_code": 404, "message": "not found"})

            def do_POST(self):
                if not self.authorized():
                    return
                path = self.path.split("?")[0]
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                entry = {"schema": body.get("schema"), "schemaType": body.get("schemaType", "AVRO")}
                if m := re.fullmatch(r"/subjects/([^/]+)/versions", path):
                    with registry.lock:
                        sid = next((i for i, s in registry.schemas.items() if s["schema"] == entry["schema"]), None)
                        if sid is None:
                            sid = len(registry.schemas) + 1
                            registry.schemas[sid] = entry
                        ids = registry.subjects.setdefault(m[1], [])
                        if sid not in ids:
                            ids.append(sid)
                    return self.send(200, {"id": sid})
                if m := re.fullmatch(r"/subjects/([^/]+)", path):
                    for version, sid in enumerate(registry.subjects.get(m[1], []), 1):
                        if registry.schemas[sid]["schema"] == entry["schema"]:
                            return self.send(200, {"subject": m[1], "version": version, "id": sid, **entry})
                    return self.send(404, {"error_code": 40403, "message": "Schema not found"})
                self.send(404, {"error_code": 404, "message": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
