"""PostgreSQL plumbing: the pool, the batch transaction, migrations."""
