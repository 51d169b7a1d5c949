"""Settings, read from `TOLLHOUSE_*` environment variables and a `.env` file.

`DATABASE_URL` (or `TOLLHOUSE_DATABASE_URL`) selects an external PostgreSQL; without it
Tollhouse runs an embedded server in `data_dir`. The README lists every setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
from dotenv.parser import parse_stream
from psycopg.conninfo import conninfo_to_dict
from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tollhouse.errors import ConfigurationError

ENV_FILE_VARIABLE = "TOLLHOUSE_ENV_FILE"


def default_data_dir() -> Path:
    """The per-user data directory, e.g. `~/.local/share/tollhouse` on Linux."""
    return Path(platformdirs.user_data_dir("tollhouse", appauthor=False))


class Settings(BaseSettings):
    """Every setting of the service; each field is `TOLLHOUSE_<NAME>` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix="TOLLHOUSE_",
        extra="ignore",
        populate_by_name=True,
    )

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "TOLLHOUSE_DATABASE_URL"),
        description="PostgreSQL URL; unset means the embedded server in data_dir.",
    )
    service_database_url: str | None = Field(
        default=None,
        description="Optional login of the tollhouse_service role for the running service;"
        " unset: the embedded server's, or DATABASE_URL switching role per connection.",
    )
    data_dir: Path = Field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    migrate_on_start: bool = True
    pool_min_size: int = Field(default=2, ge=1, le=1000)
    pool_max_size: int = Field(default=10, ge=1, le=1000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    bootstrap_api_key: bool = Field(
        default=True, description="Create and print a service API key when none was ever made."
    )
    credit_lanes: int = Field(
        default=2, ge=1, le=64, description="Group-commit lanes for debits (transactions at once)."
    )
    # Identity
    password_hash_profile: Literal["rfc9106-low-memory", "owasp-minimum", "test"] = (
        "rfc9106-low-memory"  # noqa: S105 - a profile name, not a password
    )
    password_hash_concurrency: int = Field(default=2, ge=1, le=64)
    session_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)
    signin_limit: int = Field(default=20, ge=1)
    signin_window_seconds: int = Field(default=900, ge=1)
    google_client_ids: str = Field(default="", description="Comma-separated OAuth client ids.")
    apple_client_ids: str = Field(default="", description="Comma-separated Services/App ids.")
    link_nonce_required: bool = Field(
        default=False,
        description="Explicit linking only with a nonce from POST /v1/me/identities/nonce.",
    )
    google_jwks_url: str = "https://www.googleapis.com/oauth2/v3/certs"
    apple_jwks_url: str = "https://appleid.apple.com/auth/keys"
    # Billing (Stripe)
    stripe_webhook_secret: str = Field(
        default="",
        description="Webhook signing secret(s), comma-separated (two at once during rotation).",
    )
    stripe_api_key: str | None = Field(
        default=None, description="Secret API key for Checkout, the portal and `stripe sync`."
    )
    stripe_api_base: str | None = Field(
        default=None, description="Another Stripe API address (a local fake in tests)."
    )
    stripe_livemode: bool | None = Field(
        default=None,
        description="Apply only live (true) or test (false) events; unset: the API key's mode"
        " (sk_live_/rk_live_ or sk_test_/rk_test_), or both without a key.",
    )
    stripe_webhook_lanes: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Group-commit lanes for webhook deliveries (transactions at once).",
    )
    stripe_connect_accounts: str = Field(
        default="",
        description="Connected accounts (acct_...) whose events are applied, comma-separated;"
        " other accounts' events are stored as ignored.",
    )

    @field_validator("database_url", "service_database_url")
    @classmethod
    def _parsable_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            conninfo_to_dict(value)
        except Exception:
            raise ValueError("is not a valid PostgreSQL URL") from None
        return value

    @property
    def embedded(self) -> bool:
        """True when Tollhouse runs its own PostgreSQL."""
        return not self.database_url

    @property
    def pgdata(self) -> Path:
        """Where the embedded server keeps its files."""
        return self.data_dir / "pgdata"


def env_file_path() -> Path:
    """The `.env` file to read: `TOLLHOUSE_ENV_FILE`, else `.env` in the working directory."""
    return Path(os.environ.get(ENV_FILE_VARIABLE, ".env"))


def check_env_file(path: Path) -> None:
    """Refuse a `.env` file that python-dotenv would silently half-read."""
    if not path.is_file():
        return
    try:
        with path.open(encoding="utf-8") as stream:
            for binding in parse_stream(stream):
                if binding.error:
                    line = binding.original.line
                    raise ConfigurationError(
                        f"malformed {path} at line {line}: {binding.original.string.strip()!r}",
                        path=str(path),
                        line=line,
                    )
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path} is not UTF-8 text", path=str(path)) from exc


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning every problem into one `ConfigurationError` line."""
    env_file = env_file_path()
    check_env_file(env_file)
    values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(_env_file=env_file, **values)  # type: ignore[call-arg]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "settings"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigurationError(f"invalid setting {name}: {message}", setting=name) from None
    if settings.pool_min_size > settings.pool_max_size:
        raise ConfigurationError("pool_min_size must not exceed pool_max_size")
    return settings
