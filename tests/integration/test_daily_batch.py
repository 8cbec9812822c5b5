"""The daily batch job: views against pandas on the same rows, re-runs, empty days, the sink log.

Test lakes are a few meters over one or two days, written directly in the lake schema
(``readings/date=D/``) with pyarrow (tests/lake_helpers.py), or through Spark's streaming
file sink where the sink's commit log matters. Expected values are computed here with pandas.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT
from lake_helpers import (
    D1,
    D2,
    FILE_SCHEMA,
    REGISTRY_INTERVAL,
    fleet_meters,
    make_rows,
    run_batch,
    write_lake_day,
)
from pyspark.sql import SparkSession

from jobs import daily_batch_job
from meterflow.batch import views
from meterflow.core import lake
from meterflow.core.config import Settings
from meterflow.core.contract import METER_SPECS, TYPE_ORDER, MeterType
from meterflow.serving.checks import lake_counts

DEFAULT_INTERVAL = 600  # settings' fallback for meters the registry lacks: 144 a day
UNREGISTERED = ("em999999", str(MeterType.ELECTRICITY))


def lake_settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env(
        {
            "METERFLOW_DATA_DIR": str(tmp_path / "data"),
            "METERFLOW_READING_INTERVAL_SECONDS": str(DEFAULT_INTERVAL),
            **env,
        }
    )


def read_view(settings: Settings, view: str, day: date) -> pd.DataFrame:
    return pq.read_table(views.view_path(settings.views_path, view, day)).to_pandas()


def expected_meters(rows: list[dict], districts: dict[str, str], expected: dict[str, int]):
    """The per-meter view computed with pandas."""
    frame = pd.DataFrame(rows)
    frame["good_value"] = frame["consumption"].where(frame["fault_code"].isna())
    grouped = frame.groupby("device_id")
    out = pd.DataFrame(
        {
            "meter_type": grouped["meter_type"].first(),
            "avg": grouped["good_value"].mean(),
            "min": grouped["good_value"].min(),
            "max": grouped["good_value"].max(),
            "total": grouped["good_value"].sum(min_count=1),
            "reading_count": grouped.size(),
            "good_count": grouped["good_value"].count(),
            "faulty_count": grouped["fault_code"].count(),
        }
    )
    out["district"] = [districts.get(d, views.UNKNOWN_DISTRICT) for d in out.index]
    out["expected_count"] = [expected[d] for d in out.index]
    out["completeness"] = out["reading_count"] / out["expected_count"]
    return out


def assert_frames_match(actual: pd.DataFrame, expected: pd.DataFrame, keys: list[str]) -> None:
    actual = actual.set_index(keys).sort_index()
    expected = expected.reset_index().set_index(keys).sort_index()
    assert list(actual.index) == list(expected.index)
    for column in expected.columns:
        a, e = actual[column].to_numpy(), expected[column].to_numpy()
        if np.issubdtype(np.asarray(e).dtype, np.number):
            assert np.allclose(a.astype(float), e.astype(float), equal_nan=True), column
        else:
            assert list(a) == list(e), column


@pytest.fixture
def two_days(tmp_path: Path):
    """A fleet of six registered meters plus one the registry lacks, over two days."""
    settings = lake_settings(tmp_path)
    meters = fleet_meters(settings)
    rows = {
        D1: make_rows([*meters, UNREGISTERED], D1, seed=1),
        D2: make_rows(meters, D2, seed=2),
    }
    for day, day_rows in rows.items():
        write_lake_day(settings, day, day_rows)
    return settings, meters, rows


def registry_lookup(settings: Settings) -> tuple[dict[str, str], dict[str, int]]:
    registry = pq.read_table(Path(settings.registry_path) / "meters.parquet").to_pylist()
    districts = {r["device_id"]: r["district"] for r in registry}
    expected = {r["device_id"]: 86_400 // r["interval_seconds"] for r in registry}
    expected[UNREGISTERED[0]] = 86_400 // DEFAULT_INTERVAL
    return districts, expected


def test_views_match_pandas_on_the_same_rows(spark: SparkSession, two_days) -> None:
    settings, _meters, rows = two_days
    report = run_batch(spark, settings, D1)

    districts, expected_counts = registry_lookup(settings)
    expected = expected_meters(rows[D1], districts, expected_counts)
    meters_view = read_view(settings, views.METER_VIEW, D1)
    assert_frames_match(meters_view.drop(columns=["unit"]), expected, ["device_id"])
    assert set(meters_view["unit"]) <= {s.unit for s in METER_SPECS.values()}
    all_faulty = expected.index[expected["good_count"] == 0]
    assert (
        len(all_faulty) >= 1
        and meters_view.set_index("device_id").loc[all_faulty, "avg"].isna().all()
    )
    unknown = meters_view.set_index("device_id").loc[UNREGISTERED[0]]
    assert unknown["district"] == views.UNKNOWN_DISTRICT
    assert unknown["expected_count"] == 86_400 // DEFAULT_INTERVAL  # settings, not the registry

    frame = pd.DataFrame(rows[D1])
    frame["district"] = [districts.get(d, views.UNKNOWN_DISTRICT) for d in frame["device_id"]]
    frame["good_value"] = frame["consumption"].where(frame["fault_code"].isna())
    for view, keys in (
        (views.TYPE_VIEW, ["meter_type"]),
        (views.DISTRICT_VIEW, ["district", "meter_type"]),
    ):
        grouped = frame.groupby(keys)
        want = pd.DataFrame(
            {
                "avg": grouped["good_value"].mean(),
                "total": grouped["good_value"].sum(min_count=1),
                "meter_count": grouped["device_id"].nunique(),
                "reading_count": grouped.size(),
                "faulty_count": grouped["fault_code"].count(),
            }
        )
        got = read_view(settings, view, D1)[[*keys, *want.columns]]
        assert_frames_match(got, want, keys)

    faulty = int(frame["fault_code"].notna().sum())
    assert (report.status, report.readings, report.faulty, report.good) == (
        views.STATUS_OK,
        len(frame),
        faulty,
        len(frame) - faulty,
    )
    assert report.meters == frame["device_id"].nunique()
    assert report.views[views.METER_VIEW] == report.meters
    assert report.views[views.DISTRICT_VIEW] == len(frame.groupby(["district", "meter_type"]))
    # The JSON the loader and checks read:
    assert views.read_report(settings.views_path, D1) == report


def _files(directory: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


def test_rerun_replaces_the_day_and_leaves_other_days(spark: SparkSession, two_days) -> None:
    settings, meters, rows = two_days
    run_batch(spark, settings, D1)
    run_batch(spark, settings, D2)
    d2_files = {
        view: _files(views.view_path(settings.views_path, view, D2)) for view in views.VIEWS
    }

    run_batch(spark, settings, D1)  # same input: same rows, not twice as many
    assert len(read_view(settings, views.METER_VIEW, D1)) == len(meters) + 1

    dropped = meters[1][0]
    fewer = [r for r in rows[D1] if r["device_id"] != dropped]
    write_lake_day(settings, D1, fewer)
    report = run_batch(spark, settings, D1)
    view = read_view(settings, views.METER_VIEW, D1).set_index("device_id")
    # Still registered, now silent: one row with nothing received, not a missing row.
    assert len(view) == len(meters) + 1 and report.silent_meters == 1
    assert (view.loc[dropped, "reading_count"], view.loc[dropped, "completeness"]) == (0, 0.0)
    assert report.readings == len(fewer) == view["reading_count"].sum()
    assert read_view(settings, views.TYPE_VIEW, D1)["reading_count"].sum() == len(fewer)
    for name in views.VIEWS:  # D2 byte for byte as it was
        assert _files(views.view_path(settings.views_path, name, D2)) == d2_files[name]


def test_silent_meters_get_a_row_with_completeness_zero(
    spark: SparkSession, tmp_path: Path
) -> None:
    """Registered meters with no reading that day appear (the failure to see), unless
    they were installed after it; meters that did report are unaffected."""
    settings = lake_settings(tmp_path)
    meters = fleet_meters(settings)
    registry_file = lake.registry_file(settings.lake_path)
    registry = pq.read_table(registry_file).to_pandas()
    late = meters[2][0]
    registry.loc[registry["device_id"] == late, "installed_on"] = D2
    pq.write_table(pa.Table.from_pandas(registry, preserve_index=False), registry_file)
    reporting = meters[3:]
    write_lake_day(settings, D1, make_rows(reporting, D1, seed=4))

    report = run_batch(spark, settings, D1)

    view = read_view(settings, views.METER_VIEW, D1).set_index("device_id")
    silent = {m for m, _ in meters[:3]} - {late}
    assert set(view.index) == {m for m, _ in reporting} | silent
    assert report.silent_meters == len(silent) == 2
    for device in silent:
        row = view.loc[device]
        assert (row["reading_count"], row["good_count"], row["faulty_count"]) == (0, 0, 0)
        assert row["completeness"] == 0.0 and pd.isna(row["avg"]) and pd.isna(row["total"])
        assert row["expected_count"] == 86_400 // REGISTRY_INTERVAL
        assert row["district"] == registry.set_index("device_id").loc[device, "district"]
    assert (view.loc[[m for m, _ in reporting], "reading_count"] > 0).all()
    types = read_view(settings, views.TYPE_VIEW, D1)
    assert types["meter_count"].sum() == len(view)


def test_device_reporting_two_types_keeps_one_row_and_is_reported(
    spark: SparkSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device id is one meter: readings that disagree on its type must not split it
    into two rows under one id (two documents with one ``_id`` in MongoDB)."""
    settings = lake_settings(tmp_path)
    meters = fleet_meters(settings, count=3)
    device, first_type = meters[0]
    other_type = next(str(t) for t in MeterType if str(t) != first_type)
    rows = make_rows(meters, D1, seed=5)
    relabelled = [r for r in rows if r["device_id"] == device][-2:]
    for row in relabelled:
        row["meter_type"] = other_type
    write_lake_day(settings, D1, rows)

    report = run_batch(spark, settings, D1)

    view = read_view(settings, views.METER_VIEW, D1)
    assert view["device_id"].is_unique and len(view) == len(meters)
    row = view.set_index("device_id").loc[device]
    assert row["reading_count"] == sum(r["device_id"] == device for r in rows)
    first = min((first_type, other_type), key=lambda t: TYPE_ORDER.index(MeterType(t)))
    assert row["meter_type"] == first
    assert report.mixed_type_meters == 1 and report.readings == len(rows)
    assert f"batch=mixed_types day={D1} meters=1 examples={device}" in caplog.text


