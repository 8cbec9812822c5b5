"""Stateful detection: quality per rule against injected ground truth, and what it costs.

The simulator writes a fleet's week (10,000 meters x 7 days at 15 minutes by default) with
STUCK, SPIKE, LEAK and silent episodes at known times, plus the default stateless faults,
into one topic. The stream then catches up on it twice, each time into a lake of its own:

* **off**: the lake query alone (``METERFLOW_DETECTION=off``);
* **on**: the lake query publishing digests, then the detector query over them, as
  ``meterflow stream --available-now`` runs them (event time).

Per rule, precision and recall of the episode openings on ``iot-abnormal`` against the
ground truth, and the delay of each detected episode's first opening (its event time minus
the injection start), p50 and p95. ``throughput_ratio`` is the readings per second with
the stateful stage over without it, in the same run. Targets (issue #12): recall >= 0.95
and precision >= 0.99 per rule, NO_DATA delay <= M x interval + 2 trigger intervals,
throughput_ratio >= 0.6.

    python -m bench.detection [--meters 10000] [--days 7] [--rate 0.1]
"""

from __future__ import annotations

import argparse
import posixpath
import shutil
import tempfile
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np

from bench.common import local_broker, timed, write_results
from meterflow.clients import kafka
from meterflow.core import messages
from meterflow.core.config import Settings
from meterflow.core.contract import STATEFUL_FAULTS
from meterflow.core.logs import setup_logging
from meterflow.core.timestamps import parse_timestamp_us
from simulator.faults import EpisodeRates, FaultRates
from simulator.generator import SimulationConfig, simulate

TARGET_RECALL = 0.95
TARGET_PRECISION = 0.99
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


def simulate_week(settings: Settings, meters: int, days: float, rate: float, seed: int):
    config = SimulationConfig(
        meters=meters,
        interval_s=INTERVAL_S,
        days=days,
        end=date(2024, 6, 10),
        seed=seed,
        faults=FaultRates.default(),
        episodes=EpisodeRates(dict.fromkeys(STATEFUL_FAULTS, rate)),
        rules=settings.rules,
    )
    sink = kafka.ProducerSink(settings.bootstrap_servers, settings.topic_readings)
    summary = simulate(config, sink.emit)
    if sink.flush(120):
        raise SystemExit("bench: the broker did not acknowledge every reading")
    return summary


def catch_up(spark, settings: Settings) -> tuple[dict[str, int], float]:
    from meterflow.stream.supervisor import run

    with timed() as clock:
        totals = run(settings, available_now=True, spark=spark)
    return totals, clock["seconds"]


def score(episodes, openings: list[messages.AbnormalEvent]) -> dict[str, dict[str, float]]:
    """Per rule: precision, recall and delay percentiles of the first matching opening."""
    truth: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for episode in episodes:
        if episode.start is None or episode.end is None:
            continue
        span = (parse_timestamp_us(episode.start), parse_timestamp_us(episode.end))
        truth[(episode.device_id, str(episode.code))].append(span)
    slack_us = MATCH_SLACK_S * 1_000_000
    result: dict[str, dict[str, float]] = {}
    for code in STATEFUL_FAULTS:
        spans = {(d, s, e) for (d, c), found in truth.items() if c == code for s, e in found}
        mine = [o for o in openings if o.fault_code == code]
        first: dict[tuple[str, int, int], int] = {}
        matched = 0
        for opening in mine:
            at_us = parse_timestamp_us(opening.timestamp)
            hit = next(
                (
                    (d, s, e)
                    for d, s, e in spans
                    if d == opening.device_id and s <= at_us <= e + slack_us
                ),
                None,
            )
            if hit is not None:
                matched += 1
                first[hit] = min(first.get(hit, at_us), at_us)
        delays = [(at - span[1]) / 1e6 for span, at in first.items()]
        result[str(code)] = {
            "episodes": len(spans),
            "openings": len(mine),
            "precision": round(matched / len(mine), 4) if mine else 1.0,
            "recall": round(len(first) / len(spans), 4) if spans else 1.0,
            "delay_p50_s": float(np.percentile(delays, 50)) if delays else 0.0,
            "delay_p95_s": float(np.percentile(delays, 95)) if delays else 0.0,
        }
    return result


def state_size(spark, checkpoint_root: str, meters: int) -> dict[str, float]:
    """The detector's state as Spark's state reader sees it: bytes per meter."""
    from meterflow.core import lake

    fs, root = lake.filesystem_for(checkpoint_root)
    import pyarrow.fs as pafs

    found = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
        if i.type == pafs.FileType.Directory
    ]
    state = spark.read.format("statestore").option("stateVarName", "bucket").load(found[0])
    sizes = [len(bytes(row.value.state)) for row in state.collect()]
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

    workdir = Path(tempfile.mkdtemp(prefix="meterflow-bench-detection-"))
    try:
        with local_broker(workdir) as bootstrap:
            off = settings_for(workdir, bootstrap, "off", "off")
            on = settings_for(workdir, bootstrap, "on", "on")
            warm = settings_for(workdir, bootstrap, "warm", "on", "readings-warm")
            spark = get_spark("bench-detection", "local[*]", **{"spark.ui.enabled": "false"})
            print(f"simulating {args.meters:,} meters x {args.days:g} days ...", flush=True)
            with timed() as produced:
                summary = simulate_week(off, args.meters, args.days, args.rate, args.seed)
            readings = summary.sent
            print(
                f"  {readings:,} readings, {len(summary.episodes):,} episodes in "
                f"{produced['seconds']:.0f} s",
                flush=True,
            )
            # Both stages once on a copy of a day, so neither measured run pays the start-up.
            simulate_week(warm, 500, 1, args.rate, args.seed + 1)
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
            rules = score(summary.episodes, openings)
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
        "readings_per_s_off": round(per_s_off),
        "readings_per_s_on": round(per_s_on),
        "seconds_off": round(seconds_off, 1),
        "seconds_on": round(seconds_on, 1),
        "throughput_ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_recall": TARGET_RECALL,
        "target_precision": TARGET_PRECISION,
        "nodata_delay_bound_s": nodata_bound_s,
        **size,
        "lost": totals_on["lost"] + totals_off["lost"],
        "read_on": totals_on["read"],
        "read_off": totals_off["read"],
    }
    write_results("detection", results)
    failed = [
        f"{code} recall {r['recall']}" for code, r in rules.items() if r["recall"] < TARGET_RECALL
    ] + [
        f"{code} precision {r['precision']}"
        for code, r in rules.items()
        if r["precision"] < TARGET_PRECISION
    ]
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
