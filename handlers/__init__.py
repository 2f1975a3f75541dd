"""The example application: a payments service built on dedup-consumer."""
