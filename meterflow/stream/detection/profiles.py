"""Per-meter detection settings from the fleet registry: its interval and threshold overrides.

The registry (``meters.parquet``, :func:`meterflow.core.lake.registry_parquet`) may carry,
per meter, optional columns named like the thresholds they replace (:data:`PROFILE_COLUMNS`,
``interval_seconds`` among them). A null value, or a missing column, keeps the default (the
environment's :class:`~meterflow.core.thresholds.DetectionRules`, per meter type where the
rule is). :func:`load_profiles` reads them when the detector starts (and again when the
registry is replaced: :mod:`meterflow.stream.detection.reload`), and refuses a value no rule
could work with, naming the meter, so a typo in the registry stops the start rather than
silencing a meter's alarms. Their bounds are the registry's
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


def load_profiles(registry: str, rules: DetectionRules) -> dict[str, MeterProfile]:
    """The profiles of the meters of ``registry`` (directory or file) that have an interval
    or an override, thresholds built on ``rules``; empty if the registry does not exist."""
    path = lake.registry_parquet(registry)
    filesystem, inner = lake.filesystem_for(path)
    if filesystem.get_file_info(inner).type == pafs.FileType.NotFound:
        log.warning("detect=profiles registry=%s status=absent meters=defaults", path)
        return {}
    present = [n for n in _COLUMNS if n in pq.read_schema(inner, filesystem=filesystem).names]
    table = pq.read_table(inner, columns=["device_id", *present], filesystem=filesystem)
    columns = [n for n in present if not pa.types.is_null(table.schema.field(n).type)]
    for name in columns:
        kind = table.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise ConfigError(
                f"registry {path}: column {name} is {kind}; it must be numeric "
                "(or be dropped for the defaults)"
            )
    # Only meters with a value somewhere: most of a fleet may have none.
    some = reduce(pc.or_, (pc.is_valid(table[n]) for n in columns), pa.scalar(False))
    table = table.filter(pc.and_(pc.is_valid(table["device_id"]), some))
    values = {name: table[name].to_pylist() for name in columns}
    shared: dict[tuple[Any, ...], MeterProfile] = {}
    profiles: dict[str, MeterProfile] = {}
    for row, device_id in enumerate(table["device_id"].to_pylist()):
        key = tuple(_checked(path, device_id, n, values[n][row]) for n in columns)
        profile = shared.get(key)
        if profile is None:
            profile = shared[key] = _profile(dict(zip(columns, key, strict=True)), rules)
        profiles[device_id] = profile
    log.info(
        "detect=profiles registry=%s meters=%d with_rules=%d distinct=%d",
        path,
        len(profiles),
        sum(p.rules is not None for p in profiles.values()),
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


def _profile(overrides: dict[str, Any], rules: DetectionRules) -> MeterProfile:
    interval = overrides.pop(INTERVAL, None)
    changed = {name: value for name, value in overrides.items() if value is not None}
    for name in _PER_TYPE & changed.keys():
        # The meter has one type; its value holds whichever type its readings name.
        changed[name] = dict.fromkeys(MeterType, changed[name])
    return MeterProfile(interval, replace(rules, **changed) if changed else None)
