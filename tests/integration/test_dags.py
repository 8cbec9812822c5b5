"""The Airflow DAGs: they parse cleanly, do no I/O at import, and really run.

``meter_daily_averages`` runs through ``dag.test()`` on a lake that the simulator's
backfill wrote through the broker and the streaming job; its SparkSubmitOperator really
calls ``spark-submit`` (connection ``spark_default`` = local master), and the MongoDB
documents it loads are compared with aggregates this test computes itself from the
lake's Parquet files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from helpers import ROOT

from meterflow.batch.daily import APP_NAME
from meterflow.batch.readiness import day_readiness
from meterflow.clients import kafka, mongo
from meterflow.core.config import Settings
from meterflow.core.contract import STATELESS_FAULTS
from meterflow.core.lake import readings_path
from meterflow.stream.supervisor import run as run_stream
from simulator.fleet import build_fleet, write_registry
from simulator.generator import FaultRates, SimulationConfig, simulate

DAG_IDS = {"meter_daily_averages", "meter_incidents", "meterflow_retention"}


def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_every_dag_imports_with_owner_and_tags() -> None:
    bag = dagbag()
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == DAG_IDS
    for dag in bag.dags.values():
        assert dag.tags and "meterflow" in dag.tags, dag.dag_id
        assert dag.doc_md, f"{dag.dag_id} has no documentation"
        for task in dag.tasks:
            assert task.owner == "meterflow", f"{dag.dag_id}.{task.task_id} owner {task.owner}"
    # One Spark driver at a time in the scheduler's container (its mem_limit counts one).
    spark_tasks = [
        t for d in bag.dags.values() for t in d.tasks if t.task_type == "SparkSubmitOperator"
    ]
    assert spark_tasks and all(t.max_active_tis_per_dag == 1 for t in spark_tasks)


_NO_IO_PROBE = """
import ast, importlib, importlib.util, socket, subprocess, sys
# Import what the DAG files import first: libraries may probe the platform when loaded
# (croniter, which the @daily timetable loads lazily, runs `file`); the question is what
# the DAG files' own top level does.
import croniter
for path in sys.argv[1:]:
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            importlib.import_module(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
attempts = []
def refuse(what):
    def blocked(*args, **kwargs):
        attempts.append(what)
        raise RuntimeError(f"{what} at import time")
    return blocked
socket.socket.connect = refuse("socket.connect")
socket.create_connection = refuse("socket.create_connection")
subprocess.Popen.__init__ = refuse("subprocess")
import pymongo, confluent_kafka
pymongo.MongoClient.__init__ = refuse("MongoClient")
confluent_kafka.Consumer = refuse("kafka Consumer")
confluent_kafka.Producer = refuse("kafka Producer")
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("dag_" + str(abs(hash(path))), path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print("ATTEMPTS=" + ",".join(attempts))
"""


def test_dag_files_do_no_io_at_import() -> None:
    """Parsing a DAG file must not touch Kafka, MongoDB, sockets or processes."""
    files = sorted(str(p) for p in (ROOT / "dags").glob("*.py"))
    assert len(files) == len(DAG_IDS)
    result = subprocess.run(
        [sys.executable, "-c", _NO_IO_PROBE, *files],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
            "MONGO_URI": "",
            "PYTHONPATH": str(ROOT / "plugins"),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ATTEMPTS=\n" in result.stdout, result.stdout


_MADE: list[_RecordingClient] = []


class _RecordingClient:
    """A MongoDB client that records that it was made and how often closed (mongomock behind)."""

    def __init__(self, uri: str) -> None:
        import mongomock

        self.closed = 0
        self._client = mongomock.MongoClient(tz_aware=True)
        _MADE.append(self)

    def __getitem__(self, name: str):
        return self._client[name]

    def close(self) -> None:
        self.closed += 1


def test_the_hook_makes_one_client_and_closes_it(tmp_path: Path) -> None:
    """Issue: MeterflowHook opened a MongoClient on every call and never closed it."""
    from meterflow_airflow.hooks import MeterflowHook

    mongo.register_scheme("recording", _RecordingClient)
    _MADE.clear()
    try:
        settings = Settings.from_env(
            {"METERFLOW_DATA_DIR": str(tmp_path), "MONGO_URI": "recording://one"}
        )
        with MeterflowHook(settings) as hook:
            first, second = hook.get_conn(), hook.get_conn()
            first["x"].insert_one({"_id": 1})
            assert second["x"].count_documents({}) == 1
            assert [c.closed for c in _MADE] == [0]
        assert [c.closed for c in _MADE] == [1]
        hook.close()  # closing twice is harmless
        assert [c.closed for c in _MADE] == [1]
    finally:
        mongo.register_scheme("recording", None)


def test_the_partition_sensor_looks_every_minute() -> None:
    """Yesterday's views appear within about two minutes of the stream reading the day."""
    sensor = dagbag().dags["meter_daily_averages"].get_task("wait_for_partition")
    assert sensor.poke_interval == timedelta(minutes=1).total_seconds()
    assert sensor.mode == "reschedule"


def test_the_daily_dag_runs_on_local_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """In Paris, the run after Paris's midnight of June 2 (22:00 UTC on June 1) is June 2's;
    ``ds``, the logical date in UTC, would say June 1."""
    import pendulum

    monkeypatch.setenv("METERFLOW_TIMEZONE", "Europe/Paris")
    dag = dagbag().dags["meter_daily_averages"]
    assert dag.timezone.name == "Europe/Paris"
    start = pendulum.datetime(2024, 6, 2, tz="Europe/Paris").in_timezone("UTC")
    render = dag.get_template_env().from_string
    for task_id, template in (
        ("wait_for_partition", dag.get_task("wait_for_partition").day),
        ("aggregate", dag.get_task("aggregate").application_args[1]),
        ("load", dag.get_task("load").op_args[0]),
        ("check", dag.get_task("check").op_args[0]),
    ):
        assert render(template).render(data_interval_start=start) == "2024-06-02", task_id
    # Late data: the run looks back five weeks of local days for days to run again.
    from airflow.sdk.execution_time import macros

    late_since = dag.get_task("aggregate").application_args[3]
    assert render(late_since).render(data_interval_start=start, macros=macros) == "2024-04-28"


@pytest.fixture
def simulated_lake(
    spark, make_settings, mongo_uri, mongo_db_name, monkeypatch, airflow_db, spark_cluster
):
    """Two simulated days in the lake (simulator -> broker -> streaming job) and env for DAGs,
    whose Spark jobs go to the native standalone cluster (compose's cluster profile)."""
    settings: Settings = make_settings(partitions=2, MONGO_URI=mongo_uri, MONGO_DB=mongo_db_name)
    fleet = build_fleet(24, seed=5)
    write_registry(fleet, settings.registry_path, 900)
    faults = FaultRates({code: 0.02 for code in STATELESS_FAULTS}, malformed=0.01)
    config = SimulationConfig(
        meters=24, days=2, end=date(2024, 6, 3), seed=5, faults=faults, rules=settings.rules
    )
    sink = kafka.ProducerSink(settings.bootstrap_servers, settings.topic_readings)
    simulate(config, sink.emit, fleet=fleet)
    assert sink.close() == 0
    run_stream(settings, available_now=True, spark=spark)

    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        # The sensor asks Kafka for this topic's generation.
        "METERFLOW_TOPIC_READINGS": settings.topic_readings,
        "METERFLOW_DATA_DIR": str(settings.data_dir),
        "MONGO_URI": mongo_uri,
        "MONGO_DB": mongo_db_name,
        "METERFLOW_DAG_START_DATE": "2024-01-01",
        # The stream has read all there is and stopped: with no reading of June 3 its
        # watermark stays at June 2 23:45, and a second without it stands for "stopped".
        "METERFLOW_DAY_GRACE_SECONDS": "1",
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps(
            {"conn_type": "spark", "host": spark_cluster.url, "extra": {"deploy-mode": "client"}}
        ),
        "SPARK_MASTER": spark_cluster.url,
        # spark-submit and the Python it starts are this virtualenv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYSPARK_PYTHON": sys.executable,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings


def expected_meter_views(settings: Settings, day: date) -> dict[str, dict]:
    """Per-meter aggregates computed here from the lake files, independently of Spark."""
    table = (
        ds.dataset(
            readings_path(settings.lake_path),
            format="parquet",
            partitioning=ds.partitioning(pa.schema([("date", pa.date32())]), flavor="hive"),
        )
        .to_table(filter=pc.field("date") == day)
        .to_pandas()
    )
    good = table[table["fault_code"].isna()]
    expected = {}
    for device, rows in table.groupby("device_id"):
        values = good[good["device_id"] == device]["consumption"]
        expected[device] = {
            "reading_count": len(rows),
            "faulty_count": int(rows["fault_code"].notna().sum()),
            "avg": float(values.mean()) if len(values) else None,
            "min": float(values.min()) if len(values) else None,
            "max": float(values.max()) if len(values) else None,
            "total": float(values.sum()),
            "completeness": len(rows) / (86_400 / 900),
        }
    return expected


def _documents(settings: Settings, collection: str, day: date) -> dict[str, dict]:
    db = mongo.database(settings)
    return {d["_id"]: d for d in db[collection].find({"day": day.isoformat()})}


def _assert_meter_documents(settings: Settings, day: date) -> None:
    expected = expected_meter_views(settings, day)
    documents = _documents(settings, mongo.DAILY_METER_AVERAGES, day)
    assert {d["device_id"] for d in documents.values()} == set(expected)
    assert sum(e["faulty_count"] for e in expected.values()) > 0  # faults were really there
    for document in documents.values():
        want = expected[document["device_id"]]
        assert document["_id"] == f"{day.isoformat()}|{document['device_id']}"
        for field in ("reading_count", "faulty_count"):
            assert document[field] == want[field], (document["device_id"], field)
        for field in ("avg", "min", "max", "total", "completeness"):
            assert document[field] == pytest.approx(want[field], rel=1e-9), field


def test_daily_dag_runs_spark_submit_and_loads_mongo(
    simulated_lake: Settings, spark_cluster
) -> None:
    """The daily DAG's spark-submit, on a standalone cluster of a master and two workers
    started from the compose file's commands, publishes the day to MongoDB."""
    settings = Settings.from_env()
    assert settings.lake_path == simulated_lake.lake_path
    dag = dagbag().get_dag("meter_daily_averages")
    day = date(2024, 6, 2)
    # The stream wrote its watermark for the topic id Kafka reports: June 1 is complete by
    # the watermark alone (June 2 needs the grace period: nothing after it was sent).
    done, why = day_readiness(
        settings.lake_path,
        settings.bootstrap_servers,
        settings.topic_readings,
        day - timedelta(days=1),
        settings.reading_interval_seconds,
        grace_s=7200,
        zone_name=settings.timezone,
    )
    assert done and why.startswith("stream watermark"), why

    first = dag.test(logical_date=datetime(2024, 6, 2, tzinfo=UTC))
    assert first.state == "success", [(t.task_id, t.state) for t in first.get_task_instances()]
    assert APP_NAME in spark_cluster.apps("completedapps")  # the job ran on the cluster
    _assert_meter_documents(settings, day)
    types = _documents(settings, mongo.DAILY_TYPE_AVERAGES, day)
    by_meter = expected_meter_views(settings, day)
    assert sum(d["reading_count"] for d in types.values()) == sum(
        e["reading_count"] for e in by_meter.values()
    )
    # Running a day again replaces its documents: test_loader_spark.py (republishing).