def test_day_without_data_is_reported_not_zero_filled(spark: SparkSession, two_days) -> None:
    settings, _meters, _rows = two_days
    run_batch(spark, settings, D1)
    assert all(Path(views.view_path(settings.views_path, v, D1)).exists() for v in views.VIEWS)

    empty = date(2024, 6, 9)
    report = run_batch(spark, settings, empty)
    assert (report.status, report.readings, report.meters) == (views.STATUS_NO_DATA, 0, 0)
    assert not any(
        Path(views.view_path(settings.views_path, v, empty)).exists() for v in views.VIEWS
    )
    assert views.read_report(settings.views_path, empty) == report

    # D1's partition disappears (say, retention): its stale views go, the report says why.
    for file in (Path(lake.readings_path(settings.lake_path)) / f"date={D1}").glob("*"):
        file.unlink()
    assert run_batch(spark, settings, D1).status == views.STATUS_NO_DATA
    assert not any(Path(views.view_path(settings.views_path, v, D1)).exists() for v in views.VIEWS)


def test_no_lake_and_no_registry_at_all(spark: SparkSession, tmp_path: Path) -> None:
    settings = lake_settings(tmp_path)
    assert run_batch(spark, settings, D1).status == views.STATUS_NO_DATA
    rows = make_rows([("gm000001", str(MeterType.GAS))], D1, seed=3)
    write_lake_day(settings, D1, rows)  # a lake, but no registry: every district unknown
    report = run_batch(spark, settings, D1)
    assert report.status == views.STATUS_OK and report.readings == len(rows)
    assert set(read_view(settings, views.DISTRICT_VIEW, D1)["district"]) == {views.UNKNOWN_DISTRICT}


