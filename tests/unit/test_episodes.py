"""Stateful fault episodes: each one in the stream as its ground truth says, and detectable.

Every check decodes the messages a run really produced and compares them with
``Summary.episodes``: stuck values repeat for the whole span, a spike stands above the
meter's previous day, a leak leaves no idle interval and a high night minimum, a silent
meter sends nothing between two normal readings, and episodes never overlap each other
or a stateless fault.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq
import pytest
from helpers import MemorySink

from meterflow.core.classifier import classify
from meterflow.core.config import Settings
from meterflow.core.contract import (
    METER_SPECS,
    STATELESS_FAULTS,
    STATUS_ORDER,
    FaultCode,
    MeterType,
    Status,
)
from meterflow.core.thresholds import DetectionRules, Rules
from meterflow.core.timestamps import parse_timestamp_us
from meterflow.stream.detection.rules import OPEN, Meter, MeterState, observe
from simulator import background, generator
from simulator.cli import add_simulate_arguments, config_from_args, run_simulate
from simulator.episodes import GROUND_TRUTH_SCHEMA, Episode
from simulator.faults import DEMO_EPISODE_RATES, EpisodeRates, FaultRates, plan_episodes
from simulator.fleet import build_fleet
from simulator.generator import SimulationConfig, Summary, backfill_starts, simulate

END = date(2024, 6, 3)
ALL_FAULTS = FaultRates(dict.fromkeys(STATELESS_FAULTS, 0.01), malformed=0.02)
#: Per meter-day; a meter has at most one episode a day after its first (quiet) day.
MANY = EpisodeRates(
    {FaultCode.STUCK: 0.6, FaultCode.SPIKE: 0.6, FaultCode.LEAK: 2.0, FaultCode.NO_DATA: 0.6}
)
RULES = DetectionRules()
BOUNDS = Rules().bounds
FAR_FUTURE_US = 4_000_000_000 * 1_000_000  # "now" for evaluate: no stamp is in the future
INTERVAL = 900


class Cell(NamedTuple):
    """One meter's message in one time step, classified by the contract."""

    status: Status
    value: float  # NaN unless a reading with its metric
    flow: float


@dataclass
class Stream:
    """A run's messages by meter and time step (progress ticks once per step), classified
    in one batch at the end."""

    stamps: list[str] = field(default_factory=list)
    raw: dict[tuple[str, int], bytes] = field(default_factory=dict)
    by_meter: dict[str, dict[int, Cell]] = field(default_factory=lambda: defaultdict(dict))
    statuses: Counter[Status] = field(default_factory=Counter)
    _step: int = 0

    def emit(self, key: bytes, value: bytes) -> None:
        assert (key.decode(), self._step) not in self.raw, "two messages of a meter in a step"
        self.raw[key.decode(), self._step] = value

    def progress(self, summary: Summary) -> None:
        self.stamps.append(summary.last_event or "")
        self._step += 1

    def classify(self) -> None:
        cells, values = list(self.raw), list(self.raw.values())
        result = classify(values, [FAR_FUTURE_US] * len(values))
        for i, (device, step) in enumerate(cells):
            status = STATUS_ORDER[int(result.status[i])]
            value, flow = float(result.consumption[i]), float(result.flow_rate[i])
            self.by_meter[device][step] = Cell(status, value, flow)
            self.statuses[status] += 1

    @property
    def sent(self) -> int:
        return len(self.raw)

    def step_of(self, stamp: str | None) -> int:
        assert stamp is not None
        return self.stamps.index(stamp)

    def value(self, device: str, step: int) -> float:
        cell = self.by_meter[device][step]
        assert cell.status is Status.VALID, (device, step)
        return cell.value


def record(config: SimulationConfig) -> tuple[Stream, Summary]:
    stream = Stream()
    summary = simulate(config, stream.emit, progress=stream.progress)
    stream.classify()
    return stream, summary


def hour_of(stamp: str) -> float:
    moment = datetime.fromisoformat(stamp)
    return moment.hour + moment.minute / 60


