"""A bus replica in a process of its own, for the tests that kill one mid-stream.

``python -m tests.reaction_worker SETTINGS_JSON`` consumes until killed; it prints
``ready`` once bound to the durable consumer.  :func:`reaction_consumer` builds the same
replica inside a test's process.
"""

from __future__ import annotations

import asyncio
import sys

from tipgraph.feedback import FeedbackService
from tipgraph.local import LocalStages
from tipgraph.metrics import Metrics
from tipgraph.reactions import ReactionConsumer
from tipgraph.settings import TipgraphSettings
from tipgraph.shadows import ShadowRunner
from tipgraph.store import DecisionStore
from tipgraph.wiring import decision_log


def reaction_consumer(
    settings: TipgraphSettings, store: DecisionStore
) -> tuple[ReactionConsumer, LocalStages]:
    """A bus replica on in-process stages: the feedback path of the reactions
    deployment, learning into this process's policy."""
    metrics = Metrics()
    stages = LocalStages(
        settings, store, decision_log(store, settings.store, owner="reactions"), metrics
    )
    feedback = FeedbackService(
        settings, stages, store, None, ShadowRunner(stages, metrics), metrics
    )
    return ReactionConsumer(settings.bus, feedback, metrics), stages


async def main(settings_json: str) -> None:
    from tipgraph.store import open_store

    settings = TipgraphSettings.model_validate_json(settings_json)
    store = open_store(settings.store)
    consumer, _ = reaction_consumer(settings, store)
    await consumer.connect()
    consumer.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
