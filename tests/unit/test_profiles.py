"""Per-meter overrides from the registry (meterflow.stream.detection.profiles): what is
read, what is refused, and that a meter's own thresholds change what the rules
(meterflow.stream.detection.rules) decide for it."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meterflow.core.contract import FaultCode, MeterType
from meterflow.core.errors import ConfigError
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import parse_timestamp_us
from meterflow.stream.detection.profiles import MeterProfile, load_profiles
from meterflow.stream.detection.rules import Meter, MeterState, Observed, observe
from simulator.fleet import build_fleet, read_registry, write_registry

RULES = DetectionRules()
T0 = parse_timestamp_us("2024-05-27T00:00:00Z")
STEP = 900


def registry(tmp_path: Path, **columns: list[Any] | pa.Array) -> str:
    """A registry directory whose meters.parquet holds ``columns`` (device_id first)."""
    root = tmp_path / "registry"
    root.mkdir(exist_ok=True)
    pq.write_table(pa.table(columns), root / "meters.parquet")
    return str(root)


def test_no_registry_and_no_override_columns_give_the_defaults(tmp_path: Path) -> None:
    assert load_profiles(str(tmp_path / "nowhere"), RULES) == {}
    plain = registry(tmp_path, device_id=["em1", "wm1"], meter_type=["electricity", "water"])
    assert load_profiles(plain, RULES) == {}


def test_the_simulators_registry_gives_intervals_only(tmp_path: Path) -> None:
    fleet = build_fleet(30, seed=3)
    path = write_registry(fleet, str(tmp_path / "registry"), interval_seconds=600)
    profiles = load_profiles(path, RULES)  # the file itself names it too
    assert profiles.keys() == set(fleet.device_ids)
    assert {profile for profile in profiles.values()} == {MeterProfile(600, None)}
    assert len({id(profile) for profile in profiles.values()}) == 1  # one shared profile


def test_overrides_replace_only_their_thresholds_and_nulls_keep_the_default(
    tmp_path: Path,
) -> None:
    path = registry(
        tmp_path,
        device_id=["em1", "em2", "wm1", "wm2", "gm1"],
        meter_type=["electricity", "electricity", "water", "water", "gas"],
        interval_seconds=pa.array([900, 900, None, None, 1800], pa.int32()),
        stuck_readings=pa.array([3.0, 3.0, None, None, None]),  # as pandas writes ints
        spike_min=[None, None, 500.0, None, None],
        leak_min_night_flow=[None, None, None, None, None],
    )
    profiles = load_profiles(path, RULES)
    assert set(profiles) == {"em1", "em2", "wm1", "gm1"}  # wm2: nothing of its own
    em1, wm1, gm1 = profiles["em1"], profiles["wm1"], profiles["gm1"]
    assert em1 is profiles["em2"]  # the same settings share one profile
    assert em1.interval_s == 900 and em1.rules is not None
    assert em1.rules.stuck_readings == 3 and isinstance(em1.rules.stuck_readings, int)
    assert em1.rules.spike_min == RULES.spike_min
    assert wm1.interval_s is None and wm1.rules is not None
    assert wm1.rules.spike_min[MeterType.WATER] == 500.0
    assert wm1.rules.stuck_readings == RULES.stuck_readings
    assert wm1.rules.leak_min_night_flow == RULES.leak_min_night_flow
    assert gm1 == MeterProfile(1800, None)
    assert pickle.loads(pickle.dumps(profiles)) == profiles


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("stuck_readings", 1, "must be a whole number at least 2"),
        ("stuck_readings", 3.5, "must be a whole number at least 2"),
        ("nodata_intervals", 0, "must be a whole number at least 1"),
        ("interval_seconds", 0, "must be a whole number at least 1"),
        ("interval_seconds", -900, "must be a whole number at least 1"),
        ("spike_factor", 0.5, "must be a number above 1"),
        ("spike_min", -1.0, "must be a number above 0"),
        ("stuck_min", 0.0, "must be a number above 0"),
        ("leak_min_night_flow", float("nan"), "must be a number above 0"),
    ],
)
def test_a_bad_override_is_one_line_naming_meter_column_and_value(
    tmp_path: Path, column: str, value: float, expected: str
) -> None:
    path = registry(tmp_path, device_id=["em1", "em2"], **{column: [None, value]})
    with pytest.raises(ConfigError) as raised:
        load_profiles(path, RULES)
    message = str(raised.value)
    assert "\n" not in message
    assert f"meter em2 has {column}={value!r}" in message and expected in message
    assert "set it to null for the default" in message


def test_a_column_that_is_not_numeric_is_refused(tmp_path: Path) -> None:
    path = registry(tmp_path, device_id=["em1"], spike_factor=["12"])
    with pytest.raises(ConfigError, match="column spike_factor is string; it must be numeric"):
        load_profiles(path, RULES)


def test_the_simulators_reader_ignores_override_columns(tmp_path: Path) -> None:
    """Operators add override columns to a registry; the simulator's reader still reads it."""
    fleet = build_fleet(5, seed=1)
    path = write_registry(fleet, str(tmp_path / "registry"), interval_seconds=900)
    table = pq.read_table(path)
    table = table.append_column("stuck_readings", pa.array([3, None, None, None, None]))
    pq.write_table(table, path)
    assert read_registry(path).meters == fleet.meters
    assert load_profiles(path, RULES)[fleet.device_ids[0]].rules is not None


def normal(i: int) -> float:
    return round(0.2 + 0.05 * ((i * 7) % 11) + 0.001 * (i % 13), 3)


def test_a_meters_own_spike_floor_keeps_it_quiet_where_the_default_alarms(
    tmp_path: Path,
) -> None:
    path = registry(tmp_path, device_id=["em1", "em2"], spike_min=[None, 50.0])
    profiles = load_profiles(path, RULES)
    own = profiles["em2"].rules
    assert "em1" not in profiles and own is not None
    readings = [Observed(T0 + i * STEP * 1_000_000, normal(i)) for i in range(110)]
    jump = [Observed(T0 + 110 * STEP * 1_000_000, 12.0)]  # 12 kWh: above 1, below 50
    codes = {}
    for device_id, rules in (("em1", RULES), ("em2", own)):
        meter = Meter(device_id, MeterType.ELECTRICITY, STEP, rules)
        state = MeterState()
        assert observe(meter, state, readings) == []
        codes[device_id] = [d.code for d in observe(meter, state, jump)]
    assert codes == {"em1": [FaultCode.SPIKE], "em2": []}
