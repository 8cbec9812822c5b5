"""PySpark's Python worker daemon, with the heavy libraries imported before it forks.

Spark starts one daemon per executor and forks a Python worker from it for each task
slot. Every worker would then import pyarrow, numpy, pandas and confluent-kafka itself,
each into its own private memory. Imported here, once, the forked workers share those pages
copy-on-write, which is what lets the streaming job fit its container's ``mem_limit``
(bench/memory.py measures it). Set as ``spark.python.daemon.module`` by
:func:`meterflow.spark.session.get_spark`.
"""

import gc

import confluent_kafka  # noqa: F401
import numpy  # noqa: F401
import pandas  # noqa: F401
import pyarrow
import pyarrow.compute
import pyarrow.parquet  # noqa: F401
import pyspark.worker  # noqa: F401
from pyspark import daemon

if __name__ == "__main__":
    # A reused worker runs a full ``gc.collect()`` after each task, which walked every
    # object imported above and, by writing their GC headers, copied the shared pages into
    # each worker; frozen, they are outside its reach (docs/architecture.md, "Where a
    # micro-batch's time goes").
    gc.freeze()
    daemon.manager()