def check_episode(stream: Stream, episode: Episode) -> None:
    """The stream holds ``episode`` exactly as recorded, and its rule can see it."""
    device, code = episode.device_id, episode.code
    first, last = stream.step_of(episode.start), stream.step_of(episode.end)
    assert last - first + 1 == episode.readings == episode.planned
    series = stream.by_meter[device]
    # The readings around the span (and in it, unless silent) are valid readings.
    for step in (first - 1, last + 1):
        stream.value(device, step)
    if code is FaultCode.NO_DATA:
        assert not any(first <= step <= last for step in series)
        assert episode.readings >= 2 * RULES.nodata_intervals
        return
    values = [stream.value(device, step) for step in range(first, last + 1)]
    if code is FaultCode.STUCK:
        assert set(values) == {episode.value}
        assert episode.value > RULES.stuck_min[episode.meter_type]
        assert episode.readings >= 1.5 * RULES.stuck_readings
        assert stream.value(device, first - 1) != episode.value
        assert stream.value(device, last + 1) != episode.value
    elif code is FaultCode.SPIKE:
        assert values == [episode.value] and first >= 24 * 3600 // INTERVAL
        hour = stream.stamps[first][11:13]
        day_before = [
            stream.value(device, step)
            for step in range(first - 24 * 3600 // INTERVAL, first)
            if step in series and series[step].status is Status.VALID
        ]
        same_hour = [
            stream.value(device, step)
            for step in range(first - 24 * 3600 // INTERVAL, first)
            if stream.stamps[step][11:13] == hour and series[step].status is Status.VALID
        ]
        spike = values[0]
        assert spike >= RULES.spike_factor * statistics.median(same_hour)
        assert spike >= RULES.spike_factor * statistics.median(day_before)
        assert spike >= 2 * RULES.spike_min[episode.meter_type]
        metric = METER_SPECS[episode.meter_type].metric
        assert spike < BOUNDS[metric]
        if episode.meter_type is MeterType.WATER:
            assert series[first].flow < BOUNDS["flow_rate"]
    else:
        assert code is FaultCode.LEAK and episode.meter_type is MeterType.WATER
        assert min(values) > 0  # no idle interval in the whole span
        assert episode.readings * INTERVAL >= RULES.leak_dry_window_s + 6 * 3600
        night = [
            value / (INTERVAL / 3600)
            for step, value in zip(range(first, last + 1), values, strict=True)
            if RULES.in_leak_night(hour_of(stream.stamps[step]))
        ]
        assert len(night) >= 8  # a whole night window
        assert min(night) > 2 * RULES.leak_min_night_flow
        assert stream.value(device, last + 1) == 0  # repaired: the leak visibly ends


def check_run(stream: Stream, summary: Summary, meters: int) -> None:
    assert summary.consistent() and summary.sent == stream.sent
    assert stream.statuses == summary.expected_outcomes()
    assert summary.missing == sum(
        e.readings for e in summary.episodes if e.code is FaultCode.NO_DATA
    )
    for episode in summary.episodes:
        check_episode(stream, episode)
    # Episodes (with the reading either side) never overlap, nor touch a stateless fault.
    windows: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for episode in summary.episodes:
        first, last = stream.step_of(episode.start), stream.step_of(episode.end)
        windows[episode.device_id].append((first - 1, last + 1))
        for step in range(first - 1, last + 2):
            cell = stream.by_meter[episode.device_id].get(step)
            assert cell is None or cell.status is Status.VALID
    for spans in windows.values():
        spans.sort()
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    # Every other meter-step has exactly one message.
    silent = {
        (e.device_id, step)
        for e in summary.episodes
        if e.code is FaultCode.NO_DATA
        for step in range(stream.step_of(e.start), stream.step_of(e.end) + 1)
    }
    assert stream.sent + len(silent) == meters * len(stream.stamps)


def test_every_kind_is_in_the_stream_as_its_ground_truth_says() -> None:
    config = SimulationConfig(meters=40, days=4, end=END, seed=3, faults=ALL_FAULTS, episodes=MANY)
    stream, summary = record(config)
    counts = Counter(e.code for e in summary.episodes)
    assert all(counts[code] >= 3 for code in MANY.rates), counts
    assert summary.abnormal > 0 and summary.deadletter > 0  # stateless faults around them
    assert all(e.complete for e in summary.episodes)
    check_run(stream, summary, 40)
    # Water stuck and silent spans keep out of the night window (no false leak signal).
    for episode in summary.episodes:
        if episode.meter_type is MeterType.WATER and episode.code is not FaultCode.LEAK:
            first, last = stream.step_of(episode.start), stream.step_of(episode.end)
            assert not any(
                RULES.in_leak_night(hour_of(stream.stamps[s])) for s in range(first, last + 1)
            )
    # Nothing starts in a meter's first day (no baseline yet) or ends without a reading after.
    day = 24 * 3600 // INTERVAL
    assert min(stream.step_of(e.start) for e in summary.episodes) >= day
    assert max(stream.step_of(e.end) for e in summary.episodes) < len(stream.stamps) - 1


def test_episodes_touch_only_their_own_readings() -> None:
    """With the same seed, a run with episodes differs from one without only inside the
    episodes and the reading either side (where stateless faults are held back)."""
    base = SimulationConfig(meters=40, days=4, end=END, seed=3, faults=ALL_FAULTS)
    plain, _ = record(base)
    faulty, summary = record(replace(base, episodes=MANY))
    near = {
        (e.device_id, step)
        for e in summary.episodes
        for step in range(faulty.step_of(e.start) - 1, faulty.step_of(e.end) + 2)
    }
    changed = {
        cell
        for cell, value in plain.raw.items()
        if faulty.raw.get(cell) != value
        # a held-back malformed message shifts which kind the next ones are
        and not (
            plain.by_meter[cell[0]][cell[1]].status is Status.DEADLETTER
            and cell in faulty.raw
            and faulty.by_meter[cell[0]][cell[1]].status is Status.DEADLETTER
        )
    }
    assert changed and changed <= near


def test_zero_rates_draw_nothing_and_give_the_plain_stream() -> None:
    base = SimulationConfig(meters=30, days=2, end=END, seed=8, faults=ALL_FAULTS)
    plain, plain_summary = record(base)
    zero = EpisodeRates(dict.fromkeys(MANY.rates, 0.0))
    again, summary = record(replace(base, episodes=zero))
    assert again.raw == plain.raw
    assert summary.episodes == [] and summary.missing == 0
    assert summary.as_dict()["episodes"] == {}
    assert plain_summary.sent == summary.sent


def test_episodes_do_not_depend_on_how_steps_are_blocked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = SimulationConfig(meters=40, days=4, end=END, seed=3, faults=ALL_FAULTS, episodes=MANY)
    whole, summary = record(config)
    monkeypatch.setattr(generator, "BLOCK_CELLS", 40 * 7)  # 7 steps a block
    blocked, again = record(config)
    assert blocked.raw == whole.raw
    assert [e.as_dict() for e in again.episodes] == [e.as_dict() for e in summary.episodes]


class FakeClock:
    """The generator's ``time`` module on a clock that sleeping moves: live mode, instantly."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.strftime, self.gmtime = time.strftime, time.gmtime

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_live_mode_injects_and_records_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    start = datetime(2024, 6, 1, tzinfo=UTC).timestamp()
    monkeypatch.setattr(generator, "time", FakeClock(start))
    monkeypatch.setattr(generator, "POLL_S", float("inf"))  # one fake sleep per wait
    config = SimulationConfig(
        meters=40, mode="live", seed=5, faults=ALL_FAULTS, episodes=MANY, duration_s=4 * 86_400
    )
    stream, summary = record(config)
    assert stream.stamps[0] == "2024-06-01T00:00:00Z" and len(stream.stamps) == 4 * 96
    assert Counter(e.code for e in summary.episodes).keys() == set(MANY.rates)
    assert summary.consistent() and summary.sent == stream.sent
    assert stream.statuses == summary.expected_outcomes()
    # A live run ends when told to, not when its episodes do: the last ones may be cut short.
    ended = [e for e in summary.episodes if stream.step_of(e.end) + 1 < len(stream.stamps)]
    assert len(ended) >= len(summary.episodes) - 40
    for episode in ended:
        check_episode(stream, episode)


def test_a_run_cut_short_records_what_was_sent() -> None:
    config = SimulationConfig(meters=40, days=4, end=END, seed=3, faults=ALL_FAULTS, episodes=MANY)
    full, whole = record(config)
    cut = next(e for e in whole.episodes if e.code is FaultCode.NO_DATA)
    stop_step = full.step_of(cut.start) + 3  # three steps into a silent span
    limit = sum(1 for (_, step) in full.raw if step < stop_step)
    stream, summary = record(replace(config, limit=limit))
    assert summary.sent == stream.sent == limit and summary.consistent()
    partial = next(e for e in summary.episodes if e.device_id == cut.device_id)
    assert partial.start == cut.start and not partial.complete
    assert 0 < partial.readings <= 4
    assert all(e.readings <= e.planned for e in summary.episodes)


# --- configuration ------------------------------------------------------------------------


def test_episode_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="no episodes of SENTINEL"):
        EpisodeRates({FaultCode.SENTINEL: 0.1})
    with pytest.raises(ValueError, match="0 or above"):
        EpisodeRates({FaultCode.STUCK: -1})
    with pytest.raises(ValueError, match="contract format"):
        SimulationConfig(message_format="legacy", episodes=MANY)
    # Hourly water readings are too coarse for clean leak rules (a normal meter would trip them).
    leak = EpisodeRates({FaultCode.LEAK: 0.1})
    with pytest.raises(ValueError, match="LEAK"):
        plan_episodes(leak, RULES, Rules(), 3600)
    plan_episodes(leak, RULES, Rules(), 900)
    plan_episodes(EpisodeRates({FaultCode.STUCK: 0.1}), RULES, Rules(), 3600)  # others are fine
    tight = Rules(bounds={**Rules().bounds, "usage_kwh": 2.0})
    with pytest.raises(ValueError, match="SPIKE on electricity"):
        plan_episodes(EpisodeRates({FaultCode.SPIKE: 0.1}), RULES, tight, 900)
    shapes = plan_episodes(
        MANY, DetectionRules(stuck_readings=20, nodata_intervals=10), Rules(), 900
    )
    assert shapes.stuck_readings[0] >= 30 and shapes.silent_readings[0] >= 20


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return parser.parse_args(argv)


def test_episode_options(capsys: pytest.CaptureFixture[str]) -> None:
    rules = Rules()
    assert config_from_args(parse(), rules).episodes == EpisodeRates.none()
    assert config_from_args(parse("--episode-rates", "default"), rules).episodes == (
        EpisodeRates.default()
    )
    config = config_from_args(
        parse("--episode-rates", "stuck=0.1,LEAK=0.2", "--episode-rate", "no_data=0.3"), rules
    )
    assert config.episodes.rates == {
        FaultCode.STUCK: 0.1,
        FaultCode.LEAK: 0.2,
        FaultCode.NO_DATA: 0.3,
    }
    with pytest.raises(SystemExit):
        parse("--episode-rate", "SENTINEL=0.1")
    assert "KIND=RATE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--fault-rate", "STUCK=0.1")
    assert "--episode-rate" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["truth.parquet", "truth.jsonl", None])
def test_run_simulate_writes_the_ground_truth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str | None
) -> None:
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path)})
    sink = MemorySink()
    where = [] if name is None else ["--ground-truth", str(tmp_path / name)]
    args = parse(
        *("--mode", "backfill", "--end-date", "2024-06-03", "--days", "4", "--meters", "30"),
        *("--seed", "4", "--episode-rates", "STUCK=0.5,SPIKE=0.5,LEAK=3,NO_DATA=0.5", *where),
    )
    assert run_simulate(args, settings, sink) == 0
    captured = capsys.readouterr()
    assert "episodes " in captured.out and "readings withheld" in captured.out
    path = tmp_path / (name or "lake/registry/ground_truth.parquet")
    assert f"episodes in {path}" in captured.err
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        table = pq.read_table(path)
        assert table.schema == GROUND_TRUTH_SCHEMA
        rows = [
            {
                **row,
                "start": f"{row['start']:%Y-%m-%dT%H:%M:%SZ}",
                "end": f"{row['end']:%Y-%m-%dT%H:%M:%SZ}",
            }
            for row in table.to_pylist()
        ]
    assert {row["fault_code"] for row in rows} == {"STUCK", "SPIKE", "LEAK", "NO_DATA"}
    assert f"episodes   {len(rows)} " in captured.out
    sent: dict[str, set[int]] = defaultdict(set)
    result = classify([v for _, v in sink.messages], [FAR_FUTURE_US] * len(sink.messages))
    for i in range(len(sink.messages)):
        if result.device_id[i] is not None and result.status[i] != 2:  # a reading
            sent[str(result.device_id[i])].add(int(result.event_time_us[i]))
    for row in rows:
        start, end = parse_timestamp_us(row["start"]), parse_timestamp_us(row["end"])
        assert row["complete"] and row["readings"] == (end - start) // (INTERVAL * 10**6) + 1
        inside = {t for t in sent[row["device_id"]] if start <= t <= end}
        assert len(inside) == (0 if row["fault_code"] == "NO_DATA" else row["readings"])


def test_a_failing_emit_among_silent_meters_leaves_exact_counts() -> None:
    config = SimulationConfig(meters=40, days=4, end=END, seed=3, faults=ALL_FAULTS, episodes=MANY)
    full, whole = record(config)
    silent = next(e for e in whole.episodes if e.code is FaultCode.NO_DATA)
    step = full.step_of(silent.start) + 1
    # Fail on the first message of that step after the silent meter's position.
    order = build_fleet(40, seed=3).device_ids
    after = order[order.index(silent.device_id) + 1 :]
    cells = list(full.raw)  # in the order they were sent
    fail_at = next(i for i, (d, s) in enumerate(cells) if s == step and d in after)
    assert cells[fail_at - 1][1] == step  # mid-step, not at its start
    sent: list[bytes] = []

    def emit(_key: bytes, value: bytes) -> None:
        if len(sent) == fail_at:
            raise RuntimeError("broker gone")
        sent.append(value)

    summary = Summary()
    with pytest.raises(RuntimeError):
        simulate(config, emit, summary=summary)
    assert summary.sent == len(sent) == fail_at and summary.consistent()
    partial = next(e for e in summary.episodes if e.device_id == silent.device_id)
    assert partial.readings == 2 and not partial.complete  # both silent steps were reached


# --- meterflow run's fleet (simulator/background.py) ----------------------------------------

DEMO_INTERVAL = 10  # seconds: meterflow run's default


def run_background(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    start: datetime,
    live_s: float,
    **options: Any,
) -> tuple[list[tuple[bytes, bytes]], Summary]:
    """``meterflow run``'s simulator work on a fake clock from ``start``, for ``live_s`` of
    live readings; every message it sent and the live part's summary."""
    clock = FakeClock(start.timestamp())
    monkeypatch.setattr(generator, "time", clock)
    monkeypatch.setattr(background, "time", clock)
    monkeypatch.setattr(generator, "POLL_S", float("inf"))  # one fake sleep per wait
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path)})
    sink = MemorySink()
    work = background.background_simulation(
        settings,
        sink,
        lambda: clock.now >= start.timestamp() + live_s,
        interval_s=DEMO_INTERVAL,
        seed=7,
        **options,
    )
    return sink.messages, work()


