"""Streaming throughput: N readings through the Spark speed layer vs a plain Python loop.

Both consume the same topic on the same broker, apply the same rules
(:mod:`meterflow.pipeline`), publish abnormal events and dead letters, and write the lake
as Parquet. The Spark figure is end to end: query start, every micro-batch, commit.
Target (issue #2): at least 100,000 readings/s on a 2-core machine.

    python -m bench.streaming_throughput [--readings 2000000] [--partitions 4]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench.baseline import run_baseline
from bench.common import local_broker, timed, write_results
from meterflow import kafka
from meterflow.config import Settings
from meterflow.logs import setup_logging
from simulator.generator import FaultRates, SimulationConfig, simulate

TARGET_PER_S = 100_000


def fill_topic(settings: Settings, readings: int, seed: int) -> dict:
    """Backfill a fleet into the readings topic with the simulator's default fault mix."""
    meters = 10_000
    interval_s = 900
    steps = -(-readings // meters)
    config = SimulationConfig(
        meters=meters,
        interval_s=interval_s,
        mode="backfill",
        days=steps * interval_s / 86_400,
        seed=seed,
        faults=FaultRates.default(),
        limit=readings,
        rules=settings.rules,
    )
    sink = kafka.ProducerSink(settings.bootstrap_servers, settings.topic_readings)
    summary = simulate(config, sink.emit)
    if sink.flush(120):
        raise SystemExit("bench: the broker did not acknowledge every reading")
    return summary.as_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1_000_000, help="readings per micro-batch")
    args = parser.parse_args()
    setup_logging("WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="meterflow-bench-"))
    try:
        with local_broker(workdir) as bootstrap:
            env = {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "METERFLOW_DATA_DIR": str(workdir),
                "METERFLOW_KAFKA_PARTITIONS": str(args.partitions),
                "METERFLOW_KAFKA_SOURCE": "python",
                "METERFLOW_MAX_OFFSETS_PER_TRIGGER": str(args.batch),
            }
            settings = Settings.from_env(env)
            kafka.ensure_topics(
                bootstrap,
                (settings.topic_readings, settings.topic_abnormal, settings.topic_deadletter),
                args.partitions,
            )
            with timed() as produce:
                summary = fill_topic(settings, args.readings, args.seed)
            print(f"produced {summary['sent']:,} readings in {produce['seconds']:.1f} s")

            baseline_settings = Settings.from_env(
                {
                    **env,
                    "METERFLOW_TOPIC_ABNORMAL": "bench-abnormal-baseline",
                    "METERFLOW_TOPIC_DEADLETTER": "bench-deadletter-baseline",
                }
            )
            with timed() as base:
                baseline = run_baseline(baseline_settings, str(workdir / "baseline-lake"))
            print(f"baseline: {baseline.read:,} readings in {base['seconds']:.1f} s")

            from jobs.streaming_job import CountsListener, run
            from meterflow.spark.session import get_spark

            with timed() as session:
                spark = get_spark("meterflow-bench", "local[*]", **{"spark.ui.enabled": "false"})
            listener = CountsListener()
            with timed() as job:
                totals = run(settings, available_now=True, spark=spark, listener=listener)
            print(f"spark: {totals['read']:,} readings in {job['seconds']:.1f} s")
            # Steady state: every micro-batch after the first, which pays JVM warm-up.
            later = listener.timings[1:]
            steady_rate = sum(r for r, _ in later) / max(sum(t for _, t in later), 1e-9)
            lake_rows = spark.read.parquet(f"{settings.lake_path}/readings").count()
            spark.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    expected = summary["sent"]
    checks = {
        "spark_read_all": totals["read"] == expected,
        "baseline_read_all": baseline.read == expected,
        "same_counts": (totals["valid"], totals["abnormal"], totals["deadletter"])
        == (baseline.valid, baseline.abnormal, baseline.deadletter),
        "lake_rows_match": lake_rows == totals["valid"] + totals["abnormal"],
    }
    spark_rate = totals["read"] / job["seconds"]
    base_rate = baseline.read / base["seconds"]
    results = {
        "readings": expected,
        "partitions": args.partitions,
        "spark": {
            "seconds": job["seconds"],
            "readings_per_s": spark_rate,
            "steady_state_readings_per_s": steady_rate,
            "micro_batches": listener.timings,
            "session_start_s": session["seconds"],
            **totals,
        },
        "baseline": {
            "seconds": base["seconds"],
            "readings_per_s": base_rate,
            "read": baseline.read,
            "valid": baseline.valid,
            "abnormal": baseline.abnormal,
            "deadletter": baseline.deadletter,
        },
        "produce": {"seconds": produce["seconds"], "readings_per_s": expected / produce["seconds"]},
        "ratio_spark_over_baseline": spark_rate / base_rate,
        "target_readings_per_s": TARGET_PER_S,
        "target_met": spark_rate >= TARGET_PER_S,
        "checks": checks,
    }
    write_results(
        "streaming_throughput",
        results,
        [
            ("readings", f"{expected:,} ({args.partitions} Kafka partitions)"),
            (
                "Spark streaming job, end to end",
                f"{job['seconds']:.1f} s = {spark_rate:,.0f} readings/s",
            ),
            (
                "baseline: confluent-kafka loop, same rules",
                f"{base['seconds']:.1f} s = {base_rate:,.0f} readings/s",
            ),
            (
                "Spark steady state (micro-batches after the first)",
                f"{steady_rate:,.0f} readings/s",
            ),
            ("ratio Spark / baseline (end to end)", f"{spark_rate / base_rate:.2f}"),
            (
                "target",
                f">= {TARGET_PER_S:,} readings/s end to end: "
                + ("met" if spark_rate >= TARGET_PER_S else "NOT met"),
            ),
            (
                "counts",
                f"valid {totals['valid']:,}, abnormal {totals['abnormal']:,}, "
                f"dead-lettered {totals['deadletter']:,}",
            ),
            ("checks", ", ".join(f"{k}={v}" for k, v in checks.items())),
        ],
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
