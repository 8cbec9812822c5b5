"""spark-submit entry point of the speed layer (the code is :mod:`meterflow.stream.job`).

``spark-submit jobs/streaming_job.py [--available-now] [--accept-data-loss]``: reads
``iot-meter`` until stopped (or caught up), writes the lake through its ledger, publishes
abnormal events and dead letters. Exit codes: 2 configuration, 3 data loss to decide on,
4 Kafka unavailable after every retry; the reason is one line on stderr.
"""

from __future__ import annotations

import argparse

from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError
from meterflow.core.logs import setup_logging
from meterflow.stream.dataloss import ACCEPT
from meterflow.stream.job import run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--available-now", action="store_true", help="process what is in Kafka now, then exit"
    )
    parser.add_argument(
        ACCEPT, action="store_true", help="record offsets gone from Kafka as lost and continue"
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        parser.error(str(exc))
    if not settings.bootstrap_servers:
        parser.error(
            "KAFKA_BOOTSTRAP_SERVERS must be set under spark-submit "
            "(meterflow stream starts a local broker itself)"
        )
    return run_job(settings, args.available_now, args.accept_data_loss)


if __name__ == "__main__":
    raise SystemExit(main())
