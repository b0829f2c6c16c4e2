"""The key layout of the store, in one place for the writers and the readers.

>>> k = RedisKeys("ig:")
>>> k.recs("u42"), k.similar("sku-7"), k.trending(), k.trending(3), k.segment("u42")
('ig:recs:u42', 'ig:similar:sku-7', 'ig:trending', 'ig:trending:seg:3', 'ig:segment:u42')

On Redis Cluster (``cluster=True``) the keys about one user or one item carry it as a hash tag, so that
what is written together lands in one slot and is written in one command:

>>> c = RedisKeys("ig:", cluster=True)
>>> c.recs("u42"), c.decisions("u42"), c.similar("sku-7"), c.neighbour_row("sku-7"), c.trending(3)
('ig:recs:{u42}', 'ig:decisions:{u42}', 'ig:similar:{sku-7}', 'ig:nbrow:{sku-7}', 'ig:trending:seg:3')
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str = "ig:"
    #: keys about one user or item carry it as a hash tag (``{u42}``): Redis Cluster's layout
    cluster: bool = False

    def _entity(self, kind: str, entity: str) -> str:
        return f"{self.prefix}{kind}:{{{entity}}}" if self.cluster else f"{self.prefix}{kind}:{entity}"

    def recs(self, user_id: str) -> str:
        return self._entity("recs", user_id)

    def segment(self, user_id: str) -> str:
        return self._entity("segment", user_id)

    def similar(self, item_id: str) -> str:
        return self._entity("similar", item_id)

    def decisions(self, user_id: str) -> str:
        """A user's push decisions, newest first (a list of JSON entries, capped, with a TTL)."""
        return self._entity("decisions", user_id)

    def neighbour_row(self, item_id: str) -> str:
        """Internal: the item stage's full co-occurrence row, read by the user stages' neighbour caches."""
        return self._entity("nbrow", item_id)

    def rows_published(self, partition: int) -> str:
        """Internal: a token the item stage changes whenever it publishes rows of a ``cooc`` partition."""
        return f"{self.prefix}nbrow-published:{partition}"

    def trending(self, segment: int | str | None = None) -> str:
        return f"{self.prefix}trending" if segment is None else f"{self.prefix}trending:seg:{segment}"

    def segment_model(self) -> str:
        """Internal: the population learner's segment centers and category slots (JSON), read by the
        user stages."""
        return f"{self.prefix}segments:model"

    def momentum(self) -> str:
        """Internal: the population learner's slow-decayed popularity of every item (binary)."""
        return f"{self.prefix}momentum"

    def learned_model(self, name: str) -> str:
        """Internal: a model the population learner publishes whole for the user stages, by name (``sentiment``:
        JSON, :meth:`infogap.models.sentiment.SentimentModel.to_state`)."""
        return f"{self.prefix}model:{name}"

    def generation(self) -> str:
        """Internal: a random token set once per life of Redis's data; gone (or another) means Redis lost
        its data (restarted without persistence, flushed), so the workers write every key again."""
        return f"{self.prefix}generation"

    def experiment(self, experiment: str, variant: str) -> str:
        return f"{self.prefix}exp:{experiment}:{variant}"

    def retention(self, experiment: str) -> str:
        """The control group's cohort figures of an experiment (or of the push campaign, without one): one hash,
        a field per shard, segment, arm and count (:mod:`infogap.stream.experiments_store`). Each command names
        this one key, so Redis Cluster needs no hash tag.

        >>> RedisKeys("ig:").retention("ranker-v2"), RedisKeys("ig:", cluster=True).retention("recs")
        ('ig:ret:ranker-v2', 'ig:ret:recs')
        """
        return f"{self.prefix}ret:{experiment}"

    def privacy(self, partition: int) -> str:
        """The epsilon a ``cooc`` partition's publishes spent on noise, per day (JSON,
        :meth:`infogap.models.privacy.PrivacyLedger.to_state`; docs/privacy.md).

        >>> RedisKeys("ig:").privacy(3)
        'ig:privacy:3'
        """
        return f"{self.prefix}privacy:{partition}"

    def user_keys(self, user_id: str) -> list[str]:
        """Every key that holds data about one user (for erasure)."""
        return [self.recs(user_id), self.segment(user_id), self.decisions(user_id)]

