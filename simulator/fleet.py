"""A fleet of meters with believable metadata (Faker) and the registry file it is known by."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from faker import Faker

from meterflow.contract import METER_SPECS, TYPE_ORDER, MeterType

DISTRICT_KINDS = ("Park", "Heights", "Green", "Vale", "Hill", "Fields", "Cross", "Gate")
DISTRICT_COUNT = len(DISTRICT_KINDS)
#: Share of households that also have a water / a gas meter (each has electricity).
WATER_SHARE = 0.6
GAS_SHARE = 0.4


@dataclass(frozen=True)
class Meter:
    device_id: str
    meter_type: str
    household_id: str
    owner: str
    address: str
    district: str
    city: str
    installed_on: date
    latitude: float
    longitude: float
    scale: float  # the household's consumption relative to an average one


@dataclass
class Fleet:
    """Meters plus column arrays the load model uses for a whole time step at once."""

    meters: list[Meter]

    def __post_init__(self) -> None:
        self.device_ids = [m.device_id for m in self.meters]
        self.type_index = np.array(
            [TYPE_ORDER.index(MeterType(m.meter_type)) for m in self.meters], dtype=np.int8
        )
        self.scale = np.array([m.scale for m in self.meters])

    def __len__(self) -> int:
        return len(self.meters)


def build_fleet(count: int, seed: int | None = None) -> Fleet:
    """``count`` meters in households of one to three meters, reproducible with ``seed``."""
    if count < 1:
        raise ValueError("a fleet needs at least one meter")
    fake = Faker("en_GB")
    fake.seed_instance(seed)
    rng = np.random.default_rng(seed)
    city = fake.city()
    districts = [f"{fake.unique.last_name()} {kind}" for kind in DISTRICT_KINDS]
    centre = (51.0 + rng.random(), -2.0 + rng.random())
    numbers = dict.fromkeys(MeterType, 0)
    meters: list[Meter] = []
    household = 0
    while len(meters) < count:
        household += 1
        types = [MeterType.ELECTRICITY]
        if rng.random() < WATER_SHARE:
            types.append(MeterType.WATER)
        if rng.random() < GAS_SHARE:
            types.append(MeterType.GAS)
        owner, address = fake.name(), fake.street_address()
        district = districts[int(rng.integers(DISTRICT_COUNT))]
        installed = date(2015, 1, 1) + timedelta(days=int(rng.integers(0, 3650)))
        lat, lon = centre[0] + rng.normal(0, 0.03), centre[1] + rng.normal(0, 0.05)
        scale = float(np.clip(rng.lognormal(0.0, 0.35), 0.3, 3.0))
        for meter_type in types[: count - len(meters)]:
            numbers[meter_type] += 1
            meters.append(
                Meter(
                    device_id=f"{METER_SPECS[meter_type].id_prefix}{numbers[meter_type]:06d}",
                    meter_type=str(meter_type),
                    household_id=f"hh{household:06d}",
                    owner=owner,
                    address=address,
                    district=district,
                    city=city,
                    installed_on=installed,
                    latitude=round(float(lat), 6),
                    longitude=round(float(lon), 6),
                    scale=round(scale, 3),
                )
            )
    return Fleet(meters)


def registry_file(lake_path: str) -> Path:
    return Path(lake_path) / "registry" / "meters.parquet"


def write_registry(fleet: Fleet, lake_path: str) -> Path:
    """Write the registry atomically (temp file, then rename) so readers never see half."""
    target = registry_file(lake_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([asdict(m) for m in fleet.meters])
    temporary = target.with_suffix(f".tmp-{os.getpid()}")
    pq.write_table(table, temporary)
    temporary.replace(target)
    return target


def read_registry(lake_path: str) -> pa.Table:
    return pq.read_table(registry_file(lake_path))
