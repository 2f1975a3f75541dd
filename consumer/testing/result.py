"""What ``TestApp.send`` returns: the outcome of one record, and what the worker did meanwhile.

Read-only views over the runtime's own :class:`~consumer.runtime.outcomes.Handled` records;
nothing here decides an outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from consumer.message import Message
from consumer.runtime.outcomes import Handled, Outcome


class HarnessError(RuntimeError):
    """The harness cannot answer: nothing to redeliver, a message that never settles, ..."""


@dataclass
class SendResult:
    """What became of one sent record, and everything the worker did meanwhile."""

    message: Message
    # Every record the worker finished while handling this send (redeliveries included).
    handled: list[Handled] = field(default_factory=list)
    # Every message the relay published meanwhile: handler publishes, dead letters,
    # conflicts and replies, in commit order.
    published: list[Message] = field(default_factory=list)
    # How many times a handler ran: a transient failure or a crash before the commit counts.
    handler_calls: int = 0
    # Back-offs the worker would have waited before each retry (the harness does not wait).
    retry_delays_s: list[float] = field(default_factory=list)
    # The fault point where the worker died, if an armed crash fired.
    crashed: str | None = None

    @property
    def handling(self) -> Handled:
        """The runtime's record of this message.

        A record read again once the stored position is past it comes back SKIPPED; that
        is a re-read, not what became of it, so an earlier outcome wins over SKIPPED.
        """
        pos = (self.message.topic, self.message.partition, self.message.offset)
        mine = [
            h
            for h in self.handled
            if (h.message.topic, h.message.partition, h.message.offset) == pos
        ]
        if not mine:
            raise HarnessError(f"no outcome was recorded for {self.message.source}")
        decided = [h for h in mine if h.outcome is not Outcome.SKIPPED]
        return (decided or mine)[-1]

    @property
    def outcome(self) -> Outcome:
        return self.handling.outcome

    @property
    def result(self) -> Any:
        """The handler's result as stored (JSON data); for a duplicate, the stored result if
        PostgreSQL answered, None if the Redis done marker did."""
        return self.handling.result

    @property
    def reason(self) -> str:
        """Why: the Reject reason, the invalid-message reason, or for a duplicate the status
        it duplicates ("done" or "rejected")."""
        return self.handling.reason
