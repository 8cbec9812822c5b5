"""Stateful detection: recall by fault size, false alarms on healthy meters, and the cost.

The simulator writes a fleet's week (10,000 meters x 7 days at 15 minutes by default) into
one topic: STUCK, SPIKE, LEAK and silent episodes whose sizes are drawn from field-like
ranges, independently of the thresholds (``episode_sizes="field"``: leaks 0.5-50 L/h,
stuck spells 30 min-48 h, spikes 2-100x the typical level, silences 15 min-3 days), so some
fall below what a rule can see; the default stateless faults; and a fleet that behaves
like a real one (jittered clocks, repeats, late radios, declared constant loads, water at
night: :data:`CLOCK_JITTER_S` and below). The stream then catches up on it twice, each
time into a lake of its own:

* **off**: the lake query alone (``METERFLOW_DETECTION=off``);
* **on**: the lake query publishing digests, then the detector query over them, as
  ``meterflow stream --available-now`` runs them (event time).

Per rule: precision, recall and the delay of each detected episode's first opening (its
event time minus the injection start, p50 and p95) over every episode; the detection
``curve`` (recall and delay per size bucket, :data:`BUCKETS`), the smallest bucket from
which recall stays >= 0.95, and the recall over the episodes within the rule's documented
detectable range (:func:`detectable`). ``false_alarms_per_10k_meter_days``: openings that
match no injected episode of their code, wrong codes included, per 10,000 meter-days
without an episode. ``throughput_ratio`` is the readings per second with the stateful
stage over without it, in the same run. Targets: recall >= 0.95 above each rule's
detectable size, false alarms below 1 per 10,000 meter-days, NO_DATA delay <= M x interval
+ 2 trigger intervals, throughput_ratio >= 0.6.

    python -m bench.detection [--meters 10000] [--days 7] [--rate 0.1]
"""

from __future__ import annotations

import argparse
import itertools
import posixpath
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import local_broker, timed, write_results
from meterflow.clients import kafka
from meterflow.core import messages
from meterflow.core.config import Settings
from meterflow.core.contract import STATEFUL_FAULTS
from meterflow.core.logs import setup_logging
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import parse_timestamp_us
from simulator.episodes import Episode
from simulator.faults import EpisodeRates, FaultRates
from simulator.fleet import build_fleet, write_registry
from simulator.generator import SimulationConfig, simulate

TARGET_RECALL = 0.95
TARGET_FALSE_ALARMS = 1.0  # per 10,000 healthy meter-days, any code
TARGET_RATIO = 0.6
INTERVAL_S = 900
#: An opening counts for an episode if it comes between the episode's start and this long
#: after its end (a LEAK is judged by the night after, a NO_DATA at its deadline).
MATCH_SLACK_S = 6 * INTERVAL_S


def settings_for(
    workdir: Path, bootstrap: str, name: str, detection: str, readings: str = "readings-week"
) -> Settings:
    env = {
        "METERFLOW_TOPIC_READINGS": readings,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "METERFLOW_DATA_DIR": str(workdir / name),
        "METERFLOW_KAFKA_SOURCE": "python",
        "METERFLOW_KAFKA_PARTITIONS": "4",
        "METERFLOW_MAX_OFFSETS_PER_TRIGGER": "250000",
        "METERFLOW_TOPIC_ABNORMAL": f"abnormal-{name}",
        "METERFLOW_TOPIC_DEADLETTER": f"deadletter-{name}",
        "METERFLOW_TOPIC_STATUS": f"status-{name}",
        "METERFLOW_TOPIC_DIGEST": f"digest-{name}",
        "METERFLOW_DETECTION": detection,
        "METERFLOW_DETECTION_TIME": "event",
    }
    settings = Settings.from_env(env)
    kafka.ensure_topics(bootstrap, settings.topics, settings.partitions)
    return settings


#: The healthy fleet's ways, as real meters have them (simulator/delivery.py, load.py):
#: clocks jittered by up to a minute, 0.1% of readings sent twice, 5% of radios up to two
#: intervals late (in order), 2% of electricity meters constant loads declared in the
#: registry; water night use is the load model's own.
CLOCK_JITTER_S = 60.0
REPEAT_SHARE = 0.001
LATE_SHARE = 0.05
LATE_MAX_S = 2 * INTERVAL_S
CONSTANT_LOAD_SHARE = 0.02


