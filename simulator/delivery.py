"""How healthy meters' readings reach the head-end: clocks that jitter, radios that are late.

Both are off by default; each draws from a generator of its own, so turning one on leaves
the rest of a seeded stream as it was.

* **Clock jitter** (``SimulationConfig.clock_jitter_s``): a meter's clock is off by some
  seconds (up to a minute, say), differently at every reading, so each reading's timestamp
  is its interval's end moved by a whole number of seconds drawn uniformly from
  ``[-jitter, +jitter]``. The values stay the interval's. Below half an interval, a
  meter's timestamps stay in order.
* **Late radios** (``SimulationConfig.late_share`` of the meters, chosen once per run): a
  late meter's radio delivers every reading the same whole number of intervals late
  (drawn per meter from one interval to ``late_max_s``), in order. Its readings keep their
  own timestamps and go out that many steps after the other meters' readings of the same
  time. A backfill sends what is still held when it ends, so nothing is lost; a run that
  is stopped leaves it unsent, and uncounted.
"""

from __future__ import annotations

import numpy as np

from simulator.formats import Step


class ClockJitter:
    """Per step, how many whole seconds each meter's clock is off."""

    def __init__(self, jitter_s: float, meters: int, rng: np.random.Generator) -> None:
        self.most = int(jitter_s)
        self.meters, self.rng = meters, rng

    def offsets(self) -> np.ndarray:
        """One step's shifts, in ``[-most, +most]`` seconds, one per meter."""
        offsets: np.ndarray = self.rng.integers(-self.most, self.most + 1, self.meters)
        return offsets


class LateRadios:
    """Which meters deliver late and by how many steps, and the readings they still hold."""

    def __init__(
        self,
        share: float,
        late_max_s: float,
        interval_s: float,
        meters: int,
        rng: np.random.Generator,
    ) -> None:
        late = rng.random(meters) < share
        most = max(1, int(late_max_s // interval_s))
        #: Steps each meter's readings are held back (0: on time).
        self.delays = np.where(late, rng.integers(1, most + 1, meters), 0)
        self.on_time = np.flatnonzero(self.delays == 0).tolist()
        self.late = {
            int(delay): np.flatnonzero(self.delays == delay).tolist()
            for delay in np.unique(self.delays[late])
        }
        self.step = 0  # steps seen so far
        self.held: dict[int, list[Step]] = {}  # by the step they go out with

    def due(self, step: Step) -> list[Step]:
        """What goes out with ``step``: its on-time part (with its consumption truth),
        then the late parts held for it, oldest first. Its late parts are held."""
        for delay, positions in self.late.items():
            self.held.setdefault(self.step + delay, []).append(step.part(positions))
        out = [step.part(self.on_time, with_truth=True), *self.held.pop(self.step, [])]
        self.step += 1
        return out

    def release(self) -> list[Step]:
        """Everything still held, in the order it would have gone out; none is kept."""
        out = [part for due in sorted(self.held) for part in self.held[due]]
        self.held.clear()
        return out
