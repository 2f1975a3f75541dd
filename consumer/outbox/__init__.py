"""The outbox: rows written in the handler's transaction, and the relay that publishes them."""
