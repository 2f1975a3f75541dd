"""TestApp agrees with the runtime on the payload hash (issue 13 #6): a model sent as is
reaches the handler whole, and a reused key with another secret or excluded value conflicts."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import BaseModel, Field, SecretBytes, SecretStr

from consumer import App, Context, Outcome
from consumer.testing import TestApp

pytestmark = pytest.mark.unit


class Charge(BaseModel):
    id: str
    card: SecretStr
    pin: SecretBytes = SecretBytes(b"")
    iban: str = Field(exclude=True)
    amount: Decimal = Field(default=Decimal(0), alias="amt")


def charge_app() -> tuple[App, list[tuple[str, bytes, str, Decimal]]]:
    app = App("shop")
    seen: list[tuple[str, bytes, str, Decimal]] = []

    @app.handler("charges", schema=Charge, key=lambda p: p.id)
    async def charge(p: Charge, ctx: Context) -> str:
        seen.append((p.card.get_secret_value(), p.pin.get_secret_value(), p.iban, p.amount))
        return "ok"

    return app, seen


@pytest.mark.parametrize("ctype", ["application/msgpack", "application/json"])
async def test_a_model_is_sent_whole(ctype: str) -> None:
    app, seen = charge_app()
    model = Charge(id="1", card="4111", pin=b"12", iban="DE1", amt=Decimal("1.10"))
    async with TestApp(app) as t:
        r = await t.send("charges", model, content_type=ctype)
    assert (r.outcome, seen) == (Outcome.APPLIED, [("4111", b"12", "DE1", Decimal("1.10"))])


async def test_reused_key_with_another_secret_or_excluded_value_conflicts() -> None:
    app, seen = charge_app()
    first = {"id": "1", "card": "4111", "iban": "DE1"}
    async with TestApp(app) as t:
        outcomes = [
            (await t.send("charges", p)).outcome
            for p in (first, first, {**first, "card": "5500"}, {**first, "iban": "FR7"})
        ]
        record = await t.inbox("charges", "1")
    assert outcomes == [Outcome.APPLIED, Outcome.DUPLICATE, Outcome.CONFLICT, Outcome.CONFLICT]
    assert len(seen) == 1
    assert record is not None and record.hash_version == 2
