"""The pure model core of infogap: no I/O, no clock reads, time comes from the events.

>>> from infogap.models import Engine, EngineConfig
>>> Engine(EngineConfig(top_n=5)).recommend("nobody")
[]
"""
from infogap.models.engine import DEFAULT_EVENT_WEIGHTS, Engine, EngineConfig, warm_up
from infogap.models.ranker import Neighbour, Recommendation

__all__ = ["DEFAULT_EVENT_WEIGHTS", "Engine", "EngineConfig", "Neighbour", "Recommendation", "warm_up"]