def test_only_files_the_streaming_sink_committed_count(spark: SparkSession, tmp_path: Path) -> None:
    """A lake written by Spark's file sink plus a stray file its log never committed."""
    settings = lake_settings(tmp_path)
    meters = fleet_meters(settings, count=3)
    rows = make_rows(meters, D1, seed=4)
    source = tmp_path / "source"
    source.mkdir()
    table = pa.Table.from_pylist(rows, schema=FILE_SCHEMA)
    table = table.append_column("date", pa.array([D1] * len(rows), pa.date32()))
    pq.write_table(table, source / "batch.parquet")
    ddl = lake.spark_ddl(pa.schema([lake.CLASSIFIED_SCHEMA.field(n) for n in lake.LAKE_COLUMNS]))
    query = (
        spark.readStream.schema(ddl)
        .parquet(str(source))
        .writeStream.format("parquet")
        .partitionBy(lake.PARTITION_COLUMN)
        .option("checkpointLocation", str(tmp_path / "checkpoint"))
        .trigger(availableNow=True)
        .start(lake.readings_path(settings.lake_path))
    )
    query.awaitTermination(120)
    partition = Path(lake.readings_path(settings.lake_path)) / f"date={D1}"
    assert (Path(lake.readings_path(settings.lake_path)) / "_spark_metadata").is_dir()
    # What a task of a failed micro-batch may leave behind: a file no batch committed.
    pq.write_table(table.drop_columns(["date"]), partition / "part-99999-uncommitted.parquet")

    report = run_batch(spark, settings, D1)
    assert report.readings == len(rows)
    by_type = pd.DataFrame(rows).groupby("meter_type").size().to_dict()
    assert lake_counts(settings.lake_path, D1) == by_type
    assert os.path.exists(partition / "part-99999-uncommitted.parquet")


