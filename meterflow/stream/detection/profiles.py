"""Per-meter detection settings from the fleet registry: its interval, threshold overrides
and whether it is a constant load.

The registry (``meters.parquet``, :func:`meterflow.core.lake.registry_parquet`) may carry,
per meter, optional columns named like the thresholds they replace (:data:`PROFILE_COLUMNS`,
``interval_seconds`` among them), and ``constant_load`` (true: no STUCK, on water no LEAK).
A null value, or a missing column, keeps the default (the environment's
:class:`~meterflow.core.thresholds.DetectionRules`, per meter type where the rule is).
:func:`load_profiles` reads them when the detector starts (and again when the registry is
replaced: :mod:`meterflow.stream.detection.reload`), and refuses a value no rule could work
with, naming the meter, so a typo in the registry stops the start rather than silencing a
meter's alarms. Their bounds are the registry's
(:data:`meterflow.core.registry.PROFILE_BOUNDS`), which the import validates with too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import reduce
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from meterflow.core import lake, registry
from meterflow.core.contract import MeterType
from meterflow.core.errors import ConfigError
from meterflow.core.logs import get_logger
from meterflow.core.registry import CONSTANT_LOAD
from meterflow.core.thresholds import DetectionRules

log = get_logger(__name__)


INTERVAL = registry.INTERVAL
#: The columns read, with their bounds, declared once in :mod:`meterflow.core.registry`
#: (which ``meterflow registry import`` validates with too).
_COLUMNS = registry.PROFILE_BOUNDS
#: Every column :func:`load_profiles` reads besides ``device_id``.
PROFILE_COLUMNS: tuple[str, ...] = tuple(_COLUMNS)
#: Per meter type in :class:`DetectionRules`: a meter's own value holds for its type.
_PER_TYPE = frozenset({"stuck_min", "spike_min"})


@dataclass(frozen=True, slots=True)
class MeterProfile:
    """What the registry says of one meter's detection; None = the detector's default.

    Meters with the same settings share one profile (and one ``rules``), so a fleet's
    mapping pickles small into the Spark plan.
    """

    interval_s: int | None
    rules: DetectionRules | None
    constant_load: bool = False


def load_profiles(registry: str, rules: DetectionRules) -> dict[str, MeterProfile]:
    """The profiles of the meters of ``registry`` (directory or file) that have an interval
    or an override, thresholds built on ``rules``; empty if the registry does not exist."""
    path = lake.registry_parquet(registry)
    filesystem, inner = lake.filesystem_for(path)
    if filesystem.get_file_info(inner).type == pafs.FileType.NotFound:
        log.warning("detect=profiles registry=%s status=absent meters=defaults", path)
        return {}
    names = pq.read_schema(inner, filesystem=filesystem).names
    present = [n for n in _COLUMNS if n in names]
    flagged = [CONSTANT_LOAD] if CONSTANT_LOAD in names else []
    table = pq.read_table(inner, columns=["device_id", *present, *flagged], filesystem=filesystem)
    constant = (
        pc.fill_null(table[CONSTANT_LOAD].cast(pa.bool_()), False)
        if flagged
        else pa.chunked_array([pa.array([False] * table.num_rows)])
    )
    columns = [n for n in present if not pa.types.is_null(table.schema.field(n).type)]
    for name in columns:
        kind = table.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise ConfigError(
                f"registry {path}: column {name} is {kind}; it must be numeric "
                "(or be dropped for the defaults)"
            )
    # Only meters with a value somewhere: most of a fleet may have none.
    some = reduce(pc.or_, (pc.is_valid(table[n]) for n in columns), constant)
    keep = pc.and_(pc.is_valid(table["device_id"]), some)
    table, constant = table.filter(keep), constant.filter(keep)
    values = {name: table[name].to_pylist() for name in columns}
    shared: dict[tuple[Any, ...], MeterProfile] = {}
    profiles: dict[str, MeterProfile] = {}
    flags = constant.to_pylist()
    for row, device_id in enumerate(table["device_id"].to_pylist()):
        key = (*(_checked(path, device_id, n, values[n][row]) for n in columns), flags[row])
        profile = shared.get(key)
        if profile is None:
            overrides = dict(zip(columns, key[:-1], strict=True))
            profile = shared[key] = _profile(overrides, rules, constant_load=flags[row])
        profiles[device_id] = profile
    log.info(
        "detect=profiles registry=%s meters=%d with_rules=%d constant_loads=%d distinct=%d",
        path,
        len(profiles),
        sum(p.rules is not None for p in profiles.values()),
        sum(p.constant_load for p in profiles.values()),
        len(shared),
    )
    return profiles


def _checked(path: str, device_id: str, name: str, value: Any) -> int | float | None:
    """``value`` of column ``name`` as its rule takes it; a ConfigError if none could."""
    if value is None:
        return None
    bound = _COLUMNS[name]
    if bound.allows(value):
        return int(value) if bound.whole else float(value)
    raise ConfigError(
        f"registry {path}: meter {device_id} has {name}={value!r}; it must be "
        f"{bound.describe()} (fix it, or set it to null for the default)"
    )


def _profile(overrides: dict[str, Any], rules: DetectionRules, constant_load: bool) -> MeterProfile:
    interval = overrides.pop(INTERVAL, None)
    changed = {name: value for name, value in overrides.items() if value is not None}
    for name in _PER_TYPE & changed.keys():
        # The meter has one type; its value holds whichever type its readings name.
        changed[name] = dict.fromkeys(MeterType, changed[name])
    return MeterProfile(interval, replace(rules, **changed) if changed else None, constant_load)
