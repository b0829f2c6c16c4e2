"""The stream floor of infogap: Kafka topology, Redis serving and the local servers.

It stands on :mod:`models` (pure online models) and never the other way round.
"""
