"""What runs around the stream, never inside a worker: the command line, the local servers, evaluation,
benchmarks, the data loaders and replays, the red team, state migration and the deployment helpers."""