def simulate_week(
    settings: Settings,
    meters: int,
    days: float,
    rate: float,
    seed: int,
    registry_path: str | None = None,
):
    """The fleet's days into the readings topic, with field-sized episodes at ``rate`` per
    meter-day and rule; its registry (constant loads declared) at ``registry_path``."""
    fleet = build_fleet(meters, seed, constant_load_share=CONSTANT_LOAD_SHARE)
    if registry_path is not None:
        write_registry(fleet, registry_path, INTERVAL_S)
    config = SimulationConfig(
        meters=meters,
        interval_s=INTERVAL_S,
        days=days,
        end=date(2024, 6, 10),
        seed=seed,
        faults=FaultRates.default(),
        episodes=EpisodeRates(dict.fromkeys(STATEFUL_FAULTS, rate)),
        episode_sizes="field",
        rules=settings.rules,
        repeat_share=REPEAT_SHARE,
        clock_jitter_s=CLOCK_JITTER_S,
        late_share=LATE_SHARE,
        late_max_s=LATE_MAX_S,
        constant_load_share=CONSTANT_LOAD_SHARE,
    )
    sink = kafka.ProducerSink(settings.bootstrap_servers, settings.topic_readings)
    summary = simulate(config, sink.emit, fleet=fleet)
    if sink.flush(120):
        raise SystemExit("bench: the broker did not acknowledge every reading")
    return summary


def catch_up(spark, settings: Settings) -> tuple[dict[str, int], float]:
    from meterflow.stream.supervisor import run

    with timed() as clock:
        totals = run(settings, available_now=True, spark=spark)
    return totals, clock["seconds"]


#: Size buckets of the detection curve, per rule, in the ground truth's ``size`` unit:
#: seconds for STUCK and NO_DATA, the factor over the normal level for SPIKE, L/h for LEAK.
BUCKETS: dict[str, tuple[float, ...]] = {
    "STUCK": (1800, 3600, 7200, 14400, 43200, 172800),
    "SPIKE": (2, 5, 10, 20, 50, 100),
    "LEAK": (0.5, 1, 2, 4, 6, 10, 20, 50),
    "NO_DATA": (900, 1800, 3600, 7200, 43200, 259200),
}
UNITS = {"STUCK": "s", "SPIKE": "x", "LEAK": "L/h", "NO_DATA": "s"}


def _key(device_id: str, start_us: int, end_us: int) -> tuple[str, int, int]:
    return (device_id, start_us, end_us)


def match(episodes, openings: list[messages.AbnormalEvent]):
    """Each opening against the ground truth: the first opening of each episode (by code),
    and the openings that match no episode of their code (false alarms, wrong codes
    included). An opening matches if it comes between the episode's start and
    :data:`MATCH_SLACK_S` after its end."""
    spans: dict[tuple[str, str], list] = defaultdict(list)
    for episode in episodes:
        if episode.start is None or episode.end is None or not episode.complete:
            continue
        span = _key(
            episode.device_id, parse_timestamp_us(episode.start), parse_timestamp_us(episode.end)
        )
        spans[(episode.device_id, str(episode.code))].append((span, episode))
    slack_us = MATCH_SLACK_S * 1_000_000
    first: dict[tuple[str, int, int], int] = {}
    unmatched: list[messages.AbnormalEvent] = []
    for opening in openings:
        at_us = parse_timestamp_us(opening.timestamp)
        hit = next(
            (
                span
                for span, _ in spans.get((opening.device_id, opening.fault_code), ())
                if span[1] <= at_us <= span[2] + slack_us
            ),
            None,
        )
        if hit is None:
            unmatched.append(opening)
        else:
            first[hit] = min(first.get(hit, at_us), at_us)
    return spans, first, unmatched


def _delays(found: list[int]) -> dict[str, float]:
    return {
        "delay_p50_s": float(np.percentile(found, 50)) if found else 0.0,
        "delay_p95_s": float(np.percentile(found, 95)) if found else 0.0,
    }


