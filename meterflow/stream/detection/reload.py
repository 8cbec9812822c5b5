"""Following a re-imported registry while the stream runs.

``meterflow registry import`` (or the simulator) replaces ``meters.parquet`` whole, by a
rename, so the file's stamp (:func:`meterflow.core.registry.stamp`) changes. The
supervisor asks :meth:`RegistryWatcher.reload` once per second of its wait loop: one stat,
and the file is read only when it changed. New profiles restart the detection query alone
(its state is in its checkpoint, so it carries over); a registry the detector cannot use
keeps the old ones, with one warning, rather than stopping a running stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from meterflow.core import lake, registry
from meterflow.core.errors import ConfigError
from meterflow.core.logs import get_logger
from meterflow.core.thresholds import DetectionRules
from meterflow.stream.detection.profiles import MeterProfile, load_profiles

log = get_logger(__name__)


@dataclass
class RegistryWatcher:
    """The registry's stamp (:func:`meterflow.core.registry.stamp`) as last read."""

    path: str
    rules: DetectionRules
    stamp: tuple[int, ...] | None

    @classmethod
    def start(
        cls, path: str, rules: DetectionRules
    ) -> tuple[RegistryWatcher, dict[str, MeterProfile]]:
        """A watcher and the profiles as they are now (a bad registry raises, as at any
        start). The stamp is taken first: a write while reading shows at the next check."""
        watcher = cls(path, rules, registry.stamp(path))
        return watcher, load_profiles(path, rules)

    def reload(self) -> dict[str, MeterProfile] | None:
        """The new profiles if the registry changed since the last look and loads; None if
        it did not change, or cannot be used (then the old profiles stay, said once)."""
        stamp = registry.stamp(self.path)
        if stamp == self.stamp:
            return None
        self.stamp = stamp  # a bad file is said once; its fix changes the stamp again
        try:
            profiles = load_profiles(self.path, self.rules)
        except (ConfigError, OSError, pa.ArrowException) as exc:
            log.warning(
                "detect=profiles_kept registry=%s reason=%s",
                lake.registry_parquet(self.path),
                " ".join(str(exc).split()),
            )
            return None
        log.info(
            "detect=profiles_reloaded registry=%s meters=%d",
            lake.registry_parquet(self.path),
            len(profiles),
        )
        return profiles
