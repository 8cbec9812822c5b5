"""A fleet of meters in households of one city, with believable metadata, and its registry.

Each household has an electricity, water and/or gas meter (the mix sets how many of each),
an owner, an address in one of a few districts, a position and a consumption scale that
all its meters share. Faker writes the names and numpy draws the numbers, both seeded, so
a seed gives the same fleet bit for bit (for one Faker version). The registry is the
fleet as Parquet, ``<lake>/registry/meters.parquet``, which the batch layer and the
``meters`` collection join readings with, and whose ``constant_load`` column tells the
detector which meters repeat one value by nature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import date, timedelta

import numpy as np
import pyarrow as pa
from faker import Faker

from meterflow.core import registry
from meterflow.core.contract import METER_SPECS, TYPE_ORDER, MeterType
from meterflow.core.errors import ConfigError
from simulator.load import ConstantLoad, assign_constant_loads
from simulator.registers import (
    DIGITS,
    NO_REGISTERS,
    USAGE,
    ReadingShares,
    assign_reports,
)

DEFAULT_MIX: dict[MeterType, float] = {
    MeterType.ELECTRICITY: 0.5,
    MeterType.WATER: 0.3,
    MeterType.GAS: 0.2,
}
DISTRICT_COUNT = 8
#: Meters went in over ten years; a fixed window keeps the fleet independent of today.
INSTALLED_FROM = date(2015, 1, 1)
INSTALL_WINDOW_DAYS = 3653
#: Spread of household consumption: lognormal, median 1, most between 0.5x and 2x.
SCALE_SIGMA = 0.4
SCALE_LIMITS = (0.25, 4.0)

#: The registry's columns as the simulator writes them; their types are the registry's
#: (:mod:`meterflow.core.registry`). ``interval_seconds`` is the simulator's --interval, null
#: when unknown; the batch layer derives each meter's expected readings a day from it.
REGISTRY_SCHEMA = registry.schema_of(
    [
        "device_id",
        "meter_type",
        "household_id",
        "owner",
        "address",
        "district",
        "city",
        "installed_on",
        "latitude",
        "longitude",
        "scale",
        "interval_seconds",
        "register_digits",
        registry.CONSTANT_LOAD,
    ]
)


@dataclass(frozen=True)
class Meter:
    """One meter as the registry knows it."""

    device_id: str
    meter_type: MeterType
    household_id: str
    owner: str
    address: str
    district: str
    city: str
    installed_on: date
    latitude: float
    longitude: float
    scale: float  # the household's consumption relative to a median one
    #: What it sends (:mod:`simulator.registers`): usage, a register, or both.
    reports: str = USAGE
    register_digits: int | None = None
    near_rollover: bool = False  # its register rolls over in the run's first day
    #: Its constant load (:mod:`simulator.load`), if any: it reports usage only, and the
    #: registry says ``constant_load`` (the load itself is not in the registry).
    constant: ConstantLoad | None = None


@dataclass
class Fleet:
    """Meters grouped by type (so a time step formats each type as one run) plus columns.

    ``type_index`` (into :data:`~meterflow.core.contract.TYPE_ORDER`) and ``scale`` are numpy
    columns so the load model computes a whole time step of the fleet at once.
    """

    meters: list[Meter]
    type_index: np.ndarray = field(init=False, repr=False)
    scale: np.ndarray = field(init=False, repr=False)
    slices: dict[MeterType, slice] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.meters = sorted(self.meters, key=lambda m: TYPE_ORDER.index(m.meter_type))
        self.type_index = np.array(
            [TYPE_ORDER.index(m.meter_type) for m in self.meters], dtype=np.int8
        )
        self.scale = np.array([m.scale for m in self.meters], dtype=np.float64)
        bounds = np.searchsorted(self.type_index, np.arange(len(TYPE_ORDER) + 1))
        self.slices = {
            t: slice(int(bounds[k]), int(bounds[k + 1])) for k, t in enumerate(TYPE_ORDER)
        }

    def __len__(self) -> int:
        return len(self.meters)

    @property
    def device_ids(self) -> list[str]:
        return [m.device_id for m in self.meters]


def meter_counts(count: int, mix: Mapping[MeterType, float]) -> dict[MeterType, int]:
    """Split ``count`` meters by the mix's shares (largest remainder, so they add up)."""
    if count < 1:
        raise ValueError(f"a fleet needs at least one meter, not {count}")
    if any(share < 0 for share in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"meter mix {dict(mix)} needs non-negative shares and one above 0")
    total = sum(mix.values())
    exact = {t: count * mix.get(t, 0.0) / total for t in TYPE_ORDER}
    counts = {t: int(v) for t, v in exact.items()}
    by_remainder = sorted(TYPE_ORDER, key=lambda t: counts[t] - exact[t])
    for meter_type in by_remainder[: count - sum(counts.values())]:
        counts[meter_type] += 1
    return counts


