"""Smart-meter traffic for meterflow: a simulated fleet, injected faults, replayed recordings.

``fleet`` (meters and their registry), ``load`` (consumption shapes), ``faults`` (what to
corrupt and how), ``episodes`` (stateful faults and their ground truth), ``formats`` (a
step's messages), ``generator`` (:func:`~simulator.generator.simulate`), ``replay`` (UCI
and AMPds2 files), ``false_alarms`` (the stateful rules over a replayed recording),
``sink`` (where messages go), ``cli`` (``meterflow simulate``/``replay``, also
``python -m simulator``) and ``background`` (``meterflow run``'s fleet).
"""
