from fastapi import APIRouter
from sqlalchemy import text

from chatbot.deps import SessionmakerDep
from chatbot.errors import DatabaseUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The database is not reachable"}})
async def readyz(sessionmaker: SessionmakerDep) -> dict[str, str]:
    try:
        async with sessionmaker() as session:
            await session.execute(text("SELECT 1"))
    except Exception:
        raise DatabaseUnavailable() from None
    return {"status": "ready"}
