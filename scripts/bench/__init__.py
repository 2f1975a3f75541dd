"""``make bench``: the framework side by side with its hand-written peers, a raw consumer and
the naive way.

One run, one broker, one pre-produced topic, each leg from the topic's start in its own
consumer group, each leg checked for exactly-once. Modules: dataset (records and topics),
store (the benchmark database and the checks), harness + worker + baselines + benchapp (the
worker processes), handwritten + competent + limit (the hand-written peers' processes),
legs (running one leg), runner (a whole run), peers (the paths and the ratios between
them), report (outputs), sysstat (services' CPU, load). Method and results: docs/benchmarks.md.
"""
