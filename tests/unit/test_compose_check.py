"""The compose pre-flight (`meterflow doctor`) and the init steps' .env check."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, free_port

from meterflow.compose_check import (
    CLUSTER_MASTER,
    HOST_PORTS,
    env_problems,
    memory_limits,
    read_env_file,
)

GOOD = {
    "MONGO_ROOT_PASSWORD": "s3cret-mongo",
    "MONGO_APP_PASSWORD": "s3cret-mongo-app",
    "KAFKA_SASL_PASSWORD": "s3cret-kafka",
    "MONGO_READER_PASSWORD": "s3cret-mongo-reader",
    "AIRFLOW_ADMIN_PASSWORD": "s3cret-airflow",
    "AIRFLOW_POSTGRES_PASSWORD": "s3cret-db",
    "AIRFLOW_FERNET_KEY": "yDyb2xDpzkS4vQ1TQkrDfONlMwHHdZ3Dx8DJfkumb-c=",
    "AIRFLOW_JWT_SECRET": "a-long-random-jwt-secret-0123",
    "METABASE_ADMIN_PASSWORD": "metabase1",
    "METABASE_POSTGRES_PASSWORD": "s3cret-mb",
}


def test_the_example_env_is_refused_for_each_placeholder() -> None:
    problems = env_problems(read_env_file(ROOT / ".env.example"))
    named = {line.split()[0] for line in problems}
    assert named == {
        name for name, value in read_env_file(ROOT / ".env.example").items() if "CHANGE-ME" in value
    }
    fernet = next(p for p in problems if p.startswith("AIRFLOW_FERNET_KEY"))
    assert "Fernet.generate_key()" in fernet


def test_a_secret_file_with_a_placeholder_is_refused(tmp_path: Path) -> None:
    """A password given as NAME_FILE (Docker secrets) is checked like one in .env."""
    stale, real = tmp_path / "kafka_password", tmp_path / "mongo_password"
    stale.write_text("CHANGE-ME-kafka\n")
    real.write_text("s3cret-from-a-file\n")
    problems = env_problems(
        {**GOOD, "KAFKA_SASL_PASSWORD_FILE": str(stale), "MONGO_APP_PASSWORD_FILE": str(real)}
    )
    assert len(problems) == 1
    assert problems[0].startswith(f"KAFKA_SASL_PASSWORD_FILE={stale} still holds a CHANGE-ME")


def test_good_values_pass_and_each_bad_kind_is_named() -> None:
    assert env_problems(GOOD) == []
    bad = {
        **GOOD,
        "AIRFLOW_FERNET_KEY": "not-a-fernet-key",
        "AIRFLOW_JWT_SECRET": "short",
        "METABASE_ADMIN_PASSWORD": "nodigits",
        "MONGO_ROOT_PASSWORD": "p@ss/word",
    }
    problems = env_problems(bad)
    assert [p.split()[0] for p in problems] == [
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_JWT_SECRET",
        "METABASE_ADMIN_PASSWORD",
        "MONGO_ROOT_PASSWORD",
    ]


def _doctor(env_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meterflow.cli", "doctor", "--env-file", str(env_file)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PATH": "/usr/bin:/bin"},  # no docker client: its checks noted
    )


def good_lines() -> list[str]:
    """.env.example with good secrets and free host ports (a test run may hold the defaults:
    the Spark UI's 4040, say)."""
    values = {**read_env_file(ROOT / ".env.example"), **GOOD}
    for name in HOST_PORTS:
        values[name] = str(free_port())
    return [f"{k}={v}" for k, v in values.items()]


def test_doctor_names_each_problem_and_passes_a_good_env(tmp_path: Path) -> None:
    example = _doctor(ROOT / ".env.example")
    assert example.returncode == 1
    assert "problem: AIRFLOW_FERNET_KEY is still a CHANGE-ME placeholder" in example.stderr
    assert "Traceback" not in example.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        lines = good_lines()
        good = tmp_path / "good.env"
        good.write_text("\n".join(lines) + "\n")
        assert _doctor(good).returncode == 0, _doctor(good).stderr
        taken = tmp_path / "taken.env"
        taken.write_text("\n".join([*lines, f"AIRFLOW_HOST_PORT={port}"]) + "\n")
        result = _doctor(taken)
    assert result.returncode == 1
    assert f"AIRFLOW_HOST_PORT={port} is already in use" in result.stderr


def test_airflow_init_stops_on_a_placeholder_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meterflow.compose_check", "airflow-init"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "AIRFLOW__CORE__FERNET_KEY": "CHANGE-ME-fernet-key-base64-32-bytes"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("airflow-init: AIRFLOW_FERNET_KEY is still a CHANGE-ME")
    assert len(result.stderr.strip().splitlines()) == 1


def test_doctor_compares_dockers_memory_with_the_limits(tmp_path: Path) -> None:
    """With a `docker` client on PATH: too little memory for the limits is named."""
    lines = good_lines()
    good = tmp_path / "good.env"
    good.write_text("\n".join(lines) + "\n")
    need = memory_limits(ROOT / "docker-compose.yml")
    for memory, ok in ((4 * 2**30, False), (9 * 2**30, True)):
        bin_dir = tmp_path / f"bin-{memory}"
        bin_dir.mkdir()
        docker = bin_dir / "docker"
        docker.write_text(f'#!/bin/sh\n[ "$1" = info ] && echo {memory}\nexit 0\n')
        docker.chmod(0o755)
        result = subprocess.run(
            [sys.executable, "-m", "meterflow.cli", "doctor", "--env-file", str(good)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"},
        )
        wanted = f"memory limits need {need / 2**30:.1f} GiB: give Docker more memory"
        assert (wanted in result.stderr) is not ok, result.stderr
        assert result.returncode == (0 if ok else 1), result.stderr


def test_doctor_wants_the_cluster_profile_and_its_master_together(tmp_path: Path) -> None:
    """COMPOSE_PROFILES=cluster without SPARK_MASTER pointing at it (jobs never reach the
    cluster), or the other way round (jobs wait for a master never started), is named; both
    together pass, and Docker's memory is compared with the larger total."""
    lines = good_lines()
    cases = {
        "profile only": (["COMPOSE_PROFILES=cluster"], "the cluster profile is on but"),
        "master only": ([f"SPARK_MASTER={CLUSTER_MASTER}"], "but the cluster profile is off"),
        "both": (["COMPOSE_PROFILES=cluster", f"SPARK_MASTER={CLUSTER_MASTER}"], None),
    }
    for name, (extra, problem) in cases.items():
        env_file = tmp_path / f"{name.replace(' ', '-')}.env"
        env_file.write_text("\n".join([*lines, *extra]) + "\n")
        result = _doctor(env_file)
        if problem is None:
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode == 1 and problem in result.stderr, (name, result.stderr)
    default = memory_limits(ROOT / "docker-compose.yml")
    with_cluster = memory_limits(ROOT / "docker-compose.yml", {"cluster"})
    assert with_cluster > default
    assert memory_limits(ROOT / "docker-compose.yml", {"other"}) == default
