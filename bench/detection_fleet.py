"""How the stateful stage's cost per micro-batch grows with the fleet, at a fixed load.

A city's fleet is far larger than what one micro-batch hears from: a million meters at
15 minutes send about 5,500 digests in a 5 s trigger. Per fleet size (10,000, 30,000 and
100,000 meters by default), the real detector (``detect_faults``: RocksDB state store,
event time, the streaming job's session settings) first learns every meter from a week
of hourly readings (one digest per meter), then runs ``--batches`` micro-batches of
``--digests`` one-reading digests of meters drawn at random, read from Parquet, one file
a batch. The fleet reads once an interval, so a batch spans the share of an interval its
digests are of the fleet: a whole hour for 10,000 meters, six minutes for 100,000.
``batch_s`` is the mean of those batches' ``addBatch`` time (Spark's progress report):
now and then a batch also writes a bucket's snapshot, and the mean counts it.

The baseline is the smallest fleet, where a batch hears from every meter: a detector whose
cost followed the digests would take as long at every size, so ``ratio_to_smallest`` is
what the fleet itself costs. Target: at most 1.5 at 100,000 meters.

    python -m bench.detection_fleet [--fleets 10000,30000,100000] [--digests 10000]
                                    [--batches 10]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import timed, write_results
from meterflow.core.logs import setup_logging
from meterflow.core.messages import ReadingDigest, encode
from meterflow.core.thresholds import DetectionRules

TARGET_RATIO = 1.5
INTERVAL_S = 3600
WEEK = 7 * 24  # readings per meter in its first digest: every hour ring full
START_US = 1_764_547_200_000_000  # 2025-12-01T00:00:00Z
DIGESTS_PER_FILE = 20_000  # the warm-up's batches


def write_digests(path: Path, digests: list[ReadingDigest]) -> None:
    """Digest rows as the detector reads them (``DIGEST_DDL``): meter, latest time, JSON."""
    pq.write_table(
        pa.table(
            {
                "device_id": [d.device_id for d in digests],
                "event_time": pa.array(
                    [d.event_us[-1] for d in digests], pa.timestamp("us", "UTC")
                ),
                "value": pa.array([encode(d) for d in digests], pa.binary()),
            }
        ),
        path,
    )


def fleet_input(folder: Path, meters: int, digests: int, batches: int, seed: int) -> int:
    """Write the warm-up files, then one file per measured batch; return the warm-up's count."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    times = [START_US + k * INTERVAL_S * 1_000_000 for k in range(WEEK)]
    warm = 0
    for first in range(0, meters, DIGESTS_PER_FILE):
        week = [
            ReadingDigest(
                device_id=f"em{m:07d}",
                meter_type="electricity",
                event_us=times,
                values=[round(rng.uniform(0.1, 2.0), 3) for _ in times],
                faulty=[False] * WEEK,
            )
            for m in range(first, min(meters, first + DIGESTS_PER_FILE))
        ]
        write_digests(folder / f"{warm:04d}.parquet", week)
        warm += 1
    for batch in range(batches):
        # The meters read once an interval: a batch is the share of an interval its
        # digests are of the fleet, so no meter falls silent for want of being drawn.
        heard_share = min(digests, meters) / meters
        at = START_US + int((WEEK - 1 + (batch + 1) * heard_share) * INTERVAL_S * 1_000_000)
        heard = [
            ReadingDigest(
                device_id=f"em{m:07d}",
                meter_type="electricity",
                event_us=[at],
                values=[round(rng.uniform(0.1, 2.0), 3)],
                faulty=[False],
            )
            for m in rng.sample(range(meters), min(digests, meters))
        ]
        write_digests(folder / f"{warm + batch:04d}.parquet", heard)
    return warm


def measure_fleet(spark: Any, workdir: Path, meters: int, digests: int, batches: int) -> dict:
    from meterflow.stream.detection.processor import DIGEST_DDL, EVENT_TIME, detect_faults

    folder = workdir / f"fleet-{meters}"
    with timed() as written:
        warm = fleet_input(folder / "in", meters, digests, batches, seed=meters)
    print(f"{meters:,} meters: input written in {written['seconds']:.1f} s", flush=True)
    changes = detect_faults(
        spark.readStream.schema(DIGEST_DDL)
        .option("maxFilesPerTrigger", 1)
        .parquet(str(folder / "in")),
        DetectionRules(),
        {},
        INTERVAL_S,
        EVENT_TIME,
    )
    query = (
        changes.writeStream.format("noop")
        .option("checkpointLocation", str(folder / "checkpoint"))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    measured = [
        p["durationMs"]["addBatch"] / 1000
        for p in query.recentProgress
        if warm <= p["batchId"] < warm + batches and p["numInputRows"] > 0
    ]
    if len(measured) != batches:
        raise SystemExit(f"expected {batches} measured batches, Spark reported {len(measured)}")
    shutil.rmtree(folder, ignore_errors=True)
    batch_s = statistics.mean(measured)
    print(f"{meters:,} meters: batches of {digests:,} digests took {measured} s", flush=True)
    return {
        "meters": meters,
        "batch_s": round(batch_s, 2),
        "batches_s": [round(s, 2) for s in measured],
        "max_batch_s": round(max(measured), 2),
        "per_digest_ms": round(batch_s / min(digests, meters) * 1000, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleets", default="10000,30000,100000")
    parser.add_argument("--digests", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    setup_logging("WARNING")
    from meterflow.spark.session import get_spark
    from meterflow.stream.supervisor import stream_spark_conf

    fleets = sorted(int(n) for n in args.fleets.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="meterflow-bench-detection-fleet-"))
    try:
        spark = get_spark(
            "bench-detection-fleet",
            "local[*]",
            **{"spark.ui.enabled": "false", **stream_spark_conf(str(workdir))},
        )
        sizes = [measure_fleet(spark, workdir, n, args.digests, args.batches) for n in fleets]
        spark.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    smallest = sizes[0]["batch_s"]
    for size in sizes:
        size["ratio_to_smallest"] = round(size["batch_s"] / smallest, 2)
    largest = sizes[-1]
    write_results(
        "detection_fleet",
        {
            "digests_per_batch": args.digests,
            "interval_s": INTERVAL_S,
            "sizes": sizes,
            "target_ratio": TARGET_RATIO,
            "target_met": largest["ratio_to_smallest"] <= TARGET_RATIO,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
