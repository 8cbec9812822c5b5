"""meterflow: smart-meter data platform (shared core: contract, config, I/O, CLI)."""

__version__ = "0.2.0"
