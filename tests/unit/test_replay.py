"""Replay of real recordings (UCI, AMPds2), on small files written here in those formats."""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import MemorySink

from meterflow.core.classifier import Reading, evaluate
from meterflow.core.config import Settings
from meterflow.core.contract import FaultCode, MeterType
from simulator.cli import add_replay_arguments, run_replay
from simulator.replay import ReplayError, ReplaySummary, detect, replay

UCI = """\
Date;Time;Global_active_power;Global_reactive_power;Voltage;Global_intensity;Sub_metering_1;Sub_metering_2;Sub_metering_3
16/12/2006;17:24:00;4.216;0.418;234.840;18.400;0.000;1.000;17.000
16/12/2006;17:25:00;5.360;0.436;233.630;23.000;0.000;1.000;16.000
16/12/2006;17:26:00;?;?;?;?;?;?;
16/12/2006;17:27:00;3.000;0.1
32/12/2006;17:28:00;3.000;0.1;233.0;10.0;0.0;1.0;16.0
16/12/2006;17:29:00;1.200;0.1;233.0;10.0;0.0;1.0;16.0
16/12/2006;17:30:00;lots;0.1;233.0;10.0;0.0;1.0;16.0
16/12/2006;17:31:00;;0.1;233.0;10.0;0.0;1.0;16.0
"""

AMPDS_ELECTRICITY = """\
unix_ts,V,I,f,DPF,APF,P,Pt,Q,Qt,S,St
1333263600,120.2,5.1,60.0,0.98,0.95,600,100,20,5,620,110
1333263660,120.1,5.0,60.0,0.98,0.95,1200,110,20,5,1220,120
1333263720,120.0,5.0,60.0,0.98,0.95,,120,20,5,1220,130
"""

AMPDS_ENERGY_ONLY = """\
TS,Pt
1333263600,1000.5
1333263660,1000.75
1333263720,NaN
1333263780,1001.25
"""

