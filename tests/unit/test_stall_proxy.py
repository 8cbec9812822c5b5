"""The stalling relay the failure tests and the chaos benchmark put in front of the broker
(meterflow/local/stall_proxy.py): to a client, a stall is a broker that stops answering,
and what was sent meanwhile arrives, in order, once it ends."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from helpers import free_port

from meterflow.local.stall_proxy import StallingProxy


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that sends back what it receives; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = server.accept()
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def receive(client: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := client.recv(size - len(data))):
        data += chunk
    return data


def test_a_stall_holds_every_byte_until_it_ends_and_loses_none() -> None:
    with echo_server() as target:
        proxy = StallingProxy(free_port(), target)
        port = proxy.server.getsockname()[1]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"before")
                assert receive(client, 6) == b"before"

                proxy.flowing.clear()
                client.sendall(b"during")
                client.settimeout(0.5)  # to the client, a broker that stopped answering
                with pytest.raises(TimeoutError):
                    client.recv(64)

                proxy.flowing.set()
                client.settimeout(10)
                client.sendall(b"after")
                assert receive(client, 11) == b"duringafter"
        finally:
            proxy.close()
