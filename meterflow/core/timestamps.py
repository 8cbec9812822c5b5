"""Time in the contract: epoch microseconds inside, ISO-8601 (UTC, ``Z``) on the wire; days
cut at local midnight."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SECONDS_PER_DAY = 86_400
US_PER_DAY = SECONDS_PER_DAY * 1_000_000


def as_date(day: date | str) -> date:
    """A day given as a date or as ``YYYY-MM-DD`` (from the CLI, Airflow's ``ds``)."""
    return date.fromisoformat(day) if isinstance(day, str) else day


def parse_timestamp_us(value: str) -> int:
    """ISO-8601 to epoch microseconds; a timestamp without a zone is UTC. Raises ValueError."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - _EPOCH
    return (delta.days * SECONDS_PER_DAY + delta.seconds) * 1_000_000 + delta.microseconds


def format_timestamp_us(micros: int) -> str:
    """Epoch microseconds to the contract's ISO-8601 form (UTC, ``Z`` suffix)."""
    seconds, rest = divmod(micros, 1_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{rest:06d}Z" if rest else f"{text}Z"


# --- local days -----------------------------------------------------------------------------
# Days are cut at local midnight in METERFLOW_TIMEZONE (docs/architecture.md, "Days"), and a
# reading's timestamp ends the interval it measures: a reading stamped at midnight closes
# the day before. Each function takes the zone's IANA name.

UTC_NAME = "UTC"
_US_PER_HOUR = 3_600_000_000


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; a ValueError ("is not ...", to follow the name) otherwise."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            "is not an IANA time zone name (for example UTC, Europe/Paris, America/New_York)"
        ) from None


def day_bounds(day: date, zone_name: str) -> tuple[datetime, datetime]:
    """The instants (UTC) of ``day``'s local midnight and the next one in ``zone_name``."""
    local = zone(zone_name)
    start = datetime.combine(day, time(), local)
    end = datetime.combine(day + timedelta(days=1), time(), local)
    return start.astimezone(UTC), end.astimezone(UTC)


def today(zone_name: str) -> date:
    """The local date now in ``zone_name``."""
    return datetime.now(zone(zone_name)).date()


def day_seconds(day: date, zone_name: str) -> int:
    """How long ``day`` is in ``zone_name``: 86,400 s, or an hour less or more on a DST day."""
    start, end = day_bounds(day, zone_name)
    return int((end - start).total_seconds())


def _wall(micros: np.ndarray, zone_name: str) -> np.ndarray:
    """Epoch microseconds as local wall-clock microseconds in ``zone_name``."""
    if zone_name == UTC_NAME:
        return micros
    instants = pa.array(micros, pa.timestamp("us", tz=zone(zone_name).key))
    return np.asarray(pc.local_timestamp(instants).cast(pa.int64()).to_numpy(), dtype=np.int64)


def local_days(micros: np.ndarray, zone_name: str) -> np.ndarray:
    """The local date of each epoch-microsecond instant, as days since 1970-01-01 (int32)."""
    return (_wall(micros, zone_name) // US_PER_DAY).astype(np.int32)


def local_hours(micros: np.ndarray, zone_name: str) -> np.ndarray:
    """The local hour of day (0-23) of each epoch-microsecond instant."""
    return np.asarray(_wall(micros, zone_name) % US_PER_DAY // _US_PER_HOUR, dtype=np.int64)


def reading_days(event_us: np.ndarray, zone_name: str) -> np.ndarray:
    """The day each reading's consumption belongs to: the local day its interval starts in.

    A timestamp ends its interval, so a reading stamped at local midnight belongs to the
    day before (one microsecond earlier is inside the interval it measures).
    """
    return local_days(event_us - 1, zone_name)


class LocalClock:
    """Epoch microseconds to local wall-clock microseconds in one zone, for hour-of-day and
    night rules. The offset is looked up once per UTC hour (zones change it on the hour
    or half hour at most, a few times a year), so a reading costs a dict lookup."""

    def __init__(self, zone_name: str = UTC_NAME) -> None:
        self.zone_name = zone_name
        self._zone = None if zone_name == UTC_NAME else zone(zone_name)
        self._offsets: dict[int, int] = {}

    def __call__(self, micros: int) -> int:
        if self._zone is None:
            return micros
        hour = micros // _US_PER_HOUR
        offset = self._offsets.get(hour)
        if offset is None:
            instant = datetime.fromtimestamp(hour * 3600, UTC).astimezone(self._zone)
            delta = instant.utcoffset() or timedelta()
            offset = self._offsets[hour] = int(delta.total_seconds()) * 1_000_000
        return micros + offset

    def __reduce__(self) -> tuple[type[LocalClock], tuple[str]]:
        return LocalClock, (self.zone_name,)  # pickles as its zone's name, cache left behind
