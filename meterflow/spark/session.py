"""SparkSession set-up shared by the jobs and the tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from urllib.parse import urlparse

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession
from pyspark.sql.streaming import DataStreamWriter, StreamingQuery

from meterflow.core.config import env_value
from meterflow.core.kafka_security import KafkaCluster
from meterflow.spark.kafka_source import SOURCE_NAME, KafkaDataSource

JVM_KAFKA_PROVIDER = "org.apache.spark.sql.kafka010.KafkaSourceProvider"
#: Spark's checkpoint files through Hadoop's ``FileSystem`` API (its default is
#: ``FileContext``): see :func:`checkpoint_conf`.
FILE_SYSTEM_CHECKPOINTS = (
    "org.apache.spark.sql.execution.streaming.checkpointing.FileSystemBasedCheckpointFileManager"
)


def get_spark(app_name: str, master: str | None = None, **conf: str) -> SparkSession:
    """A session with the Python Kafka source registered and quiet, small-machine defaults.

    Under ``spark-submit`` the master comes from the command line; ``master`` applies only
    when this process creates the session itself.
    """
    # Workers must run the interpreter that has meterflow installed.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master and "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit
        builder = builder.master(master)
    defaults = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(max(2, os.cpu_count() or 2)),
        "spark.ui.showConsoleProgress": "false",
        # The UI shows the jobs; nobody who reaches it may kill them.
        "spark.ui.killEnabled": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.python.worker.reuse": "true",
        # Python workers fork from a daemon that has already imported the heavy libraries.
        "spark.python.daemon.module": "meterflow.spark.daemon",
        # Write each date partition with its own open file instead of sorting the whole
        # micro-batch by date first (a batch spans one or two days).
        "spark.sql.maxConcurrentOutputFileWriters": "16",
        # Fewer, larger Arrow batches between the JVM and the Python classifier.
        "spark.sql.execution.arrow.maxRecordsPerBatch": "50000",
        # Retention may delete a partition between a job listing it and reading it.
        "spark.sql.files.ignoreMissingFiles": "true",
        # transformWithState (the stateful detector) needs RocksDB; stateless queries never
        # open a state store, so this changes nothing for them.
        "spark.sql.streaming.stateStore.providerClass": (
            "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
        ),
        # One memory budget for all of the executor's RocksDB instances (block cache and
        # memtables), not one each: the detector's state is a few kB per meter, so a
        # small budget holds a large fleet's hot part, and the container's limit holds.
        "spark.sql.streaming.stateStore.rocksdb.boundedMemoryUsage": "true",
        "spark.sql.streaming.stateStore.rocksdb.maxMemoryUsageMB": "64",
        # A micro-batch's commit writes a changelog of the keys it changed; snapshots of
        # the whole store are uploaded in the background every few batches. Without it,
        # every detector batch made and uploaded a RocksDB checkpoint before committing.
        "spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled": "true",
    }
    # What spark-submit was given (--conf, spark-defaults.conf) wins over these defaults.
    submitted = None
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        SparkContext._ensure_initialized()  # joins spark-submit's JVM, which holds its conf
        submitted = SparkConf()
    for key, value in defaults.items():
        if submitted is None or not submitted.contains(key):
            builder = builder.config(key, value)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(env_value("SPARK_LOG_LEVEL"))
    spark.dataSource.register(KafkaDataSource)
    return spark


def checkpoint_conf(checkpoint_path: str) -> dict[str, str]:
    """The Spark conf for streaming checkpoints under ``checkpoint_path``.

    On a local disk, Hadoop's ``FileContext`` (Spark's default) runs a ``readlink`` process
    for each rename of a checkpoint file, since Hadoop's native library is not there; its
    ``FileSystem`` API renames without one (docs/architecture.md, "Where a micro-batch's
    time goes"). That manager's renames are only as safe as the file system's own, which
    a local disk's are; elsewhere (HDFS, object stores) Spark's default stays.
    """
    if urlparse(checkpoint_path).scheme not in ("", "file"):
        return {}
    return {"spark.sql.streaming.checkpointFileManagerClass": FILE_SYSTEM_CHECKPOINTS}


def jvm_kafka_available(spark: SparkSession) -> bool:
    """Whether Spark's own Kafka connector can be loaded by the queries of ``spark``.

    Asked through the thread's context class loader, which also sees jars added with
    ``--packages`` / ``spark.jars.packages``; py4j's ``Class.forName`` does not.
    """
    jvm = spark.sparkContext._jvm
    if jvm is None:
        return False
    try:
        jvm.java.lang.Thread.currentThread().getContextClassLoader().loadClass(JVM_KAFKA_PROVIDER)
        return True
    except Exception:  # py4j raises a generic Py4JJavaError for ClassNotFoundException
        return False


def kafka_format(spark: SparkSession, kafka_source: str) -> str:
    """The reader format for ``METERFLOW_KAFKA_SOURCE`` ``kafka_source`` (python, jvm, or
    auto, which prefers the JVM jar)."""
    if kafka_source == "python":
        return SOURCE_NAME
    available = jvm_kafka_available(spark)
    if kafka_source == "jvm" and not available:
        raise RuntimeError(
            "METERFLOW_KAFKA_SOURCE=jvm but the spark-sql-kafka jar is not on the classpath "
            "(spark-submit --packages org.apache.spark:spark-sql-kafka-0-10_2.13:<spark version>)"
        )
    return "kafka" if available else SOURCE_NAME


def source_options(cluster: KafkaCluster, source_format: str) -> dict[str, str]:
    """The ``kafka.*`` options of the Kafka source ``source_format`` for ``cluster``: the
    servers, and the security as the JVM source's Java client names it, or as the Python
    source's librdkafka consumers (on the driver and every executor) take it."""
    security = (
        cluster.security.jvm_options()
        if source_format == "kafka"
        else {f"kafka.{key}": value for key, value in cluster.security.librdkafka().items()}
    )
    return {"kafka.bootstrap.servers": cluster.bootstrap, **security}


def stop_active_session() -> None:
    """Stop the session this process started, if any (a command's last step)."""
    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()


def start_stream(writer: DataStreamWriter, available_now: bool, seconds: float) -> StreamingQuery:
    """Start a streaming query: once over what the source holds now (``available_now``),
    else a micro-batch every ``seconds``."""
    if available_now:
        return writer.trigger(availableNow=True).start()
    return writer.trigger(processingTime=f"{seconds:g} seconds").start()


def set_log_levels(spark: SparkSession, levels: Mapping[str, str]) -> None:
    """Set the log4j level of single JVM loggers, by class name (``"ERROR"``, ``"OFF"``)."""
    jvm = spark.sparkContext._jvm
    if jvm is None:
        return
    log4j = jvm.org.apache.logging.log4j
    for name, level in levels.items():
        log4j.core.config.Configurator.setLevel(name, log4j.Level.toLevel(level))
