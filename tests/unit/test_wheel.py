"""meterflow installed from its wheel, not run from a checkout.

The wheel must hold two top-level packages, ``meterflow`` and ``simulator``, and ship the
repository's ``jobs/``, ``dags/`` and ``plugins/`` as data files (installed under
``share/meterflow/``), and :mod:`meterflow.core.folders` must find those files when the
checkout is not importable.

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
SETUPTOOLS: dict[str, Any] = PYPROJECT["tool"]["setuptools"]
PACKAGES = ("meterflow", "simulator")
#: Where the data files go (under the environment's data directory) -> their sources.
DATA_FILES: dict[str, list[str]] = SETUPTOOLS["data-files"]
SHIPPED = ("jobs", "dags", "plugins")
#: Every repository folder the wheel is built from.
SOURCES = (*PACKAGES, *SHIPPED)


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
    for folder in SOURCES:
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


def test_pyproject_ships_the_folders_as_data_files_under_share_meterflow() -> None:
    assert "package-dir" not in SETUPTOOLS, "no folder is remapped into another package"
    assert {p.split(".")[0] for p in SETUPTOOLS["packages"]} == set(PACKAGES)
    for target, sources in DATA_FILES.items():
        for source in sources:
            assert target == f"share/meterflow/{Path(source).parent}", target


def test_the_wheel_holds_meterflow_the_simulator_and_the_data_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        top_level = archive.read(f"{info}/top_level.txt").decode().split()
    data = info.replace(".dist-info", ".data")
    assert {name.split("/")[0] for name in names} == {*PACKAGES, info, data}
    assert sorted(top_level) == sorted(PACKAGES)
    # Every module of both packages (pyproject.toml lists meterflow's subpackages one by
    # one) and every Python file of the shipped folders, as a data file.
    wanted = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    for folder in SHIPPED:
        wanted |= {
            f"{data}/data/share/meterflow/{p.relative_to(ROOT)}"
            for p in (ROOT / folder).rglob("*.py")
        }
    assert wanted - names == set(), "not in the wheel"
    for path in (
        f"{data}/data/share/meterflow/jobs/streaming_job.py",
        f"{data}/data/share/meterflow/dags/meter_daily_averages.py",
        f"{data}/data/share/meterflow/plugins/meterflow_airflow/hooks.py",
        "simulator/__main__.py",
    ):
        assert path in names


#: Run with only the installed wheel on PYTHONPATH, from an empty directory: the paths the
#: spark-submit jobs, Airflow (the DAG's job_path, ``meterflow run --airflow``) and the CLI's
#: simulator come from.
PROBE = """
import json, sys
from datetime import date
import meterflow
from meterflow.core import folders
from meterflow.core.config import Settings
from meterflow.local.airflow import airflow_env

sys.path.append(str(folders.folder("plugins")))  # as Airflow does with its plugins folder
from meterflow_airflow.hooks import job_path
from meterflow.cli import build_parser  # imports the simulator's arguments

build_parser()
import simulator.cli

env = airflow_env(Settings.from_env({}), date(2024, 5, 27), {})
print(json.dumps({
    "meterflow": meterflow.__file__,
    "streaming_job": str(folders.job_file("streaming_job")),
    "daily_batch_job": str(folders.job_file("daily_batch_job")),
    "job_path": job_path("daily_batch_job"),
    "dags": str(folders.folder("dags")),
    "plugins": str(folders.folder("plugins")),
    "airflow_dags": env["AIRFLOW__CORE__DAGS_FOLDER"],
    "airflow_plugins": env["AIRFLOW__CORE__PLUGINS_FOLDER"],
    "simulator": simulator.cli.__file__,
}))
"""


def test_an_installed_wheel_finds_its_own_jobs_dags_plugins_and_simulator(
    installed: Path, tmp_path: Path
) -> None:
    outside = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")}
    # pip install --target puts the data files in the target directory, under share/.
    assert outside <= {*PACKAGES, "share", "bin"}, "the wheel installed more than meterflow"
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
    share = site / "share" / "meterflow"
    assert found["meterflow"] == site / "meterflow" / "__init__.py"
    assert found["streaming_job"] == share / "jobs" / "streaming_job.py"
    assert found["daily_batch_job"] == found["job_path"] == share / "jobs" / "daily_batch_job.py"
    assert found["dags"] == found["airflow_dags"] == share / "dags"
    assert found["plugins"] == found["airflow_plugins"] == share / "plugins"
    assert found["simulator"] == site / "simulator" / "cli.py"
    assert (found["dags"] / "meter_daily_averages.py").is_file()
    assert (found["plugins"] / "meterflow_airflow" / "hooks.py").is_file()
    assert found["streaming_job"].is_file() and found["daily_batch_job"].is_file()


def test_python_m_simulator_runs_the_installed_simulator(installed: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "simulator", "simulate", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: python -m simulator simulate")
    assert "--episode-rates" in done.stdout  # the simulator's own arguments


def test_the_images_copy_every_folder_the_package_is_built_from() -> None:
    """``pip install -e .`` in the images fails on a folder pyproject.toml names that is
    not there."""
    dockerfiles = sorted((ROOT / "docker").glob("*.Dockerfile"))
    assert len(dockerfiles) == 2
    for dockerfile in dockerfiles:
        copied = {
            source
            for line in dockerfile.read_text().splitlines()
            if line.startswith("COPY ")
            for source in line.split()[1:-1]
        }
        assert {"pyproject.toml", *SOURCES} <= copied, dockerfile.name
