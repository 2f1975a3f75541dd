"""Type aliases shared by the layers, defined once.

``Ident`` is what a record is stored under: ``(namespace, key)`` (consumer/keys.py).
``Query`` is a parameterised statement as the SQL modules build it: ``(text, args)``, testable
as a string, executed by whoever holds the connection (Watermill's query builders).
"""

from __future__ import annotations

from typing import Any, Literal

Ident = tuple[str, str]
Query = tuple[str, list[Any]]

# The definite states an inbox record can be in; ``pending`` only inside its transaction.
RecordStatus = Literal["pending", "done", "rejected"]
