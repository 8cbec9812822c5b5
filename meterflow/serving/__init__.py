"""The serving layer: MongoDB indexes, the abnormal-event sink, daily loads and checks."""
