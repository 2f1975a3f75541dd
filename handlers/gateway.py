"""A stand-in payment gateway that honours idempotency keys, as card processors do.

It lives in the same database so the demo needs no extra service; the call is made with
``ctx.outside_key`` exactly as a real HTTP call to a processor would be.
"""

from __future__ import annotations

import hashlib

from consumer import Database


async def charge(db: Database, idempotency_key: str, account: str, cents: int) -> str:
    """Charge once per idempotency key; a repeated key returns the first reference."""
    reference = "gw_" + hashlib.blake2b(idempotency_key.encode(), digest_size=6).hexdigest()
    row = await db.fetchval(
        """
        INSERT INTO gateway_charges (idempotency_key, account, cents, reference)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (idempotency_key) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
        RETURNING reference
        """,
        idempotency_key,
        account,
        cents,
        reference,
    )
    return str(row)
