import asyncio

from fastapi import APIRouter
from sqlalchemy import text

from chatbot.deps import SessionmakerDep
from chatbot.errors import DatabaseUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


READY_SECONDS = 2.0
"""/readyz answers within about this long either way: a load balancer's probe must not hang."""


@router.get("/readyz", responses={503: {"description": "The database is not reachable"}})
async def readyz(sessionmaker: SessionmakerDep) -> dict[str, str]:
    async def ask() -> None:
        async with sessionmaker() as session:
            await session.execute(text("SELECT 1"))

    # The answer does not wait for a silent connection to be given up on: that goes on
    # behind it (bounded by the statement timeout).
    asking = asyncio.ensure_future(ask())
    asking.add_done_callback(lambda task: task.cancelled() or task.exception())
    done, _ = await asyncio.wait({asking}, timeout=READY_SECONDS)
    if not done:
        asking.cancel()
        raise DatabaseUnavailable(headers={"Retry-After": "1"})
    if asking.exception() is not None:
        raise DatabaseUnavailable(headers={"Retry-After": "1"}) from None
    return {"status": "ready"}
