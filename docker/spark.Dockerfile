# The project image: PySpark (a whole Spark: master, worker, spark-submit) with the JVM
# Kafka connector, meterflow and every Python dependency from requirements.txt pinned by
# constraints.txt, exactly as the native set-up installs them. docker-compose.yml runs the
# streaming job, the sink, the simulator and the one-shot init steps from it (the image can
# also run a standalone master and workers). Build context: the repository root.
FROM python:3.11.13-slim-bookworm

# Spark 4.2 needs Java 17+; procps gives `ps`, which Spark's launch scripts use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    SPARK_HOME=/usr/local/lib/python3.11/site-packages/pyspark \
    PYSPARK_PYTHON=python3 \
    METERFLOW_DATA_DIR=/data \
    LAKE_PATH=/data/lake \
    CHECKPOINT_PATH=/data/checkpoints
# JAVA_HOME differs on arm64: resolve it from the java on PATH when building there.
RUN ln -sfn "$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")" /usr/lib/jvm/java-17-openjdk-amd64 2>/dev/null || true

WORKDIR /opt/meterflow
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt

# spark-sql-kafka for the Scala and Spark versions of the pinned pyspark (4.2.0: Scala 2.13).
ARG SPARK_KAFKA_PACKAGE=org.apache.spark:spark-sql-kafka-0-10_2.13:4.2.0
COPY docker/install-kafka-connector.sh docker/install-kafka-connector.sh
RUN bash docker/install-kafka-connector.sh "$SPARK_KAFKA_PACKAGE"

# Every folder pyproject.toml maps into the package, so the install finds them all (the
# DAGs and plugins are not used here).
COPY pyproject.toml README.md ./
COPY meterflow meterflow
COPY simulator simulator
COPY jobs jobs
COPY dags dags
COPY plugins plugins
COPY docker/healthcheck.py docker/healthcheck.py
RUN pip install --no-deps -e . && meterflow --version

# One unprivileged user (uid 50000, as in the Airflow image) owns the shared volumes.
RUN useradd --uid 50000 --gid 0 --home-dir /opt/meterflow --no-create-home meterflow \
    && mkdir -p /data/lake /data/checkpoints /opt/spark-work \
    && chown -R 50000:0 /data /opt/spark-work \
    && chmod -R g+rwX /data /opt/spark-work
USER 50000
ENV SPARK_WORKER_DIR=/opt/spark-work
CMD ["meterflow", "--help"]