AMPDS_COUNTER = """\
unix_ts,counter,avg_rate,inst_rate
1333263600,1000.0,2.0,2.0
1333263660,1003.5,3.5,3.0
1333263720,?,0,0
1333263780,1010.0,3.25,4.0
1333263840,oops
1333263900,1010.0,0,0
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def collect(path: Path, **options) -> tuple[list[dict], ReplaySummary, list[bytes]]:
    sink = MemorySink()
    summary = replay(path, sink.emit, **options)
    assert all(key == json.loads(value)["device_id"].encode() for key, value in sink.messages)
    return [json.loads(v) for _, v in sink.messages], summary, [v for _, v in sink.messages]


def test_uci_rows_become_minute_readings_and_bad_rows_are_named(tmp_path: Path) -> None:
    messages, summary, _ = collect(write(tmp_path, "household_power_consumption.txt", UCI))
    assert (summary.rows, summary.sent, summary.missing_values, summary.bad_rows) == (8, 5, 2, 3)
    assert [line for line, _ in summary.bad_lines] == [5, 6, 8]
    assert "columns" in summary.bad_lines[0][1] and "date" in summary.bad_lines[1][1]
    first = messages[0]
    assert first["device_id"] == "em-household-power-consumption"
    assert (first["timestamp"], first["meter_type"]) == ("2006-12-16T17:24:00Z", "electricity")
    assert first["usage_kwh"] == pytest.approx(4.216 / 60, abs=1e-6)  # a minute at 4.216 kW
    assert messages[1]["usage_kwh"] == pytest.approx(5.36 / 60, abs=1e-6)
    assert [m["timestamp"][11:16] for m in messages] == [
        "17:24",
        "17:25",
        "17:26",
        "17:29",
        "17:31",
    ]


def test_missing_values_reach_the_pipeline_as_missing_metric(tmp_path: Path) -> None:
    _, _, values = collect(write(tmp_path, "uci.txt", UCI))
    now = int(time.time() * 1_000_000)
    outcomes = [evaluate(value, now) for value in values]
    assert all(isinstance(o, Reading) for o in outcomes)
    assert [o.fault_code for o in outcomes] == [
        None,
        None,
        FaultCode.MISSING_METRIC,
        None,
        FaultCode.MISSING_METRIC,
    ]


def test_ampds_power_becomes_energy_per_minute(tmp_path: Path) -> None:
    messages, summary, _ = collect(write(tmp_path, "Electricity_WHE.csv", AMPDS_ELECTRICITY))
    assert (summary.sent, summary.missing_values, summary.bad_rows) == (3, 1, 0)
    assert messages[0]["usage_kwh"] == pytest.approx(0.6 / 60)  # 600 W for one minute
    assert messages[1]["usage_kwh"] == pytest.approx(1.2 / 60)
    assert "usage_kwh" not in messages[2]
    assert messages[0]["timestamp"] == "2012-04-01T07:00:00Z"
    assert messages[0]["device_id"] == "em-electricity-whe"


def test_ampds_energy_counter_without_power(tmp_path: Path) -> None:
    messages, summary, _ = collect(write(tmp_path, "WHE_energy.csv", AMPDS_ENERGY_ONLY))
    assert summary.baseline_rows == 1 and summary.missing_values == 1
    assert [m.get("usage_kwh") for m in messages] == [0.25, None, 0.5]


def test_ampds_water_counter_gives_usage_and_matching_flow(tmp_path: Path) -> None:
    messages, summary, _ = collect(write(tmp_path, "Water_WHW.csv", AMPDS_COUNTER))
    assert summary.baseline_rows == 1 and summary.missing_values == 1
    assert summary.bad_rows == 1 and summary.bad_lines[0][0] == 6
    assert summary.rows == summary.sent + summary.baseline_rows + summary.bad_rows
    assert [m.get("usage") for m in messages] == [3.5, None, 6.5, 0.0]
    # The usage after the gap spans two minutes: the flow is per minute.
    assert [m.get("flow_rate") for m in messages] == [3.5, None, 3.25, 0.0]
    assert {m["meter_type"] for m in messages} == {"water"}


def test_ampds_gas_counter_is_converted_to_cubic_metres(tmp_path: Path) -> None:
    messages, _, _ = collect(write(tmp_path, "NaturalGas_WHG.csv", AMPDS_COUNTER))
    assert {m["meter_type"] for m in messages} == {str(MeterType.GAS)}
    assert messages[0]["usage_m3"] == pytest.approx(0.0035)
    assert all("flow_rate" not in m for m in messages)


def test_counter_files_need_a_type_the_name_does_not_give(tmp_path: Path) -> None:
    path = write(tmp_path, "meter7.csv", AMPDS_COUNTER)
    with pytest.raises(ReplayError, match="water from gas"):
        detect(path)
    messages, _, _ = collect(path, meter_type=MeterType.GAS, device_id="gm-meter7")
    assert {m["device_id"] for m in messages} == {"gm-meter7"}


def test_unknown_format_or_a_wrong_type_is_refused_with_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="neither UCI"):
        detect(write(tmp_path, "weather.csv", "date,temp\n2024-01-01,3\n"))
    with pytest.raises(ReplayError, match="records electricity, not water"):
        detect(write(tmp_path, "uci.txt", UCI), MeterType.WATER)
    with pytest.raises(ReplayError, match="records water or gas, not electricity"):
        detect(write(tmp_path, "Water_WHW.csv", AMPDS_COUNTER), MeterType.ELECTRICITY)


def test_speedup_paces_and_rebase_moves_to_now(tmp_path: Path) -> None:
    path = write(tmp_path, "Electricity_WHE.csv", AMPDS_ELECTRICITY)
    started = time.monotonic()
    messages, _, _ = collect(path, speedup=240, rebase=True)  # 2 recorded minutes in 0.5 s
    assert 0.45 <= time.monotonic() - started < 3
    first = datetime.fromisoformat(messages[0]["timestamp"])
    assert abs((datetime.now(UTC) - first).total_seconds()) < 3
    steps = [datetime.fromisoformat(m["timestamp"]) for m in messages]
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(steps)] == [60, 60]


def test_stop_and_count_end_a_replay(tmp_path: Path) -> None:
    path = write(tmp_path, "uci.txt", UCI)
    _, summary, _ = collect(path, limit=2)
    assert summary.sent == 2
    stop = threading.Event()
    stop.set()
    _, summary, _ = collect(path, should_stop=stop)
    assert summary.sent == 0


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    return parser.parse_args(argv)


def test_run_replay_prints_the_summary_with_bad_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path)})
    sink = MemorySink()
    code = run_replay(parse(str(write(tmp_path, "uci.txt", UCI))), settings, sink)
    out = capsys.readouterr().out
    assert code == 0 and len(sink.messages) == 5 and sink.flushes == 1
    assert "8 rows, sent 5" in out and "missing values 2" in out
    assert "line 5:" in out and "line 6:" in out and "line 8:" in out


def test_run_replay_refuses_an_unknown_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path)})
    code = run_replay(parse(str(tmp_path / "absent.txt")), settings, MemorySink())
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "absent.txt" in err
