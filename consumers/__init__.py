"""Kafka-facing runtime (installed as ``streamstars.consumers``)."""
