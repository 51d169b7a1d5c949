"""Service API keys: bearer keys for server-to-server calls, stored only as hashes."""

from tollhouse.keys.service import ApiKey, ApiKeyService, CreatedApiKey

__all__ = ["ApiKey", "ApiKeyService", "CreatedApiKey"]
