"""Airflow pieces shared by meterflow's DAGs: a hook onto the project's settings and
MongoDB, the sensor that waits for a complete lake partition, and the Kafka trigger
filter of the incident DAG. Airflow puts ``plugins/`` on ``sys.path``; so does pytest.
"""
