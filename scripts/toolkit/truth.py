"""The ground-truth file: what a workload sent and what must become of each record.

One format for every workload (``handlers/loadgen.py`` for the demo, the chaos workload):
JSON lines, the first a header object about the run, then one object per record, in the
order sent. Written before the records are consumed, read by the audit afterwards; nothing
in it comes from the system under test.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Truth:
    """A ground-truth file: the header and the records."""

    meta: dict[str, Any]
    records: list[dict[str, Any]]

    @classmethod
    def read(cls, path: Path) -> Truth:
        with path.open() as f:
            meta = json.loads(f.readline())
            return cls(meta, [json.loads(line) for line in f])

    def write(self, path: Path) -> None:
        write(path, self.meta, self.records)

    def where(self, **match: Any) -> list[dict[str, Any]]:
        """The records whose fields have these values."""
        return [r for r in self.records if all(r[k] == v for k, v in match.items())]

    def source(self, r: dict[str, Any]) -> str:
        """Where a record landed, as the framework's ``x-source`` header names it."""
        return f"{self.meta['topic']}/{r['partition']}/{r['offset']}"


def write(path: Path, meta: dict[str, Any], records: Iterable[dict[str, Any]]) -> None:
    """Write a ground-truth file (its folder is created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        out.write(json.dumps(meta, separators=(",", ":")) + "\n")
        for record in records:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
