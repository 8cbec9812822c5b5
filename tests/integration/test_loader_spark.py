"""Publishing batch views to MongoDB and checking a published day.

MongoDB is mongomock unless MONGO_URI names a server (then each test has its own
database). The views come from the real batch job on a small lake (tests/lake_helpers.py).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from lake_helpers import D1, D2, fleet_meters, make_rows, run_batch, write_lake_day
from mongomock_client import MOCK_SCHEME
from pyspark.sql import SparkSession

from meterflow import cli
from meterflow.batch import views
from meterflow.clients import mongo
from meterflow.core import lake
from meterflow.core.config import Settings
from meterflow.core.contract import MeterType
from meterflow.serving.checks import CheckFailed, check_day
from meterflow.serving.loader import MONTHLY_TARGETS, TARGETS, ViewMissingError, publish_day

#: The collections holding one document per day and key, and those per month and key.
COLLECTIONS = tuple(collection for collection, _ in TARGETS.values())
MONTHLY = tuple(collection for collection, _ in MONTHLY_TARGETS.values())


@pytest.fixture
def published(spark: SparkSession, env: dict[str, str]):
    """Two days of a small fleet through the batch job and the loader."""
    settings = Settings.from_env(env)
    meters = fleet_meters(settings)
    rows = {D1: make_rows(meters, D1, seed=5), D2: make_rows(meters, D2, seed=6)}
    db = mongo.database(settings)
    for day, day_rows in rows.items():
        write_lake_day(settings, day, day_rows)
        run_batch(spark, settings, day)
        publish_day(settings.views_path, day, db)
    yield settings, db, meters, rows
    if not settings.mongo_uri.startswith(MOCK_SCHEME):
        db.client.drop_database(settings.mongo_db)


def snapshot(db: Any, day: date) -> dict[str, list[dict]]:
    """Every document of ``day``, reports without their load time."""
    docs = {
        name: sorted(db[name].find({"day": str(day)}), key=lambda d: d["_id"])
        for name in COLLECTIONS
    }
    docs[mongo.DAILY_REPORTS] = [
        {k: v for k, v in d.items() if k != "loaded_at"}
        for d in db[mongo.DAILY_REPORTS].find({"_id": str(day)})
    ]
    return docs


def test_documents_follow_the_lake_and_republishing_changes_nothing(published) -> None:
    settings, db, meters, rows = published
    frame = pd.DataFrame(rows[D1])
    frame["good_value"] = frame["consumption"].where(frame["fault_code"].isna())
    by_meter = frame.groupby("device_id")
    midnight = datetime(D1.year, D1.month, D1.day, tzinfo=UTC)

    docs = {d["device_id"]: d for d in db[mongo.DAILY_METER_AVERAGES].find({"day": str(D1)})}
    assert set(docs) == {m for m, _ in meters}
    for device_id, doc in docs.items():
        assert doc["_id"] == f"{D1}|{device_id}"
        assert doc["date"] == midnight
        assert doc["reading_count"] == by_meter.size()[device_id]
        assert doc["faulty_count"] == by_meter["fault_code"].count()[device_id]
        mean = by_meter["good_value"].mean()[device_id]
        assert doc["avg"] is None if pd.isna(mean) else doc["avg"] == pytest.approx(mean)
        assert doc["completeness"] == pytest.approx(doc["reading_count"] / 96)
    types = {d["_id"]: d for d in db[mongo.DAILY_TYPE_AVERAGES].find({"day": str(D1)})}
    assert {k: d["reading_count"] for k, d in types.items()} == {
        f"{D1}|{t}": n for t, n in frame.groupby("meter_type").size().items()
    }
    district_ids = {d["_id"] for d in db[mongo.DAILY_DISTRICT_AVERAGES].find({"day": str(D1)})}
    assert all(i.count("|") == 2 for i in district_ids) and district_ids
    report = db[mongo.DAILY_REPORTS].find_one({"_id": str(D1)})
    assert (report["status"], report["readings"], report["date"]) == ("ok", len(frame), midnight)

    before = {day: snapshot(db, day) for day in (D1, D2)}
    again = publish_day(settings.views_path, D1, db)
    assert again.deleted == dict.fromkeys([*COLLECTIONS, *MONTHLY], 0)
    assert {day: snapshot(db, day) for day in (D1, D2)} == before


def test_republishing_replaces_the_day(spark: SparkSession, published) -> None:
    settings, db, meters, rows = published
    d2_before = snapshot(db, D2)
    dropped = meters[2][0]  # decommissioned: out of the registry and silent
    registry_file = lake.registry_file(settings.lake_path)
    registry = pq.read_table(registry_file)
    pq.write_table(registry.filter(pc.not_equal(registry["device_id"], dropped)), registry_file)
    write_lake_day(settings, D1, [r for r in rows[D1] if r["device_id"] != dropped])
    run_batch(spark, settings, D1)
    load = publish_day(settings.views_path, D1, db)
    assert load.deleted[mongo.DAILY_METER_AVERAGES] == 1
    assert db[mongo.DAILY_METER_AVERAGES].find_one({"_id": f"{D1}|{dropped}"}) is None
    assert db[mongo.DAILY_METER_AVERAGES].count_documents({"day": str(D1)}) == len(meters) - 1
    assert snapshot(db, D2) == d2_before
    check_day(settings.lake_path, D1, db)

    # The day's partition is gone: a no_data day clears D's documents, keeps its report,
    # and its check fails, since the registry still expects readings from its meters.
    for file in Path(settings.lake_path, "readings", f"date={D1}").glob("*"):
        file.unlink()
    assert run_batch(spark, settings, D1).status == views.STATUS_NO_DATA
    load = publish_day(settings.views_path, D1, db)
    daily = {name: n for name, n in load.upserted.items() if name not in MONTHLY}
    assert daily == {**dict.fromkeys(COLLECTIONS, 0), mongo.DAILY_REPORTS: 1}
    assert all(db[c].count_documents({"day": str(D1)}) == 0 for c in COLLECTIONS)
    assert db[mongo.DAILY_REPORTS].find_one({"_id": str(D1)})["status"] == "no_data"
    installed = pq.read_table(registry_file)["installed_on"].to_pylist()
    registered = sum(day is None or day <= D1 for day in installed)
    with pytest.raises(CheckFailed, match=f"no readings for {registered} registered meters"):
        check_day(settings.lake_path, D1, db)
    assert snapshot(db, D2) == d2_before


def test_checks_catch_what_disagrees(published) -> None:
    settings, db, meters, _rows = published
    passed = check_day(settings.lake_path, D1, db)
    assert passed.documents[mongo.DAILY_METER_AVERAGES] == len(meters)

    meter_docs = db[mongo.DAILY_METER_AVERAGES]
    meter_docs.delete_one({"_id": f"{D1}|{meters[0][0]}"})
    with pytest.raises(CheckFailed, match="daily_meter_averages holds"):
        check_day(settings.lake_path, D1, db)
    publish_day(settings.views_path, D1, db)

    type_doc = db[mongo.DAILY_TYPE_AVERAGES].find_one({"day": str(D1)})
    db[mongo.DAILY_TYPE_AVERAGES].update_one(
        {"_id": type_doc["_id"]}, {"$inc": {"reading_count": 1}}
    )
    with pytest.raises(CheckFailed, match="readings per type in MongoDB"):
        check_day(settings.lake_path, D1, db)
    publish_day(settings.views_path, D1, db)

    meter_docs.update_one({"_id": f"{D1}|{meters[1][0]}"}, {"$set": {"avg": -0.5}})
    with pytest.raises(CheckFailed, match="negative avg"):
        check_day(settings.lake_path, D1, db)
    publish_day(settings.views_path, D1, db)

    meter_docs.update_one({"_id": f"{D1}|{meters[1][0]}"}, {"$unset": {"completeness": ""}})
    with pytest.raises(CheckFailed, match="no completeness"):
        check_day(settings.lake_path, D1, db)
    publish_day(settings.views_path, D1, db)
    check_day(settings.lake_path, D1, db)

    # Late data: the lake now has readings the published day does not count.
    extra = make_rows(meters[:1], D2, seed=9)
    write_lake_day(settings, D2, extra)
    with pytest.raises(CheckFailed, match="differ from the lake"):
        check_day(settings.lake_path, D2, db)


def test_device_with_two_types_publishes_one_document_and_checks_in_total(
    spark: SparkSession, env: dict[str, str], db: Any
) -> None:
    settings = Settings.from_env(env)
    meters = fleet_meters(settings, count=3)
    rows = make_rows(meters, D1, seed=7)
    device, first_type = meters[0]
    other = next(str(t) for t in MeterType if str(t) != first_type)
    mixed = next(r for r in rows if r["device_id"] == device)
    mixed["meter_type"] = other
    write_lake_day(settings, D1, rows)
    assert run_batch(spark, settings, D1).mixed_type_meters == 1

    publish_day(settings.views_path, D1, db)

    assert db[mongo.DAILY_METER_AVERAGES].count_documents({"day": str(D1)}) == len(meters)
    assert db[mongo.DAILY_REPORTS].find_one({"_id": str(D1)})["mixed_type_meters"] == 1
    passed = check_day(settings.lake_path, D1, db)
    assert any("two meter types" in note for note in passed.notes)
    write_lake_day(settings, D1, rows + make_rows(meters[1:2], D1, seed=8))  # late data
    with pytest.raises(CheckFailed, match="differ from the lake"):
        check_day(settings.lake_path, D1, db)


def test_load_and_check_commands(
    published, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["load", "--date", str(D1)]) == 0
    assert cli.main(["check", "--date", str(D1)]) == 0
    assert "passed" in capsys.readouterr().out
    _settings, db, meters, _rows = published
    db[mongo.DAILY_METER_AVERAGES].delete_one({"_id": f"{D1}|{meters[0][0]}"})
    assert cli.main(["check", "--date", str(D1)]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert cli.main(["load", "--date", "2024-01-01"]) == 2


def test_a_failed_rerun_leaves_nothing_to_publish(spark: SparkSession, published) -> None:
    """A re-run that dies midway must not let the loader publish half-replaced views."""
    settings, db, _meters, _rows = published
    before = snapshot(db, D1)
    (Path(settings.registry_path) / "meters.parquet").write_bytes(b"not parquet")
    with pytest.raises(Exception, match=r"(?i)parquet"):
        run_batch(spark, settings, D1)
    assert views.read_report(settings.views_path, D1) is None
    with pytest.raises(ViewMissingError):
        publish_day(settings.views_path, D1, db)
    with pytest.raises(CheckFailed, match="no batch report"):
        check_day(settings.lake_path, D1, db)
    assert snapshot(db, D1) == before  # what MongoDB served is left as it was


def test_backfilling_days_equals_running_them_one_by_one(
    spark: SparkSession, env: dict[str, str]
) -> None:
    """What a catch-up or backfill does (every day's job first, in any order, then every
    load) gives the same MongoDB documents as the days run one after the other."""
    one_by_one = Settings.from_env(env)
    backfill = Settings.from_env({**env, "MONGO_DB": f"{env['MONGO_DB']}_backfill"})
    meters = fleet_meters(one_by_one)
    days = [D1 + timedelta(days=i) for i in range(4)]
    for i, day in enumerate(days):
        write_lake_day(one_by_one, day, make_rows(meters, day, seed=100 + i))

    for day in days:
        run_batch(spark, one_by_one, day)
        publish_day(one_by_one.views_path, day, mongo.database(one_by_one))
    for day in reversed(days):
        run_batch(spark, backfill, day)
    for day in days[::2] + days[1::2]:
        publish_day(backfill.views_path, day, mongo.database(backfill))

    def documents(settings: Settings) -> list:
        db = mongo.database(settings)
        found = [snapshot(db, day) for day in days]
        for day in found:
            for report in day[mongo.DAILY_REPORTS]:
                report.pop("job_seconds")  # wall time of that run
        return found

    expected = documents(one_by_one)
    assert sum(len(d[mongo.DAILY_METER_AVERAGES]) for d in expected) == len(days) * len(meters)
    assert documents(backfill) == expected
    if not backfill.mongo_uri.startswith(MOCK_SCHEME):
        mongo.database(backfill).client.drop_database(backfill.mongo_db)
