"""Local stand-ins for `make run` and tests: broker, MongoDB, Airflow standalone."""
