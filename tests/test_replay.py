"""Replay of real recordings (UCI, AMPds2), on small files written here in those formats."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from meterflow.contract import FaultCode, MeterType, Reading, evaluate
from simulator.replay import ReplayError, detect, replay

UCI = """Date;Time;Global_active_power;Global_reactive_power;Voltage;Global_intensity;Sub_metering_1;Sub_metering_2;Sub_metering_3
16/12/2006;17:24:00;4.216;0.418;234.840;18.400;0.000;1.000;17.000
16/12/2006;17:25:00;5.360;0.436;233.630;23.000;0.000;1.000;16.000
16/12/2006;17:26:00;?;?;?;?;?;?;
16/12/2006;17:27:00;3.000;0.1
32/12/2006;17:28:00;3.000;0.1;233.0;10.0;0.0;1.0;16.0
16/12/2006;17:29:00;1.200;0.1;233.0;10.0;0.0;1.0;16.0
"""

AMPDS_ELECTRICITY = """unix_ts,V,I,f,DPF,APF,P,Pt,Q,Qt,S,St
1333263600,120.2,5.1,60.0,0.98,0.95,600,100,20,5,620,110
1333263660,120.1,5.0,60.0,0.98,0.95,1200,110,20,5,1220,120
1333263720,120.0,5.0,60.0,0.98,0.95,,120,20,5,1220,130
"""

AMPDS_WATER = """unix_ts,counter,avg_rate,inst_rate
1333263600,1000.0,2.0,2.0
1333263660,1003.5,3.5,3.0
1333263720,?,0,0
1333263780,1010.0,3.25,4.0
1333263840,oops
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def collect(path: Path, **options) -> tuple[list[dict], object]:
    sent: list[bytes] = []
    summary = replay(path, lambda key, value: sent.append(value), **options)
    return [json.loads(v) for v in sent], summary


def test_uci_rows_become_electricity_readings(tmp_path: Path) -> None:
    messages, summary = collect(write(tmp_path, "household_power_consumption.txt", UCI))
    assert (summary.rows, summary.sent, summary.missing_values, summary.bad_rows) == (4, 4, 1, 2)
    assert summary.bad_lines == [5, 6]
    first = messages[0]
    assert first["timestamp"] == "2006-12-16T17:24:00Z"
    assert first["meter_type"] == "electricity"
    assert first["usage_kwh"] == pytest.approx(4.216 / 60, abs=1e-6)
    assert first["device_id"].startswith("em")


def test_missing_values_are_flagged_by_the_pipeline(tmp_path: Path) -> None:
    messages, _ = collect(write(tmp_path, "uci.txt", UCI))
    now = int(time.time() * 1_000_000)
    outcomes = [evaluate(json.dumps(m).encode(), now) for m in messages]
    assert all(isinstance(o, Reading) for o in outcomes)
    assert [o.fault_code for o in outcomes] == [None, None, FaultCode.MISSING_METRIC, None]


def test_ampds_electricity_power_to_energy(tmp_path: Path) -> None:
    messages, summary = collect(write(tmp_path, "Electricity_WHE.csv", AMPDS_ELECTRICITY))
    assert summary.sent == 3 and summary.missing_values == 1
    assert messages[0]["usage_kwh"] == pytest.approx(0.6 / 60, abs=1e-6)  # 600 W for one minute
    assert messages[1]["usage_kwh"] == pytest.approx(1.2 / 60, abs=1e-6)
    assert "usage_kwh" not in messages[2]
    assert messages[0]["timestamp"] == "2012-04-01T07:00:00Z"


def test_ampds_water_counter_to_usage_and_flow(tmp_path: Path) -> None:
    messages, summary = collect(write(tmp_path, "Water_WHW.csv", AMPDS_WATER))
    assert summary.bad_rows == 1 and summary.bad_lines == [6]
    assert [m.get("usage") for m in messages] == [2.0, 3.5, None, 6.5]
    assert messages[1]["flow_rate"] == 3.5
    assert {m["meter_type"] for m in messages} == {"water"}


def test_ampds_gas_from_file_name(tmp_path: Path) -> None:
    messages, _ = collect(write(tmp_path, "NaturalGas_WHG.csv", AMPDS_WATER))
    assert {m["meter_type"] for m in messages} == {str(MeterType.GAS)}
    assert "usage_m3" in messages[1] and "flow_rate" not in messages[1]


def test_speedup_paces_and_rebase_moves_to_now(tmp_path: Path) -> None:
    path = write(tmp_path, "Electricity_WHE.csv", AMPDS_ELECTRICITY)
    started = time.monotonic()
    messages, _ = collect(path, speedup=240, rebase=True)  # 2 recorded minutes in 0.5 s
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 5
    first = messages[0]["timestamp"]
    assert abs(time.time() - time.mktime(time.strptime(first, "%Y-%m-%dT%H:%M:%SZ"))) < 5 + abs(
        time.timezone
    )


def test_unknown_format_is_refused_with_what_was_expected(tmp_path: Path) -> None:
    path = write(tmp_path, "weather.csv", "date,temp\n2024-01-01,3\n")
    with pytest.raises(ReplayError, match="neither UCI"):
        detect(path)
