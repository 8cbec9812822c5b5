"""A local MongoDB for native runs: ``nx-27017`` (a MongoDB wire-protocol server over SQLite).

:func:`mongo_for` is to MongoDB what :func:`meterflow.local.broker.kafka_for` is to Kafka:
with ``MONGO_URI`` set it checks that the server answers; without it, native demos get a
local stand-in. The stand-in is experimental (it stores ``$set`` dates as strings, ignores
partial indexes and ``collMod``): good for a demo and a networked smoke test, never the
reference for MongoDB behaviour.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from meterflow.clients.mongo import MongoUnavailableError, ping, redacted
from meterflow.core.config import Settings
from meterflow.core.logs import get_logger
from meterflow.local.service import LOOPBACK, LocalService, port_open

log = get_logger(__name__)


@dataclass
class LocalMongo(LocalService):
    """An ``nx-27017`` process on 127.0.0.1 with its data in ``data_dir``; stops on exit."""

    data_dir: Path = Path("mongo")
    error: type[Exception] = field(default=MongoUnavailableError, init=False, repr=False)
    name: str = field(default="local MongoDB stand-in", init=False, repr=False)

    @property
    def uri(self) -> str:
        return f"mongodb://{LOOPBACK}:{self.port}/"

    def command(self) -> list[str]:
        beside_python = Path(sys.executable).with_name("nx-27017")
        binary = str(beside_python) if beside_python.exists() else shutil.which("nx-27017")
        if binary is None:
            raise MongoUnavailableError(
                "MONGO_URI is empty and nx-27017 (the local MongoDB stand-in) is not "
                "installed: pip install -r requirements.txt, or set MONGO_URI to a MongoDB"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            binary,
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--log-file", str(self.log_path),
            "--pid-file", str(self.data_dir / "nx-27017.pid"),
        ]  # fmt: skip

    def answers(self) -> bool:
        try:
            ping(self.uri, timeout=2)
            return True
        except MongoUnavailableError:
            return False


@contextlib.contextmanager
def mongo_for(
    settings: Settings, start_local: bool = True
) -> Iterator[tuple[Settings, LocalMongo | None]]:
    """Yield settings whose ``mongo_uri`` answers, and the stand-in started for it, if any.

    With ``MONGO_URI`` set the server must answer a ping, else
    :class:`MongoUnavailableError` names it (without credentials). Without it, a stand-in
    already listening on ``METERFLOW_LOCAL_MONGO_PORT`` is reused, or one is started with
    its data under ``DATA_DIR/mongo`` (it keeps data across restarts, unlike the broker).
    """
    local = None
    if settings.mongo_uri:
        ping(settings.mongo_uri)
        log.info("mongo=external uri=%s", redacted(settings.mongo_uri))
    elif port_open(settings.local_mongo_port):
        settings = settings.with_mongo(f"mongodb://127.0.0.1:{settings.local_mongo_port}/")
        ping(settings.mongo_uri)
        log.info("mongo=local-running uri=%s", settings.mongo_uri)
    elif not start_local:
        raise MongoUnavailableError(
            f"no MongoDB: MONGO_URI is empty and nothing listens on "
            f"127.0.0.1:{settings.local_mongo_port}"
        )
    else:
        local = LocalMongo(
            port=settings.local_mongo_port,
            log_path=settings.data_dir / "logs" / "mongo.log",
            data_dir=settings.data_dir / "mongo",
        ).start()
        settings = settings.with_mongo(local.uri)
        log.info("mongo=local-started uri=%s log=%s", local.uri, local.log_path)
    try:
        yield settings, local
    finally:
        if local is not None:
            local.stop()