def test_main_runs_a_day_from_the_command_line(
    spark: SparkSession, two_days, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``spark-submit jobs/daily_batch_job.py --date D --lake L`` (in-process: same session)."""
    settings, _meters, rows = two_days
    monkeypatch.setenv("METERFLOW_DATA_DIR", str(Path(settings.data_dir) / "elsewhere"))
    assert daily_batch_job.main(["--date", str(D2), "--lake", settings.lake_path]) == 0
    printed = views.DayReport.from_json(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed.readings == len(rows[D2])
    assert views.read_report(settings.views_path, D2) == printed
    with pytest.raises(SystemExit):
        daily_batch_job.main(["--date", "2024-13-01"])


def test_batch_command_in_its_own_process(two_days) -> None:
    """``meterflow batch --date D`` as a user runs it: own JVM, report printed, exit 0."""
    settings, _meters, rows = two_days
    env = {
        **os.environ,
        "METERFLOW_DATA_DIR": str(settings.data_dir),
        "METERFLOW_READING_INTERVAL_SECONDS": str(DEFAULT_INTERVAL),
        "SPARK_MASTER": "local[1]",
    }
    result = subprocess.run(
        [sys.executable, "-m", "meterflow.cli", "batch", "--date", str(D1)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = views.DayReport.from_json(result.stdout.strip().splitlines()[-1])
    assert (printed.status, printed.readings) == (views.STATUS_OK, len(rows[D1]))
    assert views.read_report(settings.views_path, D1) == printed
