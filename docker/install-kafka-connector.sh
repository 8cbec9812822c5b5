#!/usr/bin/env bash
# Build-time only: resolve Spark's JVM Kafka connector (and what it needs) with Spark's own
# Ivy resolver, then add to PySpark's jars/ each jar Spark does not already ship, so
# `METERFLOW_KAFKA_SOURCE=jvm` works without --packages (containers start offline).
# Usage: install-kafka-connector.sh org.apache.spark:spark-sql-kafka-0-10_2.13:4.2.0
set -euo pipefail
package="${1:?usage: install-kafka-connector.sh GROUP:ARTIFACT:VERSION}"
ivy="$(mktemp -d)"
python - "$package" "$ivy" <<'PY'
import sys
from pyspark.sql import SparkSession

package, ivy = sys.argv[1:]
spark = (
    SparkSession.builder.master("local[1]")
    .config("spark.jars.packages", package)
    .config("spark.jars.ivy", ivy)
    .getOrCreate()
)
provider = "org.apache.spark.sql.kafka010.KafkaSourceProvider"
spark.sparkContext._jvm.java.lang.Class.forName(provider)
spark.stop()
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
rm -rf "$ivy"
