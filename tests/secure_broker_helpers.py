"""A Kafka that requires SCRAM over TLS for the tests: tansu behind a TLS and SASL front.

Why a front: tansu 0.6 (the local broker) cannot play a secured Kafka by itself. Its
``--authentication`` offers only SCRAM, whose credentials it reads from its storage engine,
and the one engine its build has (``dynostore``: ``memory://``, ``s3://``) stores no SCRAM
credential (``upsert_user_scram_credential`` is a no-op, ``user_scram_credential`` returns
none), so ``tansu user create`` answers OK and no user can ever log in; its ``--cert`` and
``--key`` are parsed, but the TLS acceptor they make is never used, so it still speaks plain
TCP (docs/operations.md, "A secured Kafka"). So the broker is a plain tansu, and
:class:`SecureFront`, in front of it, is the Kafka the clients see: TLS with a server
certificate from a CA the test makes (and, asked for, client certificates: mTLS), then
Kafka's SASL handshake and SCRAM-SHA-512/256 exchange (RFC 5802 and 7677) checked against
its users, then every byte relayed. The clients do real TLS and real SCRAM; tansu
advertises the front's address, so every connection goes through it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import secrets
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import free_port

from meterflow.local.service import LOOPBACK
from meterflow.local.stall_proxy import ProxiedBroker

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58
HASHES = {"SCRAM-SHA-512": hashlib.sha512, "SCRAM-SHA-256": hashlib.sha256}
ITERATIONS = 4096


# -- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, the broker's certificate and key (for 127.0.0.1), a client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_tls_files(folder: Path) -> TlsFiles:
    """A throw-away CA and the certificates it signs, written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meterflow test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(name: str, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    files = TlsFiles(
        *(folder / n for n in ("ca.pem", "broker.pem", "broker.key", "client.pem", "client.key"))
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for (cert_path, key_path), (cert, key) in (
        ((files.server_cert, files.server_key), issue(LOOPBACK, server=True)),
        ((files.client_cert, files.client_key), issue("meterflow-client", server=False)),
    ):
        cert_path.write_bytes(cert)
        key_path.write_bytes(key)
        key_path.chmod(0o600)
    return files


# -- SCRAM (RFC 5802), the server's side ----------------------------------------------------


@dataclass
class _Scram:
    """One SCRAM exchange: ``first`` answers the client-first message, ``final`` checks
    the client's proof and returns the server's signature (None: refused)."""

    mechanism: str
    users: dict[str, str]
    bare: str = ""
    server_first: str = ""
    salted: bytes = b""

    def first(self, message: str) -> str | None:
        header, _, self.bare = message.partition(",,")  # gs2 header "n,," (no binding)
        fields = dict(part.split("=", 1) for part in self.bare.split(",") if "=" in part)
        user = fields.get("n", "").replace("=2C", ",").replace("=3D", "=")
        nonce = fields.get("r", "")
        password = self.users.get(user)
        salt = hashlib.sha256(f"meterflow-test:{user}".encode()).digest()[:16]
        # An unknown user gets the same exchange, and fails at the proof, as Kafka does.
        self.salted = hashlib.pbkdf2_hmac(
            HASHES[self.mechanism]().name,
            (password if password is not None else secrets.token_hex(16)).encode(),
            salt,
            ITERATIONS,
        )
        server_nonce = nonce + secrets.token_urlsafe(18)
        self.server_first = f"r={server_nonce},s={base64.b64encode(salt).decode()},i={ITERATIONS}"
        return self.server_first if header == "n" and nonce else None

    def final(self, message: str) -> str | None:
        without_proof, _, proof = message.rpartition(",p=")
        digest = HASHES[self.mechanism]
        client_key = hmac.new(self.salted, b"Client Key", digest).digest()
        stored_key = digest(client_key).digest()
        auth_message = f"{self.bare},{self.server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, digest).digest()
        try:
            given = base64.b64decode(proof)
        except ValueError:
            return None
        recovered = bytes(a ^ b for a, b in zip(given, signature, strict=False))
        if len(given) != len(signature) or not hmac.compare_digest(
            digest(recovered).digest(), stored_key
        ):
            return None
        server_key = hmac.new(self.salted, b"Server Key", digest).digest()
        return "v=" + base64.b64encode(hmac.new(server_key, auth_message, digest).digest()).decode()


# -- the front ------------------------------------------------------------------------------


def _string(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">h", -1)
    raw = value.encode()
    return struct.pack(">h", len(raw)) + raw


@dataclass
class SecureFront:
    """TLS, then SASL/SCRAM, on ``port``; then a relay to the broker on ``target``."""

    port: int
    target: int
    tls: TlsFiles
    users: dict[str, str]
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-512", "SCRAM-SHA-256")
    require_client_cert: bool = False
    #: Every authentication refused, as "user mechanism" (what the test may assert on).
    refused: list[str] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _server: asyncio.base_events.Server | None = None

    def start(self) -> SecureFront:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        if self.require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.tls.ca)
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._connection, LOOPBACK, self.port, ssl=context)
            )
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=serve, daemon=True, name="secure-front").start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Close the listener and every relayed connection."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            upstream = await asyncio.open_connection(LOOPBACK, self.target)
            if await self._authenticate(reader, writer, upstream):
                await asyncio.gather(
                    self._pump(reader, upstream[1]), self._pump(upstream[0], writer)
                )
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.CancelledError):
            pass  # a client gone, a refused handshake, or the front stopping
        finally:
            for end in (writer, upstream[1] if upstream else None):
                if end is not None:
                    with contextlib.suppress(Exception):
                        end.close()

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            with contextlib.suppress(Exception):
                sink.close()

    async def _authenticate(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> bool:
        """Kafka's SASL v1 sequence; True once the client proved who it is."""
        scram: _Scram | None = None
        while True:
            (size,) = struct.unpack(">i", await reader.readexactly(4))
            frame = await reader.readexactly(size)
            api_key, version, correlation = struct.unpack(">hhi", frame[:8])
            (client_len,) = struct.unpack(">h", frame[8:10])
            body = frame[10 + max(client_len, 0) :]
            if api_key == API_VERSIONS:  # the broker's own answer
                upstream[1].write(struct.pack(">i", size) + frame)
                (answer_size,) = struct.unpack(">i", await upstream[0].readexactly(4))
                writer.write(
                    struct.pack(">i", answer_size) + await upstream[0].readexactly(answer_size)
                )
            elif api_key == SASL_HANDSHAKE:
                (length,) = struct.unpack(">h", body[:2])
                mechanism = body[2 : 2 + length].decode()
                error = 0 if mechanism in self.mechanisms else UNSUPPORTED_SASL_MECHANISM
                scram = _Scram(mechanism, self.users) if not error else None
                answer = struct.pack(">h", error) + struct.pack(">i", len(self.mechanisms))
                answer += b"".join(_string(m) for m in self.mechanisms)
                writer.write(struct.pack(">ii", 4 + len(answer), correlation) + answer)
            elif api_key == SASL_AUTHENTICATE and version <= 1 and scram is not None:
                (length,) = struct.unpack(">i", body[:4])
                message = body[4 : 4 + length].decode()
                reply = scram.first(message) if not scram.server_first else scram.final(message)
                done = scram.server_first and reply is not None and reply.startswith("v=")
                if reply is None:
                    user = dict(p.split("=", 1) for p in scram.bare.split(",") if "=" in p)
                    self.refused.append(f"{user.get('n', '')} {scram.mechanism}")
                    text = (
                        "Authentication failed during authentication due to invalid "
                        f"credentials with SASL mechanism {scram.mechanism}"
                    )
                    answer = struct.pack(">h", SASL_AUTHENTICATION_FAILED) + _string(text)
                    answer += struct.pack(">i", 0)
                else:
                    answer = struct.pack(">h", 0) + _string(None)
                    answer += struct.pack(">i", len(reply.encode())) + reply.encode()
                if version >= 1:
                    answer += struct.pack(">q", 0)
                writer.write(struct.pack(">ii", 4 + len(answer), correlation) + answer)
                await writer.drain()
                if reply is None:
                    return False
                if done:
                    return True
            else:  # anything else before authenticating: Kafka closes the connection
                return False
            await writer.drain()


# -- tansu behind the front -----------------------------------------------------------------


@dataclass
class SecureKafka:
    """A running broker that requires SCRAM over TLS (and client certificates with mTLS)."""

    bootstrap: str
    tls: TlsFiles
    front: SecureFront
    username: str
    password: str
    mechanism: str

    def env(self, password: str | None = None, **extra: str) -> dict[str, str]:
        """meterflow's variables for this broker (``password``: another one, say a wrong one)."""
        values = {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": self.mechanism,
            "KAFKA_SASL_USERNAME": self.username,
            "KAFKA_SASL_PASSWORD": self.password if password is None else password,
            "KAFKA_SSL_CA_LOCATION": str(self.tls.ca),
        }
        if self.front.require_client_cert:
            values["KAFKA_SSL_CERTIFICATE_LOCATION"] = str(self.tls.client_cert)
            values["KAFKA_SSL_KEY_LOCATION"] = str(self.tls.client_key)
        return {**values, **extra}


@contextlib.contextmanager
def secure_kafka(
    folder: Path,
    mechanism: str = "SCRAM-SHA-512",
    require_client_cert: bool = False,
) -> Iterator[SecureKafka]:
    """tansu on a private port, advertising the front's, and the front; both stopped after."""
    tls = make_tls_files(folder / "tls")
    username, password = "meterflow", secrets.token_urlsafe(12)
    front_port = free_port()
    broker = ProxiedBroker(free_port(), folder / "broker.log")
    broker.proxy_port = front_port
    broker.start()
    front = SecureFront(
        front_port, broker.port, tls, {username: password}, require_client_cert=require_client_cert
    ).start()
    try:
        yield SecureKafka(f"{LOOPBACK}:{front_port}", tls, front, username, password, mechanism)
    finally:
        front.stop()
        broker.stop()


def environment_without_kafka() -> dict[str, str]:
    """The process environment without any KAFKA_* variable a developer may have set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
