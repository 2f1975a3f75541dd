from consumer.db.offsets import *  # noqa: F403  interim re-export for worker.py (the lead removes it)
