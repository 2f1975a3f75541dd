"""``make orders-demo``: the HTTP + outbox example (handlers/orders/) under a relay crash,
audited: every order's event applied exactly once. Its process and audit helpers are shared
with tests/integration/test_orders_http.py."""
