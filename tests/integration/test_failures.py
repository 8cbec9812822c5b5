"""The failures users meet, as they meet them: a stalling broker, restarts of ``meterflow
run`` with and without a fresh local broker, paths that cannot be written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    assert_exactly_once,
    committed_offsets,
    free_port,
    good,
    lake_offsets,
    log_records,
    log_tail,
    meterflow,
    reconciled,
    send,
    still_running,
    wait_for,
)
from pyspark.sql import SparkSession

from meterflow.clients import kafka
from meterflow.core.config import Settings
from meterflow.local.stall_proxy import ProxiedBroker, StallingProxy
from meterflow.stream.supervisor import run


def test_a_broker_stalled_until_the_stream_gives_up_loses_and_duplicates_nothing(
    spark: SparkSession, tmp_path: Path
):
    """The stall lasts until the stream's Kafka requests time out and it retries from the
    ledger (docs/architecture.md: "A Kafka that is only unavailable"), with readings
    produced meanwhile waiting in the producer; then the broker answers again."""
    proxy_port = free_port()
    broker = ProxiedBroker(free_port(), tmp_path / "broker.log")
    broker.proxy_port = proxy_port
    broker.start()
    proxy = StallingProxy(proxy_port, broker.port)
    try:
        settings = Settings.from_env(
            {
                "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{proxy_port}",
                "METERFLOW_DATA_DIR": str(tmp_path / "data"),
                "METERFLOW_KAFKA_SOURCE": "python",
                "METERFLOW_TRIGGER_SECONDS": "1",
            }
        )
        kafka.ensure_topics(settings.bootstrap_servers, settings.topics, 2)
        stop = threading.Event()
        jobs: list = []
        totals: dict = {}
        stream = threading.Thread(
            target=lambda: totals.update(
                run(settings, spark=spark, stop=stop, on_committer=jobs.append)
            ),
            daemon=True,
        )
        stream.start()

        def committed() -> int:
            return sum(j.totals["read"] for j in jobs)

        send(settings, [good(i) for i in range(300)])
        wait_for(lambda: committed() >= 300, 120, "the first 300 readings")
        with log_records() as records:
            proxy.flowing.clear()  # the broker stalls: nothing in, nothing out
            late = threading.Thread(
                target=send, args=(settings, [good(i) for i in range(300, 600)])
            )
            late.start()
            wait_for(
                lambda: [r for r in records if r.getMessage().startswith("streaming=retry")],
                120,
                "the stream to give up on the stalled broker and retry",
            )
        proxy.flowing.set()
        late.join(90)
        wait_for(lambda: committed() >= 600, 180, "all 600 readings after the stall")
        stop.set()
        stream.join(120)
        assert not stream.is_alive()
        assert totals["read"] == 600
        assert_exactly_once(settings, 600)
    finally:
        proxy.close()
        broker.stop()


@pytest.mark.parametrize("variable", ["LAKE_PATH", "CHECKPOINT_PATH", "METERFLOW_DATA_DIR"])
def test_an_unwritable_path_is_one_line_before_spark_starts(
    variable: str, make_settings, tmp_path: Path
):
    settings = make_settings(partitions=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "METERFLOW_TOPIC_READINGS": settings.topic_readings,
        "METERFLOW_DATA_DIR": str(tmp_path / "data"),
        variable: str(blocker / "below"),
    }
    started = time.monotonic()
    result = meterflow("stream", "--available-now", env=env, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"meterflow stream: {variable}={blocker / 'below'} is not writable (Not a directory): "
        "choose another path or fix its permissions"
    ]
    assert time.monotonic() - started < 30  # no Spark session was started


#: A small live fleet, without the demo's episodes: what is counted is the lake's.
RUN_ARGS = ("--meters", "30", "--interval", "1s", "--episodes", "none")


def _documents(mongo_port: str, collection: str) -> int:
    """How many documents ``collection`` holds in the run's own MongoDB (0 while it is not
    up)."""
    import pymongo

    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{mongo_port}/", serverSelectionTimeoutMS=500)
    try:
        return client["iot"][collection].count_documents({})
    except pymongo.errors.PyMongoError:
        return 0
    finally:
        client.close()


def _run_platform(env: dict[str, str], logs: Path) -> tuple[int, str, str]:
    """``meterflow run`` until its stream has committed readings of this run and the sink
    has written a status for every meter, then Ctrl-C while the simulator still sends;
    returns (readings sent, out, err)."""
    lake_path = Settings.from_env({**env, "KAFKA_BOOTSTRAP_SERVERS": ""}).lake_path
    before = committed_offsets(lake_path)
    logs.mkdir(parents=True, exist_ok=True)
    out_log, err_log = logs / "out.log", logs / "err.log"
    with out_log.open("w") as out, err_log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "meterflow.cli", "run", *RUN_ARGS],
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, **env},
            cwd=ROOT,
        )
    try:
        wait_for(
            lambda: still_running(process, err_log) and committed_offsets(lake_path) > before,
            240,
            "the stream to commit readings of this run",
            details=lambda: log_tail(err_log),
            interval=0.5,  # each look reads the ledger
        )
        wait_for(
            lambda: (
                still_running(process, err_log)
                and _documents(env["METERFLOW_LOCAL_MONGO_PORT"], "meter_status") >= 30
            ),
            120,
            "the sink to write a status for each of the 30 meters",
            details=lambda: log_tail(err_log),
        )
        # The registry, loaded at start.
        assert _documents(env["METERFLOW_LOCAL_MONGO_PORT"], "meters") == 30
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=240)
    out_text, err_text = out_log.read_text(), err_log.read_text()
    assert process.returncode == 0, err_text[-4000:]
    assert "this run: read" in out_text, out_text[-2000:]
    sent = re.search(r"simulator=stopped sent=(\d+)", err_text)
    assert sent, err_text[-3000:]
    assert "drain=stream caught_up=true" in err_text, err_text[-3000:]
    assert "drain=sink caught_up=true" in err_text, err_text[-3000:]
    assert "sink=stopped" in err_text and "reconciled=true" in err_text, err_text[-3000:]
    return int(sent.group(1)), out_text, err_text


@pytest.mark.parametrize("fresh_broker", [True, False], ids=["fresh-local-broker", "same-broker"])
def test_two_restarts_of_meterflow_run_lose_nothing(fresh_broker: bool, make_settings, tmp_path):
    """Issue: a restarted `meterflow run` lost ~1,000 of 1,350 readings; a clean stop lost
    what the simulator sent last. Each run brings up the simulator, the stream, the sink and
    its own MongoDB stand-in: readings reach the lake and, through the sink, MongoDB."""
    env = {
        "METERFLOW_DATA_DIR": str(tmp_path / "data"),
        "METERFLOW_KAFKA_SOURCE": "python",
        "METERFLOW_TRIGGER_SECONDS": "1",
        "MONGO_URI": "",
        "METERFLOW_LOCAL_MONGO_PORT": str(free_port()),
    }
    if fresh_broker:  # each run starts (and drains, then stops) its own in-memory broker
        # The lake's ledger is the subject: the stateful stage's restarts are
        # tests/integration/test_detection_stream.py's.
        env |= {
            "KAFKA_BOOTSTRAP_SERVERS": "",
            "METERFLOW_LOCAL_BROKER_PORT": str(free_port()),
            "METERFLOW_DETECTION": "off",
        }
    else:  # a broker that outlives the runs, as with `meterflow broker` or a cluster
        # The stateful stage on, as a user's `meterflow run` has it.
        settings = make_settings(partitions=2)
        env |= {
            "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "METERFLOW_TOPIC_READINGS": settings.topic_readings,
            "METERFLOW_TOPIC_ABNORMAL": settings.topic_abnormal,
            "METERFLOW_TOPIC_DEADLETTER": settings.topic_deadletter,
            "METERFLOW_TOPIC_STATUS": settings.topic_status,
            "METERFLOW_TOPIC_DIGEST": settings.topic_digest,
        }
    sent = [_run_platform(env, tmp_path / f"run-{n}")[0] for n in range(2)]

    settings = Settings.from_env({**env, "KAFKA_BOOTSTRAP_SERVERS": ""})
    offsets = lake_offsets(settings)
    assert sum(offsets.values()) == sum(sent) and max(offsets.values()) == 1
    generations = {generation for generation, _, _ in offsets}
    assert len(generations) == (2 if fresh_broker else 1)
    report = reconciled(settings)
    assert not [loss for a in report.audits for loss in a.lost]
    checked = meterflow("reconcile", env={**env, "KAFKA_BOOTSTRAP_SERVERS": ""}, timeout=300)
    assert checked.returncode == 0 and "reconciled:" in checked.stdout, checked.stderr


def test_a_full_lake_disk_is_one_line_and_the_next_start_loses_nothing(
    spark: SparkSession, make_settings, tmp_path: Path
):
    """Issue: ENOSPC while writing the lake printed a pyarrow traceback before the one-line
    message. The lake is a 6 MB tmpfs with 100 kB left; once space is freed, the next
    start writes every reading exactly once."""
    mount = tmp_path / "lake"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a tmpfs this user cannot mount: {mounted.stderr.strip()}")
    try:
        # The lake is the subject: the stateful stage stays off.
        settings = make_settings(partitions=2, LAKE_PATH=str(mount), METERFLOW_DETECTION="off")
        filler = mount / "filler"
        filler.write_bytes(b"x" * (6 * 2**20 - 100 * 2**10))
        readings = 10_000
        send(settings, [good(i, f"em{i % 500}", (i * 7919 % 1000) / 997) for i in range(readings)])
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "METERFLOW_DATA_DIR": str(settings.data_dir),
            "LAKE_PATH": str(mount),
            "METERFLOW_KAFKA_SOURCE": "python",
            "METERFLOW_TOPIC_READINGS": settings.topic_readings,
            "METERFLOW_TOPIC_ABNORMAL": settings.topic_abnormal,
            "METERFLOW_TOPIC_DEADLETTER": settings.topic_deadletter,
            "METERFLOW_TOPIC_STATUS": settings.topic_status,
            "METERFLOW_DETECTION": "off",
        }
        result = meterflow("stream", "--available-now", env=env)
        line = (
            f"meterflow stream: LAKE_PATH={mount} is full (No space left on device): free "
            "space or point LAKE_PATH elsewhere; the next start resumes where the lake's "
            "ledger ends"
        )
        assert result.returncode == 2, result.stderr[-3000:]
        assert [x for x in result.stderr.splitlines() if "No space left" in x] == [line]
        assert "Traceback" not in result.stderr and "pyarrow" not in result.stderr
        assert not (mount / "readings").exists()  # nothing committed, staging deleted

        filler.unlink()  # space freed: the next start
        again = run(settings, available_now=True, spark=spark)
        assert again["read"] == readings
        assert_exactly_once(settings, readings)
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)
