"""Stand-in services for native runs (the Kafka broker, MongoDB): start, wait, stop.

Each is a child process listening on 127.0.0.1 with its output in a log file, in its own
session (so Ctrl-C reaches meterflow, which stops it in order), and "up" only once its
protocol answers, not merely when the port opens.
"""

from __future__ import annotations

import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now, for a stand-in started next (chosen by the kernel, so
    parallel runs do not collide; another process may still take it first)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class LocalService(ABC):
    """A local server process; subclasses say how to run it and how to ask if it answers."""

    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    #: Raised, with a one-line reason, when the service cannot be started.
    error: type[Exception] = field(default=RuntimeError, init=False, repr=False)
    name: str = field(default="service", init=False, repr=False)

    @abstractmethod
    def command(self) -> list[str]:
        """The command line to start the server."""

    @abstractmethod
    def answers(self) -> bool:
        """Whether the server's protocol answers (called once the port is open)."""

    def environment(self) -> dict[str, str] | None:
        """The server's environment (None: this process's)."""
        return None

    def start(self, timeout: float = 20.0) -> Self:
        command = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.environment(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.error(
                    f"{self.name} exited with code {self.process.returncode}; see {self.log_path}"
                )
            if port_open(self.port) and self.answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise self.error(
            f"{self.name} did not answer on {LOOPBACK}:{self.port} within {timeout:.0f} s"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
