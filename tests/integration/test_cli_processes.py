"""The ``meterflow`` command and ``spark-submit`` as users run them: real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from helpers import ROOT, meterflow

from meterflow.core.config import Settings


def env_of(settings: Settings) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "METERFLOW_DATA_DIR": str(settings.data_dir),
        "METERFLOW_KAFKA_SOURCE": "python",
        "METERFLOW_TOPIC_READINGS": settings.topic_readings,
        "METERFLOW_TOPIC_ABNORMAL": settings.topic_abnormal,
        "METERFLOW_TOPIC_DEADLETTER": settings.topic_deadletter,
        "METERFLOW_TRIGGER_SECONDS": "1",
        "PYSPARK_PYTHON": sys.executable,
    }


def started(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """``python argv`` as a real process in the repository, its output piped as text."""
    return subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
    )


def test_unreachable_kafka_is_named() -> None:
    result = meterflow("topics", env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    assert result.returncode == 2
    assert "127.0.0.1:9" in result.stderr and len(result.stderr.strip().splitlines()) == 1


#: ``meterflow run`` as a real process with one worker's loop replaced, before the command
#: starts, by one that fails: the seam is the worker's own code, the rest is the real run.
RUN_WITH_A_FAILING_WORKER = """
import importlib, sys
module, owner, method = sys.argv[1:4]
def fail(*args, **kwargs):
    raise RuntimeError("disk on fire\\n(injected)")
setattr(getattr(importlib.import_module(module), owner), method, fail)
from meterflow.cli import main
sys.exit(main(sys.argv[4:]))
"""
SINK_LOOP = ("meterflow.serving.sink.consumer", "Sink", "poll_once")


def test_a_dead_worker_stops_the_run_with_one_line(make_settings, free_port) -> None:
    """Before, the thread logged and returned: the stream ran on without it, and Ctrl-C
    then waited 120 s for it. Now the run stops on its own and says what died. The sink
    is the worker here, the one the drain would otherwise wait for; every worker dies
    through the same ``Drain.failed`` (tests/unit/test_cli.py names the simulator)."""
    worker = "sink"
    settings = make_settings(partitions=1)
    env = {
        **env_of(settings),
        "METERFLOW_TOPIC_STATUS": settings.topic_status,
        "MONGO_URI": "",
        "METERFLOW_LOCAL_MONGO_PORT": str(free_port),
        "METERFLOW_DETECTION": "off",  # the workers are the subject, not the stateful stage
    }
    command = ["run", "--meters", "20", "--interval", "1s", "--episodes", "none"]
    process = started(["-c", RUN_WITH_A_FAILING_WORKER, *SINK_LOOP, *command], env)
    try:
        _, err = process.communicate(timeout=300)  # no signal: it must end by itself
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"meterflow run: the {worker} stopped: RuntimeError: disk on fire (injected); "
        "the run stopped with it"
    ), err[-3000:]
    assert f"run=worker-failed worker={worker}" in err
    assert "drain=stream" in err  # the stream was stopped through its stop event
    assert "drain=sink" not in err  # nothing waited for the dead sink


def test_spark_cluster_names_a_port_in_use(tmp_path, free_port) -> None:
    """A master whose port is taken stops with one line naming the fix, instead of quietly
    moving to the next port while the URL printed points at someone else's."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = meterflow(
            "spark-cluster", "--workers", "0", "--port", str(port), "--ui-port", str(free_port),
            "--state-dir", str(tmp_path),
        )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "a port it needs is in use" in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
