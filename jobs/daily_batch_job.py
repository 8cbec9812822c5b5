"""spark-submit entry point of the daily batch job (the code is :mod:`meterflow.batch.daily`).

``spark-submit jobs/daily_batch_job.py --date YYYY-MM-DD [--late-since D0] [--lake L]``
prints, one JSON line each, the reports of the late days it ran again and the day's;
Airflow's ``meter_daily_averages`` DAG submits it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import date, timedelta

from meterflow.batch.daily import APP_NAME, run, run_late
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError
from meterflow.core.logs import setup_logging
from meterflow.spark.session import get_spark


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Daily batch views of one day of the lake")
    parser.add_argument("--date", required=True, type=date.fromisoformat, help="YYYY-MM-DD")
    parser.add_argument("--lake", default=None, help="lake root (default: LAKE_PATH)")
    parser.add_argument(
        "--late-since",
        default=None,
        type=date.fromisoformat,
        help="first run again the days from this one to the day before --date that received "
        "readings after they were published",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"daily_batch_job: {exc}", file=sys.stderr)
        return exc.exit_code
    spark = get_spark(APP_NAME, settings.spark_master)
    lake_path = args.lake or settings.lake_path
    common = (settings.reading_interval_seconds, settings.timezone, settings.linear_gap_intervals)
    reran = []
    if args.late_since is not None:
        day_before = args.date - timedelta(days=1)
        for late in run_late(spark, lake_path, args.late_since, day_before, *common):
            print(late.to_json())
            reran.append(late.day)
    report = run(spark, lake_path, args.date, *common, reran=reran)
    print(report.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
