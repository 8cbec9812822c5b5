"""Where the spark-submit jobs, the Airflow DAGs and the Airflow plugins are.

spark-submit and Airflow take them as files, by path, so they are not packages to import:
a checkout keeps them at the repository's top level (``jobs/``, ``dags/``, ``plugins/``)
and a wheel ships them as data files, which installers put under ``share/meterflow/`` of
the environment (``pyproject.toml``, ``[tool.setuptools.data-files]``). This module is the
one place that knows both layouts; ``meterflow run --airflow``, the DAGs' hook and the
CLI ask it for paths.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Literal

Folder = Literal["jobs", "dags", "plugins"]

#: The directory ``meterflow/`` is in: the repository's root in a checkout (editable install,
#: PYTHONPATH), else site-packages or the directory of ``pip install --target``.
PARENT = Path(__file__).resolve().parents[2]
#: Where a wheel's data files go, under the environment's data directory.
SHARE = Path("share", "meterflow")


def _installed_share() -> list[Path]:
    """Candidates for ``share/meterflow`` of an installed wheel, most likely first.

    The wheel's RECORD says where the installer put the data files, relative to the
    package's directory (``pip install``, ``--user``, ``--prefix``); ``pip install
    --target DIR`` puts them in ``DIR/share`` but records them as if DIR were a prefix's
    site-packages, so the directory beside the package is tried too.
    """
    found: list[Path] = []
    try:
        files = metadata.distribution("meterflow").files or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        parts = file.parts
        at = next((i for i in range(len(parts)) if parts[i : i + 2] == SHARE.parts), None)
        if at is not None:  # e.g. ../../../share/meterflow/jobs/streaming_job.py
            found.append(Path(str(file.locate())).parents[len(parts) - at - 3])
            break
    return [*found, PARENT / SHARE]


def folder(name: Folder) -> Path:
    """The folder ``name`` of the checkout meterflow runs from, else of the installed wheel.

    A real directory: spark-submit and Airflow take file paths.
    """
    # pyproject.toml marks a checkout: beside an installed package is site-packages, where
    # a `jobs` or `dags` folder would be some other project's.
    checkout = PARENT / name
    if (PARENT / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    candidates = [share / name for share in _installed_share()]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        f"{name}/ is neither in a checkout ({checkout}) nor installed with meterflow "
        f"({', '.join(map(str, candidates))}): reinstall meterflow"
    )


def job_file(name: str) -> Path:
    """The spark-submit entry file ``jobs/<name>.py``, without importing it."""
    path = folder("jobs") / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no Spark job {name!r}: {path} does not exist")
    return path
