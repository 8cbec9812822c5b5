"""The project image's connector step, run natively: ``docker/install-kafka-connector.sh``.

The image resolves Spark's JVM Kafka connector from Maven Central, which CI cannot reach.
So the test builds a local Maven repository whose jars are compiled here by ``javac`` for
the coordinates the Dockerfile names, with their dependencies declared in poms (one of
them a jar Spark already ships, in another version), points Spark's Ivy at it, and runs
the script against a throwaway copy of PySpark. The script must add the connector and its
new dependency, keep Spark's own jar, and prove that a fresh session loads the provider.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyspark
import pytest
from helpers import ROOT

PROVIDER = "org.apache.spark.sql.kafka010.KafkaSourceProvider"


def _coordinate() -> tuple[str, str, str]:
    dockerfile = (ROOT / "docker" / "spark.Dockerfile").read_text()
    found = re.search(r"^ARG SPARK_KAFKA_PACKAGE=(\S+):(\S+):(\S+)$", dockerfile, re.M)
    assert found, "spark.Dockerfile names no SPARK_KAFKA_PACKAGE"
    return found.group(1), found.group(2), found.group(3)


def _artifact(
    repo: Path,
    work: Path,
    coordinate: tuple[str, str, str],
    java_class: str,
    dependencies: list[tuple[str, str, str]] = (),  # type: ignore[assignment]
) -> None:
    """Compile a one-class jar and publish it with its pom in Maven layout."""
    group, artifact, version = coordinate
    package, _, name = java_class.rpartition(".")
    source = work / artifact / "src" / (java_class.replace(".", "/") + ".java")
    source.parent.mkdir(parents=True)
    source.write_text(f"package {package};\npublic class {name} {{}}\n")
    classes = work / artifact / "classes"
    subprocess.run(["javac", "-d", str(classes), str(source)], check=True)
    target = repo / group.replace(".", "/") / artifact / version
    target.mkdir(parents=True)
    jar = target / f"{artifact}-{version}.jar"
    subprocess.run(["jar", "cf", str(jar), "-C", str(classes), "."], check=True)
    needs = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in dependencies
    )
    (target / f"{artifact}-{version}.pom").write_text(
        textwrap.dedent(
            f"""\
            <project xmlns="http://maven.apache.org/POM/4.0.0">
              <modelVersion>4.0.0</modelVersion>
              <groupId>{group}</groupId><artifactId>{artifact}</artifactId>
              <version>{version}</version><packaging>jar</packaging>
              <dependencies>{needs}</dependencies>
            </project>
            """
        )
    )


@pytest.fixture(scope="module")
def stand_in_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Ivy settings file whose only resolver is a local Maven repository of stand-ins."""
    root = tmp_path_factory.mktemp("maven")
    repo, work = root / "repo", root / "work"
    clients = ("org.apache.kafka", "kafka-clients", "3.9.1")
    slf4j = ("org.slf4j", "slf4j-api", "2.0.99")  # Spark ships its own slf4j-api
    _artifact(repo, work, clients, "org.apache.kafka.clients.StandIn")
    _artifact(repo, work, slf4j, "org.slf4j.StandIn")
    _artifact(repo, work, _coordinate(), PROVIDER, [clients, slf4j])
    settings = root / "ivysettings.xml"
    settings.write_text(
        f"""<ivysettings>
  <settings defaultResolver="stand-ins"/>
  <resolvers>
    <ibiblio name="stand-ins" m2compatible="true" root="{repo.as_uri()}"/>
  </resolvers>
</ivysettings>
"""
    )
    return settings


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_HOME", "PYSPARK_GATEWAY_PORT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


def test_the_connector_step_installs_jars_a_fresh_session_loads(
    stand_in_repository: Path, tmp_path: Path
) -> None:
    real = Path(pyspark.__file__).parent
    copy = tmp_path / "site" / "pyspark"
    shutil.copytree(real, copy, ignore=shutil.ignore_patterns("jars", "__pycache__"))
    (copy / "jars").mkdir()
    for jar in (real / "jars").iterdir():
        (copy / "jars" / jar.name).symlink_to(jar)
    group, artifact, version = _coordinate()

    result = subprocess.run(
        [
            "bash",
            str(ROOT / "docker" / "install-kafka-connector.sh"),
            f"{group}:{artifact}:{version}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_environment(
            PYTHONPATH=str(copy.parent), SPARK_JARS_IVY_SETTINGS=str(stand_in_repository)
        ),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"added {artifact}-{version}.jar" in result.stdout
    assert "added kafka-clients-3.9.1.jar" in result.stdout
    assert "slf4j-api already in Spark, kept Spark's" in result.stdout
    assert f"{PROVIDER} loads in a fresh Spark session" in result.stdout
    added = {p.name for p in (copy / "jars").iterdir() if not p.is_symlink()}
    assert added == {f"{artifact}-{version}.jar", "kafka-clients-3.9.1.jar"}
    assert not list((real / "jars").glob("spark-sql-kafka*")), "the real PySpark was changed"


def test_a_session_started_with_packages_sees_the_connector(
    stand_in_repository: Path, tmp_path: Path
) -> None:
    """`spark-submit --packages ...` users: the job must not say the connector is missing."""
    group, artifact, version = _coordinate()
    probe = textwrap.dedent(
        f"""
        from pyspark.sql import SparkSession
        from meterflow.spark.session import jvm_kafka_available
        spark = (
            SparkSession.builder.master("local[1]")
            .config("spark.jars.packages", "{group}:{artifact}:{version}")
            .config("spark.jars.ivySettings", {str(stand_in_repository)!r})
            .config("spark.jars.ivy", {str(tmp_path / "ivy")!r})
            .getOrCreate()
        )
        print("available", jvm_kafka_available(spark))
        spark.stop()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        env=_environment(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "available True" in result.stdout
