"""The speed layer: classification rules, the tasks of a micro-batch, the query driver."""
