"""The stream follows a re-imported registry (meterflow.stream.detection.reload): a changed
file gives new profiles once, an unusable one keeps the old with one warning, and the
supervisor restarts only the detection query with them. Spark-free: the queries are fakes
with the few members the supervisor uses (the query's own restart is Spark's)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import log_records

from meterflow.core import registry
from meterflow.core.config import Settings
from meterflow.core.thresholds import DetectionRules
from meterflow.stream import supervisor as supervising
from meterflow.stream.detection.profiles import MeterProfile
from meterflow.stream.detection.query import QUERY_NAME as DETECTOR_QUERY
from meterflow.stream.detection.reload import RegistryWatcher

RULES = DetectionRules()


def write(root: Path, interval: int, spike_factor: float | None = None) -> None:
    table, problems = registry.validate(
        pa.table(
            {
                "device_id": ["em1", "wm1"],
                "meter_type": ["electricity", "water"],
                "interval_seconds": [interval, interval],
                "spike_factor": pa.array([spike_factor, None], pa.float64()),
            }
        )
    )
    assert problems == []
    registry.write(table, str(root))


def messages(records: list[Any]) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("detect=profiles_")]


def test_a_changed_registry_reloads_once_and_a_bad_one_keeps_the_old(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    write(root, 900)
    watcher, profiles = RegistryWatcher.start(str(root), RULES)
    assert profiles["em1"] == MeterProfile(900, None)
    assert watcher.reload() is None  # unchanged: one stat, nothing read

    with log_records() as records:
        write(root, 600, spike_factor=20.0)
        reloaded = watcher.reload()
        assert reloaded is not None and reloaded["em1"].interval_s == 600
        assert reloaded["em1"].rules is not None and reloaded["em1"].rules.spike_factor == 20.0
        assert watcher.reload() is None

        # A hand-edited file the detector cannot use: the old profiles stay, said once.
        table = registry.read(str(root))
        bad = table.set_column(3, "spike_factor", pa.array([0.5, None], pa.float64()))
        pq.write_table(bad, root / "meters.parquet")
        assert watcher.reload() is None
        assert watcher.reload() is None
    lines = messages(records)
    assert len(lines) == 2
    assert lines[0] == f"detect=profiles_reloaded registry={root}/meters.parquet meters=2"
    assert lines[1].startswith(f"detect=profiles_kept registry={root}/meters.parquet reason=")
    assert "meter em1 has spike_factor=0.5" in lines[1] and "\n" not in lines[1]

    write(root, 1800)  # fixed: followed again
    fixed = watcher.reload()
    assert fixed is not None and fixed["wm1"].interval_s == 1800


class FakeQuery:
    """A running query as the supervisor sees it."""

    def __init__(self, name: str = DETECTOR_QUERY) -> None:
        self.name = name
        self.isActive = True
        self.status = {"isTriggerActive": False}

    def stop(self) -> None:
        self.isActive = False

    def exception(self) -> None:
        return None


class FakePublisher:
    def __init__(self, totals: dict[str, int]) -> None:
        self.totals = Counter(totals)
        self.stopping = False
        self.failure = None


def test_the_supervisor_restarts_only_the_detector_with_the_new_profiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path / "data")})
    write(Path(settings.registry_path), 900)
    watcher, _ = RegistryWatcher.start(settings.registry_path, RULES)
    supervisor = supervising.Supervisor(settings, spark=None, source_format="test")  # type: ignore[arg-type]
    started: list[dict[str, MeterProfile]] = []
    new_publisher, new_detector = FakePublisher({}), FakeQuery()

    def start_detector(profiles: dict[str, MeterProfile]) -> tuple[Any, Any]:
        started.append(profiles)
        return new_publisher, new_detector

    monkeypatch.setattr(supervisor, "_start_detector", start_detector)
    lake_query, detector, publisher = (
        FakeQuery(supervising.QUERY_NAME),
        FakeQuery(),
        FakePublisher({"open_STUCK": 2}),
    )
    start = supervising._Start(publisher=publisher)  # type: ignore[arg-type]
    queries: list[Any] = [lake_query, detector]

    supervisor._follow_registry(watcher, start, queries)
    assert started == [] and detector.isActive  # unchanged registry: nothing restarts

    write(Path(settings.registry_path), 600)
    supervisor._follow_registry(watcher, start, queries)
    assert [p["em1"].interval_s for p in started] == [600]
    assert not detector.isActive and publisher.stopping
    assert lake_query.isActive and queries == [lake_query, new_detector]
    assert start.publisher is new_publisher
    assert start.totals["open_STUCK"] == 2  # the old detector's episodes still count


def test_await_queries_checks_once_per_wait_and_stops_with_the_queries() -> None:
    class Ending(FakeQuery):
        def __init__(self, waits: int) -> None:
            super().__init__()
            self.waits = waits

        def awaitTermination(self, timeout: float) -> bool:
            self.waits -= 1
            self.isActive = self.waits > 0
            return not self.isActive

    checks: list[int] = []
    query = Ending(waits=3)
    supervising.await_queries([query], threading.Event(), lambda: checks.append(1))  # type: ignore[list-item]
    assert len(checks) == 2  # after each wait the queries outlived, not after the last
