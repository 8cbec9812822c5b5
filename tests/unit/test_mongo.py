"""``meterflow init-mongo``: indexes (TTL included) and the registry in ``meters``, on
mongomock or the server ``MONGO_URI`` names. The local MongoDB stand-in's networked smoke
test, and a server that does not answer, are in tests/integration/test_mongo_network.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pymongo.errors import DuplicateKeyError

from meterflow import cli
from meterflow.clients import mongo
from meterflow.core.config import Settings
from meterflow.serving import indexes as serving
from simulator.fleet import build_fleet, write_registry

DAY_S = 86_400


def settings_for(tmp_path: Path, mongo_uri: str, db_name: str, **env: str) -> Settings:
    return Settings.from_env(
        {
            "MONGO_URI": mongo_uri,
            "MONGO_DB": db_name,
            "METERFLOW_DATA_DIR": str(tmp_path / "data"),
            **env,
        }
    )


def ttl_of(db: Any, collection: str) -> dict[str, int]:
    return {
        name: info["expireAfterSeconds"]
        for name, info in db[collection].index_information().items()
        if "expireAfterSeconds" in info
    }


def test_init_mongo_is_idempotent_and_follows_ttl_changes(
    db: Any, tmp_path: Path, mongo_uri: str, mongo_db_name: str
) -> None:
    settings = settings_for(tmp_path, mongo_uri, mongo_db_name)
    first = serving.init_mongo(db, settings.abnormal_ttl_days, settings.registry_path)
    default_days = Settings.from_env({}).abnormal_ttl_days
    specs = serving.index_specs(default_days)
    assert set(first.indexes.values()) == {"created"}
    for spec in specs:
        info = db[spec.collection].index_information()[spec.name]
        assert tuple((k, int(d)) for k, d in info["key"]) == spec.keys
    assert ttl_of(db, mongo.ABNORMAL_READINGS) == {"ttl_detected_at": default_days * DAY_S}
    assert ttl_of(db, mongo.INCIDENTS) == {"ttl_closed_at": default_days * DAY_S}

    before = {c: db[c].index_information() for c in {s.collection for s in specs}}
    again = serving.init_mongo(db, settings.abnormal_ttl_days, settings.registry_path)
    assert set(again.indexes.values()) == {"unchanged"}
    assert {c: db[c].index_information() for c in before} == before

    shorter = settings_for(tmp_path, mongo_uri, mongo_db_name, METERFLOW_ABNORMAL_TTL_DAYS="7")
    changed = serving.init_mongo(db, shorter.abnormal_ttl_days, shorter.registry_path).indexes
    assert changed["abnormal_readings.ttl_detected_at"] in ("ttl-updated", "ttl-rebuilt")
    assert ttl_of(db, mongo.ABNORMAL_READINGS) == {"ttl_detected_at": 7 * DAY_S}
    assert ttl_of(db, mongo.INCIDENTS) == {"ttl_closed_at": 7 * DAY_S}
    assert {k for k, v in changed.items() if v != "unchanged"} == {
        "abnormal_readings.ttl_detected_at",
        "incidents.ttl_closed_at",
    }

    forever = settings_for(tmp_path, mongo_uri, mongo_db_name, METERFLOW_ABNORMAL_TTL_DAYS="0")
    dropped = serving.init_mongo(db, forever.abnormal_ttl_days, forever.registry_path).indexes
    assert dropped["abnormal_readings.ttl_detected_at"] == "dropped"
    assert ttl_of(db, mongo.ABNORMAL_READINGS) == {} and ttl_of(db, mongo.INCIDENTS) == {}
    assert "device_time" in db[mongo.ABNORMAL_READINGS].index_information()


def test_one_open_incident_per_device_any_number_closed(db: Any) -> None:
    serving.ensure_indexes(db, 30)
    incidents = db[mongo.INCIDENTS]
    now = datetime.now(UTC)
    for n in range(2):
        incidents.insert_one(
            {"_id": f"em1|{n}", "device_id": "em1", "status": "closed", "closed_at": now}
        )
    incidents.insert_one({"_id": "em1|2", "device_id": "em1", "status": "open"})
    incidents.insert_one({"_id": "em2|0", "device_id": "em2", "status": "open"})
    with pytest.raises(DuplicateKeyError):
        incidents.insert_one({"_id": "em1|3", "device_id": "em1", "status": "open"})
    # A stateful rule's incidents carry their episode id: several open beside the other.
    for code in ("STUCK", "NO_DATA"):
        episode = f"em1|{code}|0"
        incidents.insert_one(
            {"_id": episode, "episode_id": episode, "device_id": "em1", "status": "open"}
        )
    assert incidents.count_documents({"device_id": "em1", "status": "open"}) == 3


def test_registry_loads_into_meters_and_reloads_without_duplicates(
    db: Any, tmp_path: Path, mongo_uri: str, mongo_db_name: str
) -> None:
    settings = settings_for(tmp_path, mongo_uri, mongo_db_name)
    ttl, lake_registry = settings.abnormal_ttl_days, settings.registry_path
    assert serving.init_mongo(db, ttl, lake_registry).registry is None  # no simulator has run yet
    fleet = build_fleet(40, seed=3)
    write_registry(fleet, settings.registry_path, interval_seconds=600)
    loaded = serving.init_mongo(db, ttl, lake_registry).registry
    assert (loaded.meters, loaded.new, loaded.updated) == (len(fleet), len(fleet), 0)
    docs = {d["_id"]: d for d in db[mongo.METERS].find()}
    assert set(docs) == set(fleet.device_ids)
    for meter in fleet.meters:
        doc = docs[meter.device_id]
        for name in ("device_id", "household_id", "owner", "address", "district", "city"):
            assert doc[name] == getattr(meter, name)
        assert doc["meter_type"] == str(meter.meter_type)
        assert (doc["latitude"], doc["longitude"]) == (meter.latitude, meter.longitude)
        installed = doc["installed_on"].replace(tzinfo=UTC)
        assert installed == datetime(*meter.installed_on.timetuple()[:3], tzinfo=UTC)
        assert doc["interval_seconds"] == 600
        assert "scale" not in doc

    # A re-run changes nothing; a registry with another owner updates that meter only.
    rerun = serving.init_mongo(db, ttl, lake_registry).registry
    assert (rerun.meters, rerun.new, rerun.updated) == (len(fleet), 0, 0)
    other = tmp_path / "elsewhere"
    changed = build_fleet(40, seed=3)
    changed.meters[0] = type(changed.meters[0])(
        **{**changed.meters[0].__dict__, "owner": "Someone Else"}
    )
    path = write_registry(changed, str(other), interval_seconds=600)
    reloaded = serving.init_mongo(db, ttl, path, required=True).registry
    assert (reloaded.new, reloaded.updated) == (0, 1)
    assert db[mongo.METERS].count_documents({}) == len(fleet)
    assert db[mongo.METERS].find_one({"_id": changed.meters[0].device_id})["owner"] == (
        "Someone Else"
    )

    # A smaller fleet replaces the registry: the meters it no longer has leave ``meters``.
    smaller = write_registry(build_fleet(30, seed=3), str(tmp_path / "smaller"), 600)
    shrunk = serving.init_mongo(db, ttl, smaller, required=True).registry
    assert (shrunk.meters, shrunk.removed) == (30, len(fleet) - 30)
    assert db[mongo.METERS].count_documents({}) == 30


def test_init_mongo_command(
    tmp_path: Path,
    mongo_uri: str,
    mongo_db_name: str,
    db: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    fleet = build_fleet(12, seed=1)
    path = write_registry(fleet, str(tmp_path / "registry"))
    for name, value in {
        "MONGO_URI": mongo_uri,
        "MONGO_DB": mongo_db_name,
        "METERFLOW_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["init-mongo", "--registry", path]) == 0
    out = capsys.readouterr().out
    assert f"registry: {len(fleet)} meters from {path}" in out
    assert db[mongo.METERS].count_documents({}) == len(fleet)
    assert cli.main(["init-mongo", "--registry", str(tmp_path / "missing.parquet")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "level=" not in x]
    assert len(err) == 1 and "missing.parquet" in err[0]
