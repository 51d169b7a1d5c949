"""The one exception tree of Tollhouse.

Every error the library raises on purpose is a `TollhouseError`. Each leaf is named after
the domain fact, carries a stable machine-readable `code` and structured `fields`, and its
docstring is its default message. Adapters map leaves to HTTP statuses (see
`tollhouse.api.errors`) or to CLI exit codes; nothing else inspects messages.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TollhouseError(Exception):
    """An unexpected Tollhouse error."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        self.fields = fields
        super().__init__(self.message)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.fields.items())
        return f"{type(self).__name__}({self.message!r}{extra})"


# --- configuration and start-up -------------------------------------------------------------


class ConfigurationError(TollhouseError):
    """The configuration is invalid."""

    code = "configuration_error"


class DataDirError(ConfigurationError):
    """The data directory cannot be used."""

    code = "data_dir_unusable"


class PortInUse(TollhouseError):
    """The address to listen on is already in use."""

    code = "port_in_use"


class UnsafeDatabaseSettings(TollhouseError):
    """The database server is configured so that committed money could be lost."""

    code = "unsafe_database_settings"


# --- database -------------------------------------------------------------------------------


class DatabaseError(TollhouseError):
    """The database failed to answer."""

    code = "database_error"


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached."""

    code = "database_unavailable"


class EmbeddedDatabaseNotRunning(DatabaseError):
    """The embedded database is not running."""

    code = "embedded_database_not_running"


class MigrationError(DatabaseError):
    """The database schema cannot be brought up to date."""

    code = "migration_error"


class MigrationChecksumMismatch(MigrationError):
    """An applied migration's file has changed since it was applied."""

    code = "migration_checksum_mismatch"


class UnknownMigrationApplied(MigrationError):
    """The database has a migration this version of Tollhouse does not know."""

    code = "unknown_migration_applied"


class MigrationsPending(MigrationError):
    """The database has migrations still to apply."""

    code = "migrations_pending"


class UniqueViolation(DatabaseError):
    """A uniqueness rule was broken."""

    code = "conflict"


class ConstraintViolation(DatabaseError):
    """A rule of the data model was broken."""

    code = "constraint_violation"


class SerializationRetriesExhausted(DatabaseError):
    """The transaction kept conflicting with concurrent ones; try again."""

    code = "transaction_conflict"


# --- requests ---------------------------------------------------------------------------------


class NotFound(TollhouseError):
    """The resource does not exist."""

    code = "not_found"


class InvalidRequest(TollhouseError):
    """The request is invalid."""

    code = "invalid_request"


class Unauthenticated(TollhouseError):
    """A valid service API key is required."""

    code = "unauthenticated"


# --- service API keys -----------------------------------------------------------------------


class ApiKeyNotFound(NotFound):
    """No such service API key."""

    code = "api_key_not_found"


class ApiKeyNameTaken(UniqueViolation):
    """An active service API key already has this name."""

    code = "api_key_name_taken"
