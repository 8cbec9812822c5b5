"""A TCP relay that can stall a broker, for the failure tests and the chaos benchmark.

tansu keeps its data in memory, so "the broker stopped 20 s and came back with its data"
is played by holding every byte between the clients and a live broker: to the clients it
is a broker that stops answering, then answers again with nothing lost.
"""

from __future__ import annotations

import socket
import threading

from meterflow.local.broker import LocalBroker


class StallingProxy:
    """A TCP relay in front of a broker that can hold every byte for a while (a stall)."""

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        self.flowing = threading.Event()
        self.flowing.set()
        self.server = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the broker itself is down: so is the relay
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

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
        self.server.close()


class ProxiedBroker(LocalBroker):
    """tansu advertising the proxy, so every client's traffic goes through it."""

    proxy_port: int = 0

    def command(self) -> list[str]:
        command = super().command()
        command[-1] = f"tcp://127.0.0.1:{self.proxy_port}"
        return command
