"""MongoDB over TCP: the local stand-in (nx-27017) started on demand, a networked smoke
test only (the reference is mongomock or the server ``MONGO_URI`` names, as in
tests/unit/test_mongo.py), and ``meterflow init-mongo`` waiting out a server that does not
answer."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from helpers import free_port as _free_port

from meterflow import cli
from meterflow.clients import mongo
from meterflow.core import classifier
from meterflow.core.config import Settings
from meterflow.core.events import abnormal_event, meter_status_update
from meterflow.local import mongo as local_mongo
from meterflow.serving import indexes as serving
from meterflow.serving.sink import ServingWriter, decode_abnormal, decode_status


def test_smoke_local_stand_in_over_tcp(tmp_path: Path) -> None:
    """SMOKE TEST: nx-27017 started on demand, written by the sink's writer, read back."""
    settings = Settings.from_env(
        {
            "MONGO_URI": "",
            "METERFLOW_LOCAL_MONGO_PORT": str(_free_port()),
            "METERFLOW_DATA_DIR": str(tmp_path / "data"),
        }
    )
    reading = classifier.evaluate(
        b'{"device_id": "gm7", "timestamp": "2024-05-27T15:57:53Z", "usage_m3": -1}', 10**18
    )
    now_us = int(datetime.now(UTC).timestamp() * 1e6)  # not expired by the TTL index
    event = msgspec.to_builtins(abnormal_event(reading, "iot-meter", "AaIrU8Vb", 0, 42, now_us))
    status = msgspec.to_builtins(
        meter_status_update("gm7", "gas", reading.event_time_us, -1.0, "SENTINEL", 1, 1, 1)
    )
    with local_mongo.mongo_for(settings) as (live, local):
        assert local is not None and live.mongo_uri.startswith("mongodb://127.0.0.1:")
        db = mongo.database(live)
        serving.ensure_indexes(db, 30)
        writer = ServingWriter(db, 900)
        for _ in range(2):  # the second time, everything is a duplicate
            writer.write(
                [decode_abnormal(json.dumps(event).encode())],
                [decode_status(json.dumps(status).encode())],
            )
        stored = db[mongo.ABNORMAL_READINGS].find_one({"device_id": "gm7"})
        assert stored["event_id"] == event["event_id"] and stored["fault_code"] == "SENTINEL"
        assert db[mongo.ABNORMAL_READINGS].count_documents({}) == 1
        assert db[mongo.METER_STATUS].find_one({"_id": "gm7"})["fault_count"] == 1
        # A second mongo_for reuses the running stand-in instead of starting another.
        with local_mongo.mongo_for(settings) as (again, second):
            assert second is None and again.mongo_uri == live.mongo_uri
    assert (tmp_path / "data" / "mongo").is_dir()
    assert (tmp_path / "data" / "logs" / "mongo.log").exists()


def test_unreachable_mongodb_is_a_one_line_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    uri = f"mongodb://meter:s3cret@127.0.0.1:{_free_port()}/"
    monkeypatch.setenv("MONGO_URI", uri)
    monkeypatch.setenv("METERFLOW_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(["init-mongo"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "level=" not in x]
    assert len(err) == 1 and "did not answer" in err[0]
    assert "s3cret" not in err[0]  # credentials never reach the logs
