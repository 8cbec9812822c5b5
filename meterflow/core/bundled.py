"""The project's folders outside the package: the spark-submit jobs, the Airflow DAGs and
plugins, and the simulator.

A checkout keeps them at the repository's top level (``jobs/``, ``dags/``, ``plugins/``,
``simulator/``). A wheel carries them inside the package, under ``meterflow/_bundled/``
(``pyproject.toml`` maps them), so installing meterflow adds no generic top-level ``jobs``
or ``simulator`` to site-packages. This module is the one place that knows both layouts:
spark-submit, Airflow and the CLI ask it for paths instead of importing by name.
"""

from __future__ import annotations

import sys
from importlib import resources
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from types import ModuleType
from typing import Literal

Folder = Literal["jobs", "dags", "plugins", "simulator"]

#: Where a wheel puts the folders, inside the ``meterflow`` package.
BUNDLED = "_bundled"
#: The repository's root, when meterflow runs from a checkout (editable install, PYTHONPATH).
CHECKOUT = Path(__file__).resolve().parents[2]


def folder(name: Folder) -> Path:
    """The folder ``name`` inside the installed package, else in the checkout meterflow
    runs from. A real directory: spark-submit and Airflow take file paths."""
    bundled = resources.files("meterflow").joinpath(BUNDLED, name)
    if isinstance(bundled, Path) and bundled.is_dir():
        return bundled
    # pyproject.toml marks a checkout: beside an installed package is site-packages, where
    # a `jobs` or `simulator` would be some other project's.
    checkout = CHECKOUT / name
    if (CHECKOUT / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"{name}/ is neither in the installed meterflow ({bundled}) nor in a checkout "
        f"({checkout}): reinstall meterflow"
    )


def job_file(name: str) -> Path:
    """The spark-submit entry file ``jobs/<name>.py``, without importing it."""
    path = folder("jobs") / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no Spark job {name!r}: {path} does not exist")
    return path


def import_simulator() -> ModuleType:
    """The ``simulator`` package, imported under that name from :func:`folder`.

    Its modules import each other as ``simulator.x``. In a wheel it lives inside meterflow,
    not on ``sys.path``, so it is registered from there before the first ``simulator.x``
    import; a checkout's copy, already imported from the repository root, is kept. Another
    project's ``simulator`` is refused rather than used.
    """
    home = folder("simulator")
    loaded = sys.modules.get("simulator")
    if loaded is None:
        spec = spec_from_file_location(
            "simulator", home / "__init__.py", submodule_search_locations=[str(home)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import the simulator from {home}")
        loaded = module_from_spec(spec)
        sys.modules["simulator"] = loaded
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            del sys.modules["simulator"]
            raise
    where = [Path(entry).resolve() for entry in getattr(loaded, "__path__", [])]
    if where != [home.resolve()]:
        raise ImportError(f"the simulator imported is not meterflow's: {where}, not {home}")
    return loaded
