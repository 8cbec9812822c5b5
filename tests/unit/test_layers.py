"""The package's layers (docs/architecture.md, "Layers"): a module imports only from its own
layer or the ones below. Read from the source with ``ast``, imports inside functions and
``TYPE_CHECKING`` blocks included, so a lazy import cannot hide a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "meterflow"

#: Low to high. ``meterflow`` itself (its ``__init__``) is layer 0 with ``meterflow.core``.
LAYERS: dict[str, int] = {
    "meterflow": 0,
    "meterflow.core": 0,
    "meterflow.clients": 1,
    "meterflow.spark": 2,
    "meterflow.stream": 3,
    "meterflow.batch": 3,
    "meterflow.serving": 3,
    "meterflow.dashboards": 3,
    "meterflow.local": 3,
    "meterflow.cli": 4,
    "meterflow.compose_check": 4,
}


def layer_of(module: str) -> int | None:
    """The layer of ``meterflow.x.y`` (that of ``meterflow.x``); None outside the layers."""
    return LAYERS.get(".".join(module.split(".")[:2]))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The modules one import statement names: ``from a import b`` names ``a``, or ``a.b``
    when ``a`` is the top package and ``b`` one of its modules (``from meterflow import
    cli``); ``from meterflow import __version__`` names ``meterflow``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    if base == "meterflow":
        return [
            f"meterflow.{alias.name}"
            if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file()
            else base
            for alias in node.names
        ]
    return [base]


def test_no_module_imports_from_a_higher_layer() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10, f"no meterflow modules under {PACKAGE}"
    problems = []
    for path in modules:
        module = module_name(path)
        mine = layer_of(module)
        where = path.relative_to(PACKAGE.parent)
        if mine is None:
            problems.append(f"{where}: {module} is in no layer (add it to LAYERS and the docs)")
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for name in imported(node, module, path.name == "__init__.py"):
                other = layer_of(name)
                if name.split(".")[0] == "meterflow" and other is None:
                    problems.append(f"{where}:{node.lineno}: {module} imports {name}, in no layer")
                elif other is not None and other > mine:
                    problems.append(
                        f"{where}:{node.lineno}: {module} (layer {mine}) imports {name} "
                        f"(layer {other})"
                    )
    assert problems == [], "imports against docs/architecture.md's layers:\n" + "\n".join(problems)
