"""TLS, mutual TLS and SASL in front of the test broker. Tansu 0.6 parses `--cert`/`--key` but
never uses them, and its SCRAM users do not persist on the storage engines its PyPI build has,
so the broker runs plain behind this front end, which advertises nothing itself: Tansu is
started with the front's address as its advertised listener, so every client goes through it.

The front end does, per connection, what a secured broker does before the first request: a real
TLS handshake (Python's `ssl`, i.e. OpenSSL; optionally requiring a client certificate), then
Kafka's SASL exchange (SaslHandshake v1, SaslAuthenticate v0/v1) with PLAIN or SCRAM-SHA-256/512
per RFC 5802/7677, answering ApiVersions from the broker. Once authenticated it relays bytes
both ways. Certificates come from `cryptography`: a CA, a server certificate for 127.0.0.1, an
expired one, a client certificate, and a CA nobody trusts."""

import base64
import datetime
import hashlib
import hmac
import os
import socket
import ssl
import struct
import threading

MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def make_certificates(directory):
    """PEM files under `directory`: ca, server, expired (server, not valid any more), client,
    and other-ca (a CA that signed none of them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, key, cert):
        (directory / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def ca(stem):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(name(stem)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        write(stem, key, cert)
        return key, cert

    def leaf(stem, issuer, valid_from, valid_to, server):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(issuer[1].subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_to))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        write(stem, key, builder.sign(issuer[0], hashes.SHA256()))

    authority = ca("ca")
    ca("other-ca")
    leaf("server", authority, now - datetime.timedelta(days=1), now + datetime.timedelta(days=30), True)
    leaf("expired", authority, now - datetime.timedelta(days=30), now - datetime.timedelta(days=1), True)
    leaf("client", authority, now - datetime.timedelta(days=1), now + datetime.timedelta(days=30), False)
    return directory


def _exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _frame(sock):
    (size,) = struct.unpack(">i", _exact(sock, 4))
    return _exact(sock, size)


def _send(sock, body):
    sock.sendall(struct.pack(">i", len(body)) + body)


def _string(b):
    return struct.pack(">h", len(b)) + b


class _Scram:
    """The server side of SCRAM-SHA-256/512 (RFC 5802), without channel binding."""

    def __init__(self, mechanism, users):
        self.hash = hashlib.sha512 if mechanism.endswith("512") else hashlib.sha256
        self.users = users
        self.done = False
        self.first = None

    def step(self, data):
        if self.first is None:
            message = data.decode()
            self.first = message.split(",", 2)[2]
            attrs = dict(kv.split("=", 1) for kv in self.first.split(","))
            self.user = attrs["n"]
            if self.user not in self.users:
                return None, "unknown user"
            self.salt, self.iterations = os.urandom(16), 4096
            self.nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
            self.server_first = f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={self.iterations}"
            return self.server_first.encode(), None
        without_proof, proof = data.decode().rsplit(",p=", 1)
        if dict(kv.split("=", 1) for kv in without_proof.split(","))["r"] != self.nonce:
            return None, "nonce mismatch"
        salted = hashlib.pbkdf2_hmac(self.hash().name, self.users[self.user].encode(), self.salt, self.iterations)
        client_key = hmac.new(salted, b"Client Key", self.hash).digest()
        stored_key = self.hash(client_key).digest()
        auth_message = f"{self.first},{self.server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, self.hash).digest()
        recovered = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature))
        if self.hash(recovered).digest() != stored_key:
            return None, "invalid proof"
        server_key = hmac.new(salted, b"Server Key", self.hash).digest()
        self.done = True
        return ("v=" + base64.b64encode(hmac.new(server_key, auth_message, self.hash).digest()).decode()).encode(), None


class SecureFront:
    """Listens on 127.0.0.1:`port`; TLS with `cert`/`key` (and client certificates signed by
    `client_ca`, if given), SASL against `users` (name → password) if given; relays to `upstream`."""

    def __init__(self, port, upstream, cert, key, client_ca=None, users=None):
        self.upstream = upstream.rsplit(":", 1)
        self.users = users
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        if client_ca:
            self.context.load_verify_locations(str(client_ca))
            self.context.verify_mode = ssl.CERT_REQUIRED
        self.server = socket.create_server(("127.0.0.1", port))
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.closed = True
        self.server.close()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = None
        try:
            client = self.context.wrap_socket(client, server_side=True)
            upstream = socket.create_connection((self.upstream[0], int(self.upstream[1])))
            if self.users is not None and not self._authenticate(client, upstream):
                return
            relay = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
            relay.start()
            self._pump(client, upstream)
            relay.join()
        except (ssl.SSLError, EOFError, OSError, ValueError, KeyError):
            pass
        finally:
            client.close()
            if upstream:
                upstream.close()

    def _authenticate(self, client, upstream):
        mechanism, scram = None, None
        while True:
            frame = _frame(client)
            api_key, version, correlation = struct.unpack(">hhi", frame[:8])
            (client_id_len,) = struct.unpack(">h", frame[8:10])
            body = frame[10 + max(client_id_len, 0):]
            if api_key == 18:  # ApiVersions: the broker's answer
                _send(upstream, frame)
                _send(client, _frame(upstream))
            elif api_key == 17 and version >= 1:  # SaslHandshake
                (n,) = struct.unpack(">h", body[:2])
                mechanism = body[2:2 + n].decode()
                error = 0 if mechanism in MECHANISMS else 33
                _send(client, struct.pack(">ih", correlation, error) + struct.pack(">i", len(MECHANISMS))
                      + b"".join(_string(m.encode()) for m in MECHANISMS))
            elif api_key == 36 and mechanism:  # SaslAuthenticate
                (n,) = struct.unpack(">i", body[:4])
                token = body[4:4 + n]
                if mechanism == "PLAIN":
                    _, user, password = token.split(b"\0")
                    ok = self.users.get(user.decode()) == password.decode()
                    reply, error, done = b"", None if ok else "invalid credentials", ok
                else:
                    scram = scram or _Scram(mechanism, self.users)
                    reply, error = scram.step(token)
                    done = scram.done
                if error:
                    response = struct.pack(">ih", correlation, 58) + _string(error.encode()) + struct.pack(">i", 0)
                else:
                    response = struct.pack(">ih", correlation, 0) + struct.pack(">h", -1) + struct.pack(">i", len(reply)) + reply
                if version >= 1:
                    response += struct.pack(">q", 0)
                _send(client, response)
                if error:
                    return False
                if done:
                    return True
            else:
                return False  # anything else before authentication: refused

    @staticmethod
    def _pump(source, destination):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                destination.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, destination):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
