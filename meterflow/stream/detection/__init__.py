"""The stateful stage: STUCK, SPIKE, LEAK and NO_DATA per meter (docs/architecture.md,
"Stateful detection").

- :mod:`~meterflow.stream.detection.rules`: the rules, plain Python over one meter's state;
- :mod:`~meterflow.stream.detection.profiles`: each meter's interval and thresholds from
  the fleet registry;
- :mod:`~meterflow.stream.detection.processor`: the rules in Spark, a
  ``transformWithStateInPandas`` processor over buckets of meters;
- :mod:`~meterflow.stream.detection.query`: the detector's query beside the lake query,
  its checkpoint, and the publisher of its episode events.
"""