def readings_by_meter(
    messages: list[tuple[bytes, bytes]],
) -> dict[str, list[tuple[int, float, bool, float | None]]]:
    """What the stream hands the detector per meter: ``(event_us, value, faulty, flow)`` in
    event-time order, dead letters and FUTURE_TIMESTAMP readings left out (as
    ``meterflow.stream.classify.reading_digests`` does)."""
    values = [value for _, value in messages]
    result = classify(values, [FAR_FUTURE_US] * len(values))
    future = STATELESS_FAULTS.index(FaultCode.FUTURE_TIMESTAMP) + 1
    meters: dict[str, list[tuple[int, float, bool, float | None]]] = defaultdict(list)
    for i, device in enumerate(result.device_id):
        if STATUS_ORDER[int(result.status[i])] is Status.DEADLETTER:
            continue
        if int(result.fault_index[i]) == future or device is None:
            continue
        faulty = int(result.fault_index[i]) != 0
        flow = float(result.flow_rate[i])
        meters[device].append(
            (
                int(result.event_time_us[i]),
                float(result.consumption[i]),
                faulty,
                None if math.isnan(flow) else flow,
            )
        )
    return {device: sorted(readings) for device, readings in meters.items()}


def test_the_backfill_runs_up_to_now_and_live_readings_continue_its_grid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``meterflow run --airflow``: yesterday and today up to now, then live, no gap."""
    start = datetime(2024, 6, 3, 0, 20, 5, tzinfo=UTC)  # live starts 20 min after midnight
    messages, live = run_background(
        monkeypatch, tmp_path, start, live_s=300, meters=12, backfill_days=1
    )
    yesterday_us = parse_timestamp_us("2024-06-02T00:00:00Z")
    step_us = DEMO_INTERVAL * 1_000_000
    # Live readings start within one interval after the live start, one interval after the
    # backfill's last: the backfill reaches the live start, not midnight.
    first_live_us = parse_timestamp_us(live.first_event)
    assert start.timestamp() * 1e6 < first_live_us <= start.timestamp() * 1e6 + step_us
    per_meter = readings_by_meter(messages)
    assert len(per_meter) == 12
    for device, readings in per_meter.items():
        stamps = [event_us for event_us, *_ in readings]
        assert stamps[0] == yesterday_us + step_us, device  # the first interval's end
        backfilled = [s for s in stamps if s < first_live_us]
        assert first_live_us - backfilled[-1] <= 2 * step_us  # a dead letter may take one
        # No silence the detector could call NO_DATA, anywhere (dead letters leave a
        # reading or two out; NO_DATA needs more than four intervals).
        gaps = {b - a for a, b in itertools.pairwise(stamps)}
        assert max(gaps) <= RULES.nodata_intervals * step_us, (device, sorted(gaps))
        assert stamps[-1] >= start.timestamp() * 1e6 + 290 * 1e6
    # On the grid from yesterday 00:00: every stamp of every meter together, no hole.
    every = sorted({s for readings in per_meter.values() for s, *_ in readings})
    assert every == list(range(yesterday_us + step_us, every[-1] + 1, step_us))


def test_the_demo_episodes_trip_the_rules_at_10_s_readings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``meterflow run --airflow``'s fleet through the pure rules: every STUCK, SPIKE and
    NO_DATA it injects opens with its ground truth's start, within minutes of the live
    start, and nothing else opens (no NO_DATA where the backfill meets the live run)."""
    start = datetime(2024, 6, 3, 0, 0, 5, tzinfo=UTC)
    messages, live = run_background(
        monkeypatch,
        tmp_path,
        start,
        live_s=2 * 3600,
        meters=30,
        backfill_days=1,
        episodes=DEMO_EPISODE_RATES,
    )
    kinds = (FaultCode.STUCK, FaultCode.SPIKE, FaultCode.NO_DATA)
    truth = {
        (e.device_id, e.code, parse_timestamp_us(e.start))
        for e in live.episodes
        if e.code in kinds and e.complete and e.start is not None
    }
    assert {code for _, code, _ in truth} == set(kinds), Counter(e.code for e in live.episodes)
    per_meter = readings_by_meter(messages)
    opened = set()
    for meter in build_fleet(30, 7).meters:
        rules = Meter(meter.device_id, meter.meter_type, DEMO_INTERVAL, RULES)
        readings = per_meter[meter.device_id]
        opened |= {
            (d.device_id, d.code, d.start_us)
            for d in observe(rules, MeterState(), readings)
            if d.action == OPEN and d.code in kinds
        }
    assert opened == truth
    first_us = min(start_us for _, _, start_us in truth)
    assert first_us - start.timestamp() * 1e6 < 15 * 60 * 1e6  # the first within minutes
    # Ground truth of the live run, beside the registry.
    written = pq.read_table(tmp_path / "lake" / "registry" / "ground_truth.parquet")
    assert written.num_rows == len([e for e in live.episodes if e.start is not None])


