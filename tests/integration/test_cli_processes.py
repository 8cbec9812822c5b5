"""The ``meterflow`` command and ``spark-submit`` as users run them: real processes."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import ROOT, meterflow

from meterflow.clients import kafka
from meterflow.core.config import Settings

PROTOTYPE = [
    b'{"device_id": "em1", "timestamp": "2024-05-27T15:57:53Z", "usage_kwh": 9}',
    b'{"device_id": "wm1", "timestamp": "2024-05-27T15:57:52Z", "usage": 18, "flow_rate": 5}',
    b'{"device_id": "em2", "timestamp": "2024-05-27T15:57:54Z", "usage_kwh": -1}',
    b"garbage",
]


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


def send(settings: Settings, messages: list[bytes]) -> None:
    producer = kafka.producer(settings.bootstrap_servers)
    for value in messages:
        producer.produce(settings.topic_readings, value, b"k")
    assert producer.flush(30) == 0


def test_unreachable_kafka_is_named() -> None:
    result = meterflow("topics", env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    assert result.returncode == 2
    assert "127.0.0.1:9" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_spark_submit_runs_the_streaming_job(make_settings) -> None:
    settings = make_settings(partitions=1)
    send(settings, PROTOTYPE)
    spark_submit = Path(sys.executable).parent / "spark-submit"
    result = subprocess.run(
        [str(spark_submit), "--master", "local[2]", "jobs/streaming_job.py", "--available-now"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env_of(settings)},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # spark-submit's Python runner merges the driver's stderr (our logs) into stdout.
    assert "read=4 valid=2 abnormal=1 deadletter=1" in result.stdout + result.stderr
    lake = settings.data_dir / "lake" / "readings" / "date=2024-05-27"
    assert list(lake.glob("*.parquet")), f"no Parquet under {lake}"


#: Spark's noise the stream's log must not carry (the issue "A house a newcomer can live
#: in"): the detector's pre-init worker banners, the job-group cancels of a clean stop, the
#: first batches' "falling behind".
NOISE = (
    "TransformWithStateInPandas Python worker finish init stage",
    "TransformWithStateInPandas Python worker received parameters",
    "TransformWithStateInPandas Python worker Starting execution of UDF",
    "TransformWithStateInPandas Python worker Completed execution of UDF",
    "Failed to cancel job group",
    "Current batch is falling behind",
    "No more data to read from the socket",
)


def test_stream_stops_cleanly_on_sigterm(make_settings) -> None:
    """With the detector's query too; the log says what the stream did and no more."""
    settings = make_settings(partitions=1)
    send(settings, PROTOTYPE)
    detection = {
        "METERFLOW_DETECTION": "on",
        "METERFLOW_TOPIC_STATUS": settings.topic_status,
        "METERFLOW_TOPIC_DIGEST": settings.topic_digest,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "meterflow.cli", "stream"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env_of(settings), **detection},
        cwd=ROOT,
    )
    lake = settings.data_dir / "lake" / "readings" / "date=2024-05-27"
    # Both queries committed a batch: the detector's pre-init worker has run.
    detector_commits = settings.checkpoint_path + "/detector/processing/*/commits/0"
    deadline = time.monotonic() + 180
    while not (list(lake.glob("*.parquet")) and glob.glob(detector_commits)):
        assert time.monotonic() < deadline, "the stream committed no batch of both queries"
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "this run: read 4 = valid 2 + abnormal 1 + dead-lettered 1" in out
    assert "detector_batch=" in err
    assert [line for line in err.splitlines() if any(n in line for n in NOISE)] == []
    ledger = meterflow("reconcile", "--scan-lake", env=env_of(settings))
    assert ledger.returncode == 0, ledger.stderr
    assert "reconciled: 4 offsets in 1 generation(s)" in ledger.stdout


def test_run_brings_up_simulator_stream_sink_and_mongodb(make_settings, free_port) -> None:
    """`meterflow run` (the README's main job) with the broker of the tests and its own
    MongoDB stand-in: readings flow into the lake and, through the sink, into MongoDB."""
    import pymongo

    settings = make_settings(partitions=2)
    env = {
        **env_of(settings),
        "METERFLOW_TOPIC_STATUS": settings.topic_status,
        "MONGO_URI": "",
        "METERFLOW_LOCAL_MONGO_PORT": str(free_port),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "meterflow.cli", "run", "--meters", "40", "--interval", "1s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 240
        db = None
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(1)
            try:
                client = pymongo.MongoClient(
                    f"mongodb://127.0.0.1:{free_port}/", serverSelectionTimeoutMS=500
                )
                db = client["iot"]
                if db["meter_status"].count_documents({}) >= 40:
                    break
            except pymongo.errors.PyMongoError:
                continue
        assert db is not None, "the MongoDB stand-in never answered"
        assert db["meters"].count_documents({}) == 40  # the registry, loaded at start
        assert db["meter_status"].count_documents({}) >= 40, "the sink never caught up"
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "this run: read" in out
    assert "sink=stopped" in err and "reconciled=true" in err
    ledger = meterflow("reconcile", "--scan-lake", env=env)
    assert ledger.returncode == 0, ledger.stderr
    assert "reconciled:" in ledger.stdout
    assert list((settings.data_dir / "lake" / "readings").glob("date=*/*.parquet"))
