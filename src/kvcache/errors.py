"""One exception tree: catch `KVCacheError` for everything, or a subclass for what you can act on."""

from __future__ import annotations


class KVCacheError(Exception):
    """Root of every error raised by kvcache."""


class ConfigError(KVCacheError, ValueError):
    """A configuration value is missing, malformed or out of range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownSchemeError(ConfigError):
    """The requested key scheme, hash algorithm or version profile does not exist."""


class HashingError(KVCacheError, ValueError):
    """Block keys could not be computed from the given input (never a silent sentinel)."""


class InvalidTokenError(HashingError):
    """A token id is negative, not an integer, or too large for the scheme."""


class ExtraKeysError(HashingError):
    """Per-block extra keys (LoRA, multimodal, cache salt) are inconsistent with the tokens."""


class IndexOperationError(KVCacheError):
    """An index operation was called with arguments it cannot accept (e.g. no entries)."""


class UnknownKeyError(IndexOperationError, LookupError):
    """A key the caller asked about is not in the index."""
