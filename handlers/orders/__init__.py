"""The HTTP + outbox example: a web endpoint saves an order and publishes ``order.created`` in
one transaction (``http.py``, consumer.Outbox); the relay publishes it; a worker of this
framework applies it exactly once (``ledger.py``). docs/outbox.md, section 9.
"""
