# The Airflow 3 image: Airflow with its Spark and Kafka providers and meterflow,
# installed from requirements.txt pinned by constraints.txt (the same set as natively),
# plus Java so SparkSubmitOperator can run a Spark driver here against the compose Spark
# master. docker-compose.yml runs the init step, api-server, scheduler, dag-processor and
# triggerer from it. Build context: the repository root.
FROM python:3.11.13-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    SPARK_HOME=/usr/local/lib/python3.11/site-packages/pyspark \
    PYSPARK_PYTHON=python3 \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/meterflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/meterflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PYTHONPATH=/opt/meterflow/plugins \
    METERFLOW_DATA_DIR=/data \
    LAKE_PATH=/data/lake \
    CHECKPOINT_PATH=/data/checkpoints
RUN ln -sfn "$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")" /usr/lib/jvm/java-17-openjdk-amd64 2>/dev/null || true

WORKDIR /opt/meterflow
COPY requirements.txt constraints.txt ./
# The metadata database is PostgreSQL in compose: its driver is the only addition.
COPY docker/airflow-requirements.txt docker/airflow-requirements.txt
RUN pip install -r requirements.txt -r docker/airflow-requirements.txt -c constraints.txt

COPY pyproject.toml README.md ./
COPY meterflow meterflow
COPY simulator simulator
COPY jobs jobs
COPY dags dags
COPY plugins plugins
COPY docker/healthcheck.py docker/airflow-init.sh docker/
RUN pip install --no-deps -e . && airflow version

RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow \
    && mkdir -p /data/lake /data/checkpoints /opt/airflow/auth \
    && chown -R 50000:0 /data /opt/airflow \
    && chmod -R g+rwX /data /opt/airflow
USER 50000
CMD ["airflow", "version"]
