"""What bench, chaos, demo and the multi-process tests share, once each.

* ``processes`` starting ``python -m ...`` processes with their own log, finding a
  supervisor's workers, signalling and reaping only what was started;
* ``topics``    creating topics, reading them back from the beginning;
* ``truth``     the ground-truth file a workload writes and an audit reads (JSON lines);
* ``audit``     the exactly-once audit of a ledger against the payments expected.

Each script keeps its own report; nothing here prints.
"""
