"""Identity of a message (namespace, key, payload hash), Redis leases and the PostgreSQL inbox."""
