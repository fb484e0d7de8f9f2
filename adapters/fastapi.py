"""FastAPI conveniences over the Starlette adapter (FastAPI apps are Starlette apps).

::

    from sa_middleware.adapters.fastapi import SAContextDep, SessionAwareMiddleware, policy

    app = FastAPI()
    app.add_middleware(SessionAwareMiddleware, guard=guard)

    @app.post("/payments/{id:int}/approve")
    @policy(exclusive=True, locks=["payment:{id}"])     # under the route decorator, on the function itself
    async def approve(id: int, sa: SAContextDep) -> dict[str, object]:
        ...

``SAContextDep`` is ``Annotated[SAContext, Depends(sa_context)]``: the request's (or websocket's) context.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from sa_middleware.context import SAContext

from .starlette import SessionAwareMiddleware, policy, sa_context

__all__ = ["SAContextDep", "SessionAwareMiddleware", "policy", "sa_context"]

SAContextDep = Annotated[SAContext, Depends(sa_context)]
