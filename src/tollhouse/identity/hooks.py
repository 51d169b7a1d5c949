"""Extension points for the host application, called after the change committed."""

from __future__ import annotations

import uuid
from typing import Protocol


class IdentityHooks(Protocol):
    """Implement any subset by subclassing `NoHooks`; every method is awaited."""

    async def on_user_created(self, user_id: uuid.UUID, method: str) -> None: ...
    async def on_identity_linked(self, user_id: uuid.UUID, provider: str) -> None: ...
    async def on_email_verified(self, user_id: uuid.UUID, email: str) -> None: ...
    async def on_password_changed(self, user_id: uuid.UUID) -> None: ...
    async def on_account_claimed(self, user_id: uuid.UUID, provider: str) -> None: ...


class NoHooks:
    """Hooks that do nothing; subclass and override what you need."""

    async def on_user_created(self, user_id: uuid.UUID, method: str) -> None:
        return None

    async def on_identity_linked(self, user_id: uuid.UUID, provider: str) -> None:
        return None

    async def on_email_verified(self, user_id: uuid.UUID, email: str) -> None:
        return None

    async def on_password_changed(self, user_id: uuid.UUID) -> None:
        return None

    async def on_account_claimed(self, user_id: uuid.UUID, provider: str) -> None:
        return None
