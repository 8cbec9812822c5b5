"""The bottom layer: the data contract, settings, the lake and its ledger, errors, logs."""
