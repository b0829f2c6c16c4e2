"""Every Kafka and Redis connection is made here, from the settings (security included).

>>> from stream.settings import Settings
>>> kafka_options(Settings(kafka_bootstrap="127.0.0.1:19092"))
{'bootstrap_servers': '127.0.0.1:19092'}
"""
from __future__ import annotations

import redis
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from stream.settings import Settings


def kafka_options(settings: Settings) -> dict:
    """Connection keyword arguments shared by every aiokafka client."""
    return {"bootstrap_servers": settings.kafka_bootstrap}


def producer(settings: Settings, **kwargs) -> AIOKafkaProducer:
    return AIOKafkaProducer(**kafka_options(settings), **kwargs)


def consumer(settings: Settings, *topics: str, **kwargs) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(*topics, **kafka_options(settings), **kwargs)


def admin(settings: Settings, **kwargs) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**kafka_options(settings), **kwargs)


def redis_async(settings: Settings, **kwargs) -> aioredis.Redis:
    return aioredis.Redis.from_url(settings.redis_url, **kwargs)


def redis_sync(settings: Settings, **kwargs) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, **kwargs)
