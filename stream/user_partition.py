"""What the user stage keeps per ``events`` partition, so that a rebalance moves it whole.

A user's events all arrive on one partition (the key is ``user_id``), so everything about a user
belongs to that partition: their model state (exported from the engine with
:func:`models.user_state.export_users` at checkpoint time), the event ids seen (dedupe), the push
history (caps, repeats), the experiment attribution and the partition's lateness watermark. Each
partition's state is one snapshot record with the offset it covers; a worker that is assigned the
partition (after a restart, or from another worker) imports it and resumes from that offset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from models.dedupe import Deduplicator
from models.experiments import ExperimentMetrics
from models.push_policy import PushConfig, PushPolicy
from stream.experiments_store import metrics_config
from stream.settings import Settings


@dataclass
class UserPartition:
    partition: int
    dedupe: Deduplicator
    push: PushPolicy
    experiments: ExperimentMetrics
    users: set[str] = field(default_factory=set)
    watermark: float = float("-inf")

    def touch(self, user_id: str) -> None:
        """A user of this partition learned something: their state belongs to the next snapshot."""
        self.users.add(user_id)

    @classmethod
    def new(cls, partition: int, settings: Settings, push: PushConfig) -> UserPartition:
        return cls(partition, Deduplicator(settings.dedupe_window_s, settings.dedupe_max_ids), PushPolicy(push),
                   ExperimentMetrics(metrics_config(settings, shard=partition)))

    def forget_user(self, user_id: str) -> None:
        self.users.discard(user_id)
        self.push.forget_user(user_id)
        self.experiments.forget_user(user_id)