def test_leaks_trip_their_rule_at_10_s_readings() -> None:
    """The demo's LEAK at meterflow run's interval: each opens while it lasts, once, and
    no water meter leaks without one."""
    config = SimulationConfig(
        meters=6,
        interval_s=DEMO_INTERVAL,
        days=4,
        end=END,
        seed=2,
        mix={MeterType.WATER: 1.0},
        episodes=EpisodeRates({FaultCode.LEAK: 2.0}),
    )
    sink = MemorySink()
    summary = simulate(config, sink.emit)
    leaks = [e for e in summary.episodes if e.complete and e.start and e.end]
    assert len(leaks) >= 3
    spans = {(e.device_id, parse_timestamp_us(e.start), parse_timestamp_us(e.end)) for e in leaks}
    opened = []
    for device, readings in readings_by_meter(sink.messages).items():
        rules = Meter(device, MeterType.WATER, DEMO_INTERVAL, RULES)
        found = observe(rules, MeterState(), readings)
        opened += [(device, d.at_us) for d in found if d.action == OPEN]
        assert {d.code for d in found} <= {FaultCode.LEAK}
    inside = [
        next((span for span in spans if span[0] == device and span[1] <= at <= span[2]), None)
        for device, at in opened
    ]
    assert None not in inside  # every opening is during an injected leak ...
    assert sorted(inside) == sorted(spans)  # ... and every leak opens exactly once


