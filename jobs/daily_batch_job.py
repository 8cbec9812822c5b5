"""spark-submit entry point of the daily batch job (the code is :mod:`meterflow.batch.daily`).

``spark-submit jobs/daily_batch_job.py --date YYYY-MM-DD [--lake L]`` prints the day's
report as JSON; Airflow's ``meter_daily_averages`` DAG submits it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import date

from meterflow.batch.daily import APP_NAME, run
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError
from meterflow.core.logs import setup_logging
from meterflow.spark.session import get_spark


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Daily batch views of one day of the lake")
    parser.add_argument("--date", required=True, type=date.fromisoformat, help="YYYY-MM-DD")
    parser.add_argument("--lake", default=None, help="lake root (default: LAKE_PATH)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"daily_batch_job: {exc}", file=sys.stderr)
        return exc.exit_code
    spark = get_spark(APP_NAME, settings.spark_master)
    report = run(
        spark,
        args.lake or settings.lake_path,
        args.date,
        settings.reading_interval_seconds,
        settings.timezone,
        settings.linear_gap_intervals,
    )
    print(report.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
