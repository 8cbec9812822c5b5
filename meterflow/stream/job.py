"""The speed layer as a process: what ``spark-submit jobs/streaming_job.py`` runs.

:func:`run_job` runs :func:`meterflow.stream.supervisor.run` and turns its end into the exit
code: 0 when stopped or caught up, else the :class:`MeterflowError`'s own (2 configuration,
3 data loss to decide on, 4 Kafka unavailable after every retry), its reason one line on
stderr. The job file itself only parses the command line and the environment.
"""

from __future__ import annotations

import os
import sys
import threading

from meterflow.core.config import Settings
from meterflow.core.errors import DataLossError, MeterflowError
from meterflow.core.signals import signals_handled
from meterflow.stream.supervisor import run


def run_job(settings: Settings, available_now: bool = False, accept_data_loss: bool = False) -> int:
    """Run the stream until SIGTERM or Ctrl-C (or caught up); the process's exit code.

    After a data-loss stop with ``METERFLOW_ON_DATA_LOSS=wait`` it first waits for the
    operator (:func:`wait_for_decision`) instead of exiting.
    """
    stop = threading.Event()
    try:
        run(
            settings,
            available_now=available_now,
            accept_data_loss=accept_data_loss,
            stop=stop,
            on_signal=lambda *_: stop.set(),
        )
    except MeterflowError as exc:
        print(f"streaming_job: {exc}", file=sys.stderr)
        if isinstance(exc, DataLossError) and settings.on_data_loss == "wait":
            wait_for_decision()
        return exc.exit_code
    return 0


def wait_for_decision() -> None:
    """After a data-loss stop under spark-submit (``METERFLOW_ON_DATA_LOSS=wait``), stay down
    without exiting: a container restarted on exit would repeat the stop forever. Spark is
    stopped (its UI and so the health check go down) until SIGTERM, or until spark-submit's
    JVM is gone; the operator decides, then restarts the service."""
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
