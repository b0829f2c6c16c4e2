"""What the user stage keeps per ``events`` partition, so that a rebalance moves it whole.

A user's events all arrive on one partition (the key is ``user_id``), so everything about a user
belongs to that partition: their model state (exported from the engine with
:func:`infogap.models.user_state.export_users` at checkpoint time), the event ids seen (dedupe), the push
history (caps, repeats), the experiment attribution, the control group's cohort records and the partition's
lateness watermark. Each
partition's state is one snapshot record with the offset it covers; a worker that is assigned the
partition (after a restart, or from another worker) imports it and resumes from that offset.

**Eviction** (:meth:`UserPartition.evict`): users without an event for ``user_idle_evict_s`` of event
time, and past ``max_users_per_partition`` the least recent, leave the worker's memory (engine rows,
segment membership, this partition's set, push state whose windows have passed), hence also the next
snapshots. It is not an erasure: their Redis keys stay until their TTL, and one who comes back starts
fresh.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from infogap.models.dedupe import Deduplicator
from infogap.models.experiments import ExperimentMetrics
from infogap.models.push_policy import PushConfig, PushPolicy
from infogap.models.retention import Cohorts
from infogap.models.state_fields import StateError, check, encode_float
from infogap.stream.experiments_store import metrics_config, retention_config
from infogap.stream.settings import Settings


@dataclass
class UserPartition:
    partition: int
    dedupe: Deduplicator
    push: PushPolicy
    experiments: ExperimentMetrics
    users: set[str] = field(default_factory=set)
    watermark: float = float("-inf")
    #: the control group's cohort records (:mod:`infogap.models.retention`); kept whatever the eviction of users
    retention: Cohorts = field(default_factory=Cohorts)

    def touch(self, user_id: str) -> None:
        """A user of this partition learned something: their state belongs to the next snapshot."""
        self.users.add(user_id)

    @classmethod
    def new(cls, partition: int, settings: Settings, push: PushConfig) -> UserPartition:
        return cls(partition, Deduplicator(settings.dedupe_window_s, settings.dedupe_max_ids), PushPolicy(push),
                   ExperimentMetrics(metrics_config(settings, shard=partition)),
                   retention=Cohorts(retention_config(settings, shard=partition)))

    def to_state(self) -> dict:
        """The partition's dedupe window, push history, experiment attribution, cohort records, users and watermark
        as a plain tree (:mod:`infogap.models.state_fields`); the model state of its users goes beside it."""
        return {"dedupe": self.dedupe.to_state(), "push": self.push.to_state(),
                "experiments": self.experiments.to_state(), "retention": self.retention.to_state(),
                "users": sorted(self.users), "watermark": encode_float(self.watermark)}

    def restore_state(self, state, arrays=(), where: str = "user partition") -> None:
        """Take :meth:`to_state`'s tree into this partition (made from the current settings). A snapshot written
        before the cohorts existed has no ``retention``: they start empty."""
        f = check(state, {"dedupe": dict, "push": dict, "experiments": dict, "users": list, "watermark": float},
                  where, arrays)
        if not all(type(u) is str for u in f["users"]):
            raise StateError(f"{where}: 'users' must be a list of user ids")
        self.dedupe.restore_state(f["dedupe"], arrays, f"{where}: dedupe")
        self.push.restore_state(f["push"], f"{where}: push")
        self.experiments.restore_state(f["experiments"], arrays, f"{where}: experiments")
        if isinstance(state, dict) and "retention" in state:
            self.retention.restore_state(state["retention"], arrays, f"{where}: retention")
        self.users, self.watermark = set(f["users"]), f["watermark"]

    def __setstate__(self, state: dict) -> None:
        """A partition pickled before the cohorts existed (read by ``infogap state migrate`` only) has none."""
        self.__dict__.update(state)
        if "retention" not in state:
            self.retention = Cohorts()

    def forget_user(self, user_id: str) -> None:
        self.users.discard(user_id)
        self.push.forget_user(user_id)
        self.experiments.forget_user(user_id)
        self.retention.forget_user(user_id)

    #: eviction bookkeeping, not state (a restored partition starts them afresh): the event time of the last
    #: sweep for idle users and the events since
    _swept_at = float("-inf")
    _since_sweep = 0

    def evict(self, engine, newest: float | None, n_events: int, settings: Settings) -> list[str]:
        """After a batch of ``n_events`` records: evict this partition's users idle at event time ``newest``
        (the partition's newest event; None: unknown) and the least recent past the cap, down to 90 % of it.
        Returns their ids. A sweep reads every user's last event time (~0.5 us a user), so it runs only
        when the partition is over the cap (then once per a tenth of the cap in new users), or for idle users
        after ``user_evict_every_s`` of event time and as many events as it holds users: amortised O(1)
        per event.

        Experiment attribution and the cohorts need nothing here (they keep users only within their own windows:
        a cohort record stays whether its user is evicted or not)."""
        cap, idle_s = settings.max_users_per_partition, settings.user_idle_evict_s
        self._since_sweep += n_events
        n = len(self.users)
        over = 0 < cap < n
        due = (idle_s > 0 and newest is not None and newest >= self._swept_at + settings.user_evict_every_s
               and self._since_sweep >= n)
        if not over and not due:
            return []
        now = newest if newest is not None else float("-inf")
        if newest is not None:
            self._swept_at = newest
        self._since_sweep = 0
        gone = engine.stale_users(self.users, now, idle_s if idle_s > 0 else float("inf"),
                                  cap - cap // 10 if over else None)
        engine.evict_users(gone)
        for user_id in gone:
            self.users.discard(user_id)
            self.push.evict_user(user_id, now)
        return gone
