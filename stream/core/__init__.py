"""The stream's pure core: each stage's logic with no Kafka or Redis client (records, state and event time
in; recommendations, pushes, co-occurrence updates, dead letters and counters out). The worker and the item
stage in :mod:`stream` are the I/O shells around it."""
