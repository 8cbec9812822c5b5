"""The environment is one coherent install (docs/architecture.md: pyspark-client
overwrites PySpark)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pyspark
from pyspark.sql import SparkSession


def _jar_version() -> str:
    jars = Path(pyspark.__file__).parent / "jars"
    cores = [p.name for p in jars.glob("spark-core_*.jar")]
    assert cores, f"no spark-core jar under {jars}: the pyspark wheel is incomplete"
    match = re.fullmatch(r"spark-core_[\d.]+-(.+)\.jar", cores[0])
    assert match, cores
    return match.group(1)


def test_pyspark_python_files_match_the_jars() -> None:
    assert pyspark.__version__ == _jar_version(), (
        f"PySpark Python files say {pyspark.__version__} but the jars are {_jar_version()}: "
        "pyspark-client was installed over pyspark with another version; pin both equal"
    )


def test_pyspark_distributions_agree() -> None:
    versions = {name: metadata.version(name) for name in ("pyspark", "pyspark-client")}
    assert len(set(versions.values())) == 1, versions


def test_running_jvm_matches_python(spark: SparkSession) -> None:
    assert spark.version == pyspark.__version__


def test_the_spark_ui_cannot_kill_jobs(spark: SparkSession) -> None:
    """Every session meterflow starts (the streaming job's in compose too) has the UI's kill
    buttons off: whoever reaches the UI may look, not stop the stream."""
    assert spark.sparkContext.getConf().get("spark.ui.killEnabled") == "false"
