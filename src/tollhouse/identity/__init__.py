"""Identity: users, e-mails, Google/Apple identities, passwords, sessions, tokens."""

from tollhouse.identity.auth import AuthService
from tollhouse.identity.config import IdentityConfig
from tollhouse.identity.hooks import IdentityHooks, NoHooks
from tollhouse.identity.records import (
    EmailPreferences,
    IssuedUserToken,
    Session,
    SignIn,
    User,
    UserEmail,
    UserIdentity,
)
from tollhouse.identity.users import SelfService, UserService

__all__ = [
    "AuthService",
    "EmailPreferences",
    "IdentityConfig",
    "IdentityHooks",
    "IssuedUserToken",
    "NoHooks",
    "SelfService",
    "Session",
    "SignIn",
    "User",
    "UserEmail",
    "UserIdentity",
    "UserService",
]
