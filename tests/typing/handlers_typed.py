"""Checked by mypy in tests/unit/test_handler_typing.py, never imported: the decorator's types."""

from __future__ import annotations

from pydantic import BaseModel

from consumer import App, Context
from consumer.handler import Handler


class Email(BaseModel):
    to: str


app = App("typing")


@app.handler("emails", schema=Email, key="record")
def send(e: Email, ctx: Context) -> dict[str, str]:  # a sync handler, as docs/handlers.md
    return {"to": e.to}


@app.handler("emails.async", schema=Email, key="record")
async def settle(e: Email, ctx: Context) -> int:
    return len(e.to)


sync_ok: Handler[Email, dict[str, str]] = send
async_ok: Handler[Email, int] = settle  # the coroutine's result, not the coroutine


@app.handler("emails.bad", schema=Email, key="record")  # expect-error: payload type
async def wrong(e: int, ctx: Context) -> None:
    return None


# The dependency container (docs/lifespan.md): App(deps=Deps) is an App[Deps]; a handler
# taking Context[Deps] or a bare Context is accepted, one declaring another container is not.
class Deps:
    base_url: str = "https://rates.example"


class OtherDeps:
    token: str = ""


typed = App("typing.deps", deps=Deps)


@typed.on_startup
async def fill(deps: Deps) -> None:
    deps.base_url = "https://rates.internal"


@typed.handler("deps.ok", schema=Email, key="record")
async def uses_deps(e: Email, ctx: Context[Deps]) -> str:
    return ctx.deps.base_url


@typed.handler("deps.bare", schema=Email, key="record")
async def bare_ctx(e: Email, ctx: Context) -> None:
    return None


@typed.handler("deps.bad", schema=Email, key="record")  # expect-error: another container
async def wrong_deps(e: Email, ctx: Context[OtherDeps]) -> str:
    return ctx.deps.token