def spike_baselines(lake_path: str, spikes: list[Episode]) -> dict[tuple[str, str], float]:
    """Each SPIKE episode's baseline as the rule defines it, from the lake: the highest good
    non-zero reading at its hour of day on each of the last 7 days with one (the spike's
    own day included, before it), else the median of the 48 latest; keyed by (meter,
    start). Other spikes stay out, as the rule keeps them out."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from meterflow.core import lake

    devices = sorted({e.device_id for e in spikes})
    table = ds.dataset(lake.readings_path(lake_path), format="parquet", partitioning="hive")
    found = table.to_table(
        columns=["device_id", "event_time", "consumption", "fault_code"],
        filter=pc.field("device_id").isin(devices),
    )
    rows = found.drop_columns(["event_time"]).to_pandas()
    rows["us"] = found["event_time"].cast("int64").to_numpy()  # the lake's microseconds
    rows = rows[rows["fault_code"].isna() & (rows["consumption"] > 0)]
    spiked = {(e.device_id, parse_timestamp_us(e.start)) for e in spikes if e.start}
    keep = [(d, u) not in spiked for d, u in zip(rows["device_id"], rows["us"], strict=True)]
    rows = rows[keep]
    day_us, hour_us = 86_400_000_000, 3_600_000_000
    baselines: dict[tuple[str, str], float] = {}
    by_device: dict[str, list[Episode]] = defaultdict(list)
    for episode in spikes:
        by_device[episode.device_id].append(episode)
    for device, readings in rows.groupby("device_id"):
        ordered = readings.sort_values("us")
        for episode in by_device[str(device)]:
            if episode.start is None:
                continue
            at = parse_timestamp_us(episode.start)
            before = ordered[ordered["us"] < at]
            same_hour = before[(before["us"] % day_us) // hour_us == (at % day_us) // hour_us]
            daily = same_hour.groupby(same_hour["us"] // day_us)["consumption"].max()
            if len(daily):
                baselines[(device, episode.start)] = float(daily.iloc[-7:].max())
            elif len(before) >= 12:
                baselines[(device, episode.start)] = float(
                    before["consumption"].iloc[-48:].median()
                )
    return baselines


def detectable(
    rules: DetectionRules, spike_baseline: dict[tuple[str, str], float]
) -> Callable[[str, Episode], bool]:
    """Whether an episode is within its rule's documented detectable range (README, "What
    the detector can see"): STUCK at least N readings long at a value above the type's
    floor; SPIKE above the factor times its baseline (:func:`spike_baselines`) and above
    the floor; LEAK any flow lasting longer than the dry window; NO_DATA at least M
    intervals long."""

    def visible(code: str, episode: Episode) -> bool:
        size, value, kind = episode.size or 0.0, episode.value or 0.0, episode.meter_type
        if code == "STUCK":
            long_enough = size >= rules.stuck_readings * INTERVAL_S
            return long_enough and value > rules.stuck_min[kind]
        if code == "SPIKE":
            baseline = spike_baseline.get((episode.device_id, episode.start or ""))
            above = baseline is not None and value > rules.spike_factor * baseline
            return above and value >= rules.spike_min[kind]
        if code == "LEAK":
            if episode.start is None or episode.end is None:
                return False
            lasted_s = (parse_timestamp_us(episode.end) - parse_timestamp_us(episode.start)) / 1e6
            return lasted_s > rules.leak_dry_window_s
        return size >= rules.nodata_intervals * INTERVAL_S

    return visible


def score(
    episodes, openings: list[messages.AbnormalEvent], detectable: Callable[[str, Episode], bool]
) -> dict[str, dict[str, Any]]:
    """Per rule: precision, recall and delays over every injected episode; the curve
    (recall and delay per size bucket); the smallest bucket from which every bucket has
    recall >= 0.95; and the recall over the episodes ``detectable(code, episode)`` says the
    rule can see (its documented range)."""
    spans, first, unmatched = match(episodes, openings)
    result: dict[str, dict[str, Any]] = {}
    for code in STATEFUL_FAULTS:
        name = str(code)
        mine = [(span, e) for (_, c), found in spans.items() if c == name for span, e in found]
        openings_of = [o for o in openings if o.fault_code == name]
        wrong = sum(1 for o in unmatched if o.fault_code == name)
        delays = [(first[span] - span[1]) / 1e6 for span, _ in mine if span in first]
        edges = BUCKETS[name]
        curve: list[dict[str, Any]] = []
        for low, high in itertools.pairwise(edges):
            last = high == edges[-1]
            inside = [
                (span, e)
                for span, e in mine
                if e.size is not None
                and low <= e.size
                and (e.size <= high if last else e.size < high)
            ]
            hits = [(first[span] - span[1]) / 1e6 for span, _ in inside if span in first]
            curve.append(
                {
                    "low": low,
                    "high": high,
                    "episodes": len(inside),
                    "detected": len(hits),
                    "recall": round(len(hits) / len(inside), 4) if inside else None,
                    **_delays(hits),
                }
            )
        seen = [b for b in curve if b["recall"] is not None]
        from_bucket = next(
            (
                b["low"]
                for i, b in enumerate(seen)
                if all(c["recall"] >= TARGET_RECALL for c in seen[i:])
            ),
            None,
        )
        visible = [span for span, e in mine if detectable(name, e)]
        result[name] = {
            "episodes": len(mine),
            "openings": len(openings_of),
            "precision": round((len(openings_of) - wrong) / len(openings_of), 4)
            if openings_of
            else 1.0,
            "recall": round(len(delays) / len(mine), 4) if mine else 1.0,
            **_delays(delays),
            "unit": UNITS[name],
            "curve": curve,
            "recall_95_from": from_bucket,
            "detectable_episodes": len(visible),
            "recall_detectable": round(sum(s in first for s in visible) / len(visible), 4)
            if visible
            else None,
        }
    return result


def false_alarms(
    episodes, openings: list[messages.AbnormalEvent], meters: int, days: float
) -> dict[str, Any]:
    """Openings that match no injected episode of their code, per 10,000 meter-days of
    meters without an episode at the time (an episode's span and a day after it are not
    healthy)."""
    _, _, unmatched = match(episodes, openings)
    busy_days = sum(
        (parse_timestamp_us(e.end) - parse_timestamp_us(e.start)) / 86_400e6 + 1.0
        for e in episodes
        if e.start is not None and e.end is not None
    )
    healthy = meters * days - busy_days
    by_code: defaultdict[str, int] = defaultdict(int)
    for opening in unmatched:
        by_code[opening.fault_code] += 1
    return {
        "healthy_meter_days": round(healthy, 1),
        "false_alarms": len(unmatched),
        "false_alarms_by_code": dict(sorted(by_code.items())),
        "false_alarms_per_10k_meter_days": round(len(unmatched) / healthy * 10_000, 3),
        "false_alarm_examples": [
            f"{o.device_id} {o.fault_code} {o.timestamp}: {o.reason}" for o in unmatched[:5]
        ],
    }


def state_size(spark, checkpoint_root: str, meters: int) -> dict[str, float]:
    """The detector's state as Spark's state reader sees it (each bucket's snapshot with
    its deltas applied): bytes per meter."""
    from meterflow.core import lake
    from meterflow.stream.detection.processor import read_state

    fs, root = lake.filesystem_for(checkpoint_root)
    import pyarrow.fs as pafs

    found = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
        if i.type == pafs.FileType.Directory
    ]
    sizes = [len(bytes(row.state)) for row in read_state(spark, found[0]).collect()]
    return {
        "buckets": len(sizes),
        "state_bytes": sum(sizes),
        "state_bytes_per_meter": round(sum(sizes) / meters, 1),
        "largest_bucket_bytes": max(sizes, default=0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=10_000)
    parser.add_argument("--days", type=float, default=7)
    parser.add_argument("--rate", type=float, default=0.1, help="episodes per meter-day, per rule")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    setup_logging("WARNING")
    from meterflow.spark.session import get_spark
    from meterflow.stream.supervisor import stream_spark_conf

    workdir = Path(tempfile.mkdtemp(prefix="meterflow-bench-detection-"))
    try:
        with local_broker(workdir) as bootstrap:
            off = settings_for(workdir, bootstrap, "off", "off")
            on = settings_for(workdir, bootstrap, "on", "on")
            warm = settings_for(workdir, bootstrap, "warm", "on", "readings-warm")
            spark = get_spark(
                "bench-detection",
                "local[*]",
                # Catch-ups, as `meterflow stream --available-now` runs them.
                **{
                    "spark.ui.enabled": "false",
                    **stream_spark_conf(on.checkpoint_path, available_now=True),
                },
            )
            print(f"simulating {args.meters:,} meters x {args.days:g} days ...", flush=True)
            with timed() as produced:
                summary = simulate_week(
                    off, args.meters, args.days, args.rate, args.seed, on.registry_path
                )
            readings = summary.sent
            print(
                f"  {readings:,} readings, {len(summary.episodes):,} episodes in "
                f"{produced['seconds']:.0f} s",
                flush=True,
            )
            # Both stages once on a copy of a day, so neither measured run pays the start-up.
            simulate_week(warm, 500, 1, args.rate, args.seed + 1, warm.registry_path)
            catch_up(spark, warm)
            print("stream without the stateful stage ...", flush=True)
            totals_off, seconds_off = catch_up(spark, off)
            print(f"  {totals_off['read']:,} in {seconds_off:.1f} s", flush=True)
            print("stream with the stateful stage ...", flush=True)
            totals_on, seconds_on = catch_up(spark, on)
            print(f"  {totals_on['read']:,} in {seconds_on:.1f} s", flush=True)
            events = [
                messages.decode(m.value(), messages.AbnormalEvent)
                for m in kafka.read_to_end(bootstrap, on.topic_abnormal, timeout=120)
            ]
            openings = [e for e in events if e.episode and e.episode.action == "open"]
            spikes = [e for e in summary.episodes if e.code == "SPIKE" and e.complete]
            baselines = spike_baselines(on.lake_path, spikes)
            rules = score(summary.episodes, openings, detectable(on.detection, baselines))
            alarms = false_alarms(summary.episodes, openings, args.meters, args.days)
            size = state_size(
                spark, posixpath.join(on.checkpoint_path, "detector", "event"), args.meters
            )
            spark.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    per_s_off = totals_off["read"] / seconds_off
    per_s_on = totals_on["read"] / seconds_on
    ratio = per_s_on / per_s_off
    nodata_bound_s = on.detection.nodata_intervals * INTERVAL_S + 2 * on.trigger_seconds
    results = {
        "meters": args.meters,
        "days": args.days,
        "readings": readings,
        "episodes": len(summary.episodes),
        **rules,
        **alarms,
        "target_false_alarms_per_10k_meter_days": TARGET_FALSE_ALARMS,
        "readings_per_s_off": round(per_s_off),
        "readings_per_s_on": round(per_s_on),
        "seconds_off": round(seconds_off, 1),
        "seconds_on": round(seconds_on, 1),
        "throughput_ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_recall": TARGET_RECALL,
        "nodata_delay_bound_s": nodata_bound_s,
        **size,
        "lost": totals_on["lost"] + totals_off["lost"],
        "read_on": totals_on["read"],
        "read_off": totals_off["read"],
    }
    write_results("detection", results)
    failed = [
        f"{code} recall above its detectable size {r['recall_detectable']}"
        for code, r in rules.items()
        if r["recall_detectable"] is not None and r["recall_detectable"] < TARGET_RECALL
    ]
    if alarms["false_alarms_per_10k_meter_days"] >= TARGET_FALSE_ALARMS:
        failed.append(f"false alarms {alarms['false_alarms_per_10k_meter_days']} per 10k")
    if rules["NO_DATA"]["delay_p95_s"] > nodata_bound_s:
        failed.append(f"NO_DATA delay p95 {rules['NO_DATA']['delay_p95_s']:.0f} s")
    if ratio < TARGET_RATIO:
        failed.append(f"throughput_ratio {ratio:.3f}")
    if totals_on["read"] != readings or totals_off["read"] != readings:
        failed.append("readings lost")
    if failed:
        print(f"bench: below target: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
