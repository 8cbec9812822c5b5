"""meterflow installed from its wheel, not run from a checkout.

The wheel must hold one top-level package, ``meterflow``, with the repository's ``jobs/``,
``dags/``, ``plugins/`` and ``simulator/`` inside it (pyproject.toml maps them under
``meterflow/_bundled/``), and :mod:`meterflow.core.bundled` must find those copies when
the checkout is not importable.

The wheel is built from a copy of the sources pyproject.toml names, so the build leaves
nothing in the checkout: without build isolation when this environment's setuptools meets
pyproject.toml's build requirement, else pip installs one into an isolated build
environment (from its cache, or PyPI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT
from packaging.requirements import Requirement

PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Repository folder -> where the wheel puts it, from pyproject.toml.
MAPPED: dict[str, str] = {
    folder: package.replace(".", "/")
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items()
}
BUNDLED = ("jobs", "dags", "plugins", "simulator")


def setuptools_is_enough() -> bool:
    """Whether this environment's setuptools can build the wheel without isolation."""
    (wanted,) = (
        Requirement(r)
        for r in PYPROJECT["build-system"]["requires"]
        if Requirement(r).name == "setuptools"
    )
    try:
        return wanted.specifier.contains(version("setuptools"))
    except PackageNotFoundError:
        return False


def pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("meterflow", *MAPPED):
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("wheel")
    isolation = ["--no-build-isolation"] if setuptools_is_enough() else []
    pip("wheel", "--quiet", "--no-deps", *isolation, "--wheel-dir", str(out), str(source))
    (built,) = out.glob("meterflow-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    pip("install", "--quiet", "--no-deps", "--no-compile", "--target", str(target), str(wheel))
    return target


def test_pyproject_maps_the_bundled_folders_into_meterflow() -> None:
    assert set(MAPPED) == set(BUNDLED)
    for folder, inside in MAPPED.items():
        assert inside == f"meterflow/_bundled/{folder}"


def test_the_wheel_holds_one_top_level_package_and_the_bundled_folders(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        top_level = archive.read(f"{info}/top_level.txt").decode().split()
    assert {name.split("/")[0] for name in names} == {"meterflow", info}
    assert top_level == ["meterflow"]
    # Every module of the package (pyproject.toml lists its subpackages one by one) and
    # every Python file of the bundled folders.
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "meterflow").rglob("*.py")}
    for folder in BUNDLED:
        wanted |= {
            f"meterflow/_bundled/{p.relative_to(ROOT)}" for p in (ROOT / folder).rglob("*.py")
        }
    assert wanted - names == set(), "not in the wheel"
    for path in (
        "meterflow/_bundled/jobs/streaming_job.py",
        "meterflow/_bundled/jobs/daily_batch_job.py",
        "meterflow/_bundled/dags/meter_daily_averages.py",
        "meterflow/_bundled/plugins/meterflow_airflow/hooks.py",
        "meterflow/_bundled/simulator/cli.py",
    ):
        assert path in names


#: Run with only the installed wheel on PYTHONPATH, from an empty directory: the paths the
#: spark-submit jobs, Airflow (the DAG's job_path, ``meterflow run --airflow``) and the CLI's
#: simulator come from.
PROBE = """
import json, sys
from datetime import date
import meterflow
from meterflow.core import bundled
from meterflow.core.config import Settings
from meterflow.local.airflow import airflow_env

sys.path.append(str(bundled.folder("plugins")))  # as Airflow does with its plugins folder
from meterflow_airflow.hooks import job_path
from meterflow.cli import build_parser  # imports the simulator's arguments

build_parser()
import simulator.cli

env = airflow_env(Settings.from_env({}), date(2024, 5, 27), {})
print(json.dumps({
    "meterflow": meterflow.__file__,
    "streaming_job": str(bundled.job_file("streaming_job")),
    "daily_batch_job": str(bundled.job_file("daily_batch_job")),
    "job_path": job_path("daily_batch_job"),
    "dags": str(bundled.folder("dags")),
    "plugins": str(bundled.folder("plugins")),
    "airflow_dags": env["AIRFLOW__CORE__DAGS_FOLDER"],
    "airflow_plugins": env["AIRFLOW__CORE__PLUGINS_FOLDER"],
    "simulator": simulator.cli.__file__,
}))
"""


def test_an_installed_wheel_finds_its_own_jobs_dags_plugins_and_simulator(
    installed: Path, tmp_path: Path
) -> None:
    outside = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")}
    assert outside <= {"meterflow", "bin"}, "the wheel installed more than meterflow"
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = {key: Path(value).resolve() for key, value in json.loads(done.stdout).items()}
    site = installed.resolve()
    bundled = site / "meterflow" / "_bundled"
    assert found["meterflow"] == site / "meterflow" / "__init__.py"
    assert found["streaming_job"] == bundled / "jobs" / "streaming_job.py"
    assert found["daily_batch_job"] == found["job_path"] == bundled / "jobs" / "daily_batch_job.py"
    assert found["dags"] == found["airflow_dags"] == bundled / "dags"
    assert found["plugins"] == found["airflow_plugins"] == bundled / "plugins"
    assert found["simulator"] == bundled / "simulator" / "cli.py"
    assert (found["dags"] / "meter_daily_averages.py").is_file()
    assert (found["plugins"] / "meterflow_airflow" / "hooks.py").is_file()
    assert found["streaming_job"].is_file() and found["daily_batch_job"].is_file()


def test_the_images_copy_every_folder_the_package_maps() -> None:
    """``pip install -e .`` in the images fails on a mapped folder that is not there."""
    dockerfiles = sorted((ROOT / "docker").glob("*.Dockerfile"))
    assert len(dockerfiles) == 2
    for dockerfile in dockerfiles:
        copied = {
            source
            for line in dockerfile.read_text().splitlines()
            if line.startswith("COPY ")
            for source in line.split()[1:-1]
        }
        assert {"pyproject.toml", "meterflow", *MAPPED} <= copied, dockerfile.name