def test_a_spike_goes_where_its_rule_can_fire() -> None:
    """At 10 s readings a water reading above ``spike_min`` (250 L) breaks the flow bound
    (500 L/min caps it at 83 L): water gets no SPIKE, the other types do."""
    spike = EpisodeRates({FaultCode.SPIKE: 1.0})
    assert plan_episodes(spike, RULES, Rules(), INTERVAL).spike_types == set(MeterType)
    shapes = plan_episodes(spike, RULES, Rules(), DEMO_INTERVAL)
    assert shapes.spike_types == {MeterType.ELECTRICITY, MeterType.GAS}
    config = SimulationConfig(
        meters=30, interval_s=DEMO_INTERVAL, days=2, end=END, seed=4, episodes=spike
    )
    summary = simulate(config, MemorySink().emit)
    types = {e.meter_type for e in summary.episodes}
    assert types == {MeterType.ELECTRICITY, MeterType.GAS}


def test_a_live_run_from_a_past_moment_catches_up_on_its_grid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = datetime(2024, 6, 3, 12, 0, 5, tzinfo=UTC).timestamp()
    clock = FakeClock(start)
    monkeypatch.setattr(generator, "time", clock)
    monkeypatch.setattr(generator, "POLL_S", float("inf"))
    since = start - 95  # where a backfill ended
    config = SimulationConfig(
        meters=5, interval_s=10, mode="live", since_s=since, seed=1, duration_s=60
    )
    sent_at: list[tuple[float, float]] = []  # (stamp, when it went out)
    simulate(
        config,
        MemorySink().emit,
        progress=lambda s: sent_at.append((parse_timestamp_us(s.last_event) / 1e6, clock.now)),
    )
    stamps = [stamp for stamp, _ in sent_at]
    assert stamps == [since + 10 * k for k in range(len(stamps))]  # no step skipped
    assert stamps[-1] >= start + 50
    for stamp, when in sent_at:
        assert when == (start if stamp <= start else stamp)  # the past at once, then on time


def test_a_backfill_can_end_at_a_moment() -> None:
    until = datetime(2024, 6, 3, 12, 0, 0, tzinfo=UTC).timestamp()
    config = SimulationConfig(meters=3, interval_s=10, days=0.01, until_s=until)
    starts = backfill_starts(config)
    assert starts[-1] == until - 10 and len(starts) == 86  # 864 s hold 86 whole intervals
    with pytest.raises(ValueError, match="in the future"):
        backfill_starts(replace(config, until_s=time.time() + 60))
    with pytest.raises(ValueError, match="until_s"):
        SimulationConfig(until_s=until, end=END)
    with pytest.raises(ValueError, match="since_s"):
        SimulationConfig(since_s=until)  # a backfill starts nowhere but days before its end
