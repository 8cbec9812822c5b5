"""``python -m simulator``: simulate a fleet or replay a recording into Kafka.

The simulator's own command is ``meterflow simulate|replay`` under another name: the same
parser, arguments and handlers (:func:`meterflow.cli.main`), so the two cannot drift.
"""

from __future__ import annotations

import sys

from meterflow.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m simulator", commands=("simulate", "replay")))
