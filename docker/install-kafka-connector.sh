#!/usr/bin/env bash
# Build-time only: resolve Spark's JVM Kafka connector (and what it needs) with Spark's own
# Ivy resolver, add to PySpark's jars/ each jar Spark does not already ship, then prove in a
# fresh Spark session (as the streaming job will start: no --packages) that the connector
# loads, so `METERFLOW_KAFKA_SOURCE=jvm` works in containers that start offline.
# Usage: install-kafka-connector.sh org.apache.spark:spark-sql-kafka-0-10_2.13:4.2.0
# SPARK_JARS_IVY_SETTINGS may name an Ivy settings file (a mirror, or a local repository).
set -euo pipefail
package="${1:?usage: install-kafka-connector.sh GROUP:ARTIFACT:VERSION}"
ivy="$(mktemp -d)"
trap 'rm -rf "$ivy"' EXIT
python - "$package" "$ivy" <<'PY'
import os
import sys

from pyspark.sql import SparkSession

package, ivy = sys.argv[1:]
builder = (
    SparkSession.builder.master("local[1]")
    .config("spark.jars.packages", package)
    .config("spark.jars.ivy", ivy)
)
if os.environ.get("SPARK_JARS_IVY_SETTINGS"):
    builder = builder.config("spark.jars.ivySettings", os.environ["SPARK_JARS_IVY_SETTINGS"])
builder.getOrCreate().stop()  # resolution happens at start; it fails loudly
PY
jars="$(python -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')"
for jar in "$ivy"/jars/*.jar; do
  name="$(basename "$jar")"     # <group>_<artifact>-<version>.jar
  file="${name#*_}"             # <artifact>-<version>.jar
  artifact="${file%-*}"
  if compgen -G "$jars/$artifact-[0-9]*.jar" >/dev/null; then
    echo "kafka connector: $artifact already in Spark, kept Spark's"
  else
    cp "$jar" "$jars/$file"
    echo "kafka connector: added $file"
  fi
done
python - <<'PY'
from pyspark.sql import SparkSession

provider = "org.apache.spark.sql.kafka010.KafkaSourceProvider"
spark = SparkSession.builder.master("local[1]").getOrCreate()
try:
    spark.sparkContext._jvm.java.lang.Class.forName(provider)
finally:
    spark.stop()
print(f"kafka connector: {provider} loads in a fresh Spark session")
PY
