"""What the fetch loop and the rebalance listener need of a worker: a group member's state.

A Protocol, so that runtime/fetch.py and runtime/rebalance.py depend on this and not on
runtime/worker.py (which builds them): the import graph stays a tree.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.app import App
from consumer.observers import Observer
from consumer.probe import Probe
from consumer.runtime.batch import BatchProcessor
from consumer.runtime.positions import Positions
from consumer.runtime.stats import Stats
from consumer.settings import Settings


class Member(Protocol):
    app: App
    settings: Settings
    consumer: AIOKafkaConsumer | None
    processor: BatchProcessor | None
    lock: asyncio.Lock
    stats: Stats
    retry_tasks: dict[TopicPartition, asyncio.TimerHandle]
    observer: Observer
    probe: Probe

    @property
    def positions(self) -> Positions: ...

    async def seek_to_stored(self, tps: list[TopicPartition]) -> None: ...
