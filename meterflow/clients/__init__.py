"""Kafka and MongoDB clients: connections, topics, retries (imports only core)."""
