"""The chaos campaign: an exactly-once audit of the payments app under injected faults.

``python -m scripts.chaos`` (``make chaos``). Modules, in the order a run uses them:

* ``services``  the campaign's own Kafka/Redis/PostgreSQL instance (never the shared one);
* ``workload``  seeded records and the ground truth they imply;
* ``producer``  topics, and production in ordered bursts;
* ``fleet``     the processes under test (supervisors, relays, one-off workers);
* ``faults``    the fault schedule and the injector;
* ``campaign``  one run from a fresh instance to the evidence;
* ``collect``   reading topics and tables; ``checker`` judging them against the truth;
* ``report``    tables and the final JSON line; ``downstream`` the second app under test.
"""
