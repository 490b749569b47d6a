"""What the routes depend on, injected with `Annotated[..., Depends(...)]`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.connections import Connections
from shared.contracts import Identifier


def get_connections(request: Request) -> Connections:
    connections: Connections = request.app.state.connections
    return connections


ConnectionsDep = Annotated[Connections, Depends(get_connections)]


async def get_session(connections: ConnectionsDep) -> AsyncIterator[AsyncSession]:
    async with connections.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]

OrderIdPath = Annotated[
    Identifier, Path(description="The order id: 1 to 64 letters, digits, '.', '_' or '-'.")
]