def build_fleet(
    count: int,
    seed: int | None = None,
    mix: Mapping[MeterType, float] = DEFAULT_MIX,
    shares: ReadingShares = NO_REGISTERS,
    constant_load_share: float = 0.0,
) -> Fleet:
    """``count`` meters of the mix's types in one city; the same ``seed`` gives the same fleet.

    There are as many households as meters of the most common type; each other type's
    meters go to households drawn at random, so a household has one to three meters.
    ``shares`` says which meters report a register (:func:`~simulator.registers.assign_reports`),
    ``constant_load_share`` which electricity meters are constant loads
    (:func:`~simulator.load.assign_constant_loads`; they report usage only).
    """
    counts = meter_counts(count, mix)
    fake = Faker("en_GB")
    fake.seed_instance(seed)
    rng = np.random.default_rng(seed)
    place = fake.local_latlng(country_code="GB")
    if place is None:  # Faker's answer for a country it has no places of
        raise RuntimeError("Faker has no places in GB to put the fleet in")
    latitude, longitude, city, *_ = place
    districts = [fake.unique.city() for _ in range(DISTRICT_COUNT)]
    district_centres = np.column_stack(
        (float(latitude) + rng.normal(0, 0.02, DISTRICT_COUNT),
         float(longitude) + rng.normal(0, 0.03, DISTRICT_COUNT))
    )  # fmt: skip

    households = max(counts.values())
    district_of = rng.integers(0, DISTRICT_COUNT, households)
    positions = district_centres[district_of] + rng.normal(0, 0.004, (households, 2))
    scales = np.clip(rng.lognormal(0.0, SCALE_SIGMA, households), *SCALE_LIMITS)
    installed = rng.integers(0, INSTALL_WINDOW_DAYS, households)
    # Faker writes some street addresses on two lines; the registry keeps one.
    people = [
        (fake.name(), ", ".join(fake.street_address().splitlines()), fake.postcode())
        for _ in range(households)
    ]

    meters: list[Meter] = []
    for meter_type in TYPE_ORDER:
        members = np.sort(rng.choice(households, counts[meter_type], replace=False))
        prefix = METER_SPECS[meter_type].id_prefix
        for number, house in enumerate(members.tolist(), start=1):
            owner, street, postcode = people[house]
            meters.append(
                Meter(
                    device_id=f"{prefix}{number:06d}",
                    meter_type=meter_type,
                    household_id=f"hh{house + 1:06d}",
                    owner=owner,
                    address=f"{street}, {postcode}",
                    district=districts[district_of[house]],
                    city=city,
                    installed_on=INSTALLED_FROM + timedelta(days=int(installed[house])),
                    latitude=round(float(positions[house, 0]), 6),
                    longitude=round(float(positions[house, 1]), 6),
                    scale=round(float(scales[house]), 3),
                )
            )
    if shares.active:
        reports, near = assign_reports([m.meter_type for m in meters], shares, seed)
        meters = [
            replace(
                meter,
                reports=report,
                register_digits=None if report == USAGE else DIGITS[meter.meter_type],
                near_rollover=close,
            )
            for meter, report, close in zip(meters, reports, near, strict=True)
        ]
    if constant_load_share:
        loads = assign_constant_loads([m.meter_type for m in meters], constant_load_share, seed)
        meters = [
            meter
            if load is None
            else replace(
                meter, constant=load, reports=USAGE, register_digits=None, near_rollover=False
            )
            for meter, load in zip(meters, loads, strict=True)
        ]
    return Fleet(meters)


_METER_FIELDS = frozenset(Meter.__dataclass_fields__)


def write_registry(fleet: Fleet, registry_dir: str, interval_seconds: float | None = None) -> str:
    """Write ``<registry_dir>/meters.parquet`` through :func:`meterflow.core.registry.write`
    (temp file, then rename: no half-written file), validated like an imported registry.

    ``registry_dir`` is :attr:`meterflow.core.config.Settings.registry_path`;
    ``interval_seconds`` is the fleet's reading interval (stored per meter, null if None);
    one the registry cannot hold (not whole seconds dividing a day) is a ConfigError.
    Returns the path.
    """
    interval = None if interval_seconds is None else int(interval_seconds)
    rows = [
        {
            **asdict(m),
            "meter_type": str(m.meter_type),
            "interval_seconds": interval,
            registry.CONSTANT_LOAD: m.constant is not None,
        }
        for m in fleet.meters
    ]
    table, problems = registry.validate(pa.Table.from_pylist(rows, schema=REGISTRY_SCHEMA))
    if problems:
        raise ConfigError(
            f"the simulated fleet's registry is refused ({len(problems)} rows), the first: "
            f"{problems[0]}; a reading interval must be whole seconds that divide a day"
        )
    return registry.write(table, registry_dir)


def read_registry(registry_dir: str) -> Fleet:
    """The fleet :func:`write_registry` wrote (for a restarted simulator or a loader); what
    the registry does not hold (what a meter reports, its constant load) is the default."""
    table = registry.read(registry_dir)
    # Registries written before a column existed lack it; columns Meter lacks are skipped.
    table = table.select([name for name in table.column_names if name in _METER_FIELDS])
    return Fleet(
        [Meter(**{**row, "meter_type": MeterType(row["meter_type"])}) for row in table.to_pylist()]
    )
