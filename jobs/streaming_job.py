"""spark-submit entry point of the speed layer (the code is :mod:`meterflow.stream.query`).

``spark-submit jobs/streaming_job.py [--available-now] [--accept-data-loss]``: reads
``iot-meter`` until stopped (or caught up), writes the lake through its ledger, publishes
abnormal events and dead letters. Exit codes: 2 configuration, 3 data loss to decide on,
4 Kafka unavailable after every retry; the reason is one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from meterflow.core.config import ConfigError, Settings
from meterflow.core.errors import DataLossError, MeterflowError
from meterflow.core.logs import setup_logging
from meterflow.core.signals import signals_handled
from meterflow.stream.query import ACCEPT, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--available-now", action="store_true", help="process what is in Kafka now, then exit"
    )
    parser.add_argument(
        ACCEPT, action="store_true", help="record offsets gone from Kafka as lost and continue"
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        parser.error(str(exc))
    if not settings.bootstrap_servers:
        parser.error(
            "KAFKA_BOOTSTRAP_SERVERS must be set under spark-submit "
            "(meterflow stream starts a local broker itself)"
        )
    stop = threading.Event()
    try:
        run(
            settings,
            available_now=args.available_now,
            accept_data_loss=args.accept_data_loss,
            stop=stop,
            on_signal=lambda *_: stop.set(),
        )
    except DataLossError as exc:
        print(f"streaming_job: {exc}", file=sys.stderr)
        if settings.on_data_loss == "wait":
            _wait_for_the_decision()
        return exc.exit_code
    except (MeterflowError, ConfigError) as exc:
        print(f"streaming_job: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    return 0


def _wait_for_the_decision() -> None:
    """Stay down without exiting: a container restarted on exit would repeat the stop
    forever. Spark is stopped (its cores go back to the cluster, its UI and so the health
    check go down) until SIGTERM; the operator decides, then restarts the service."""
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()
    print(
        "streaming_job: stopped, waiting for a decision (METERFLOW_ON_DATA_LOSS=wait); "
        "restart the service once it is made",
        file=sys.stderr,
        flush=True,
    )
    stopped = threading.Event()
    parent = os.getppid()  # spark-submit's JVM: when it is stopped, so is this process
    with signals_handled(lambda *_: stopped.set()):
        while not stopped.wait(1.0) and os.getppid() == parent:
            pass


if __name__ == "__main__":
    raise SystemExit(main())
