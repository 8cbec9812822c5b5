"""A broker that can stall: a TCP relay in front of the local broker that holds every byte.

tansu keeps its data in memory, so "the broker stopped 20 s and came back with its data"
cannot be played by stopping it. Holding every byte between the clients and a live broker
can: to the clients it is a broker that stops answering, then answers again with nothing
lost. The chaos benchmark (``bench/chaos.py``) and the failure tests
(``tests/integration/test_failures.py``) stall the pipeline with it.
"""

from __future__ import annotations

import socket
import threading

from meterflow.local.broker import LocalBroker
from meterflow.local.service import LOOPBACK


class StallingProxy:
    """A TCP relay on ``port`` to ``target`` (both on 127.0.0.1); clearing ``flowing``
    holds every byte in both directions until it is set again."""

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        self.flowing = threading.Event()
        self.flowing.set()
        self.server = socket.create_server((LOOPBACK, port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.target))
            except OSError:  # the broker itself is down: so is the relay
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def close(self) -> None:
        """Accept no more connections (those relayed end when either side closes)."""
        self.server.close()


class ProxiedBroker(LocalBroker):
    """tansu advertising the proxy's port, so every client's traffic goes through it."""

    proxy_port: int = 0

    def command(self) -> list[str]:
        command = super().command()
        command[-1] = f"tcp://{LOOPBACK}:{self.proxy_port}"
        return command
