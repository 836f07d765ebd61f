"""One exception tree: catch `KVCacheError` for all, or a subclass for what you can act on."""

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


class InvalidBlockHashError(KVCacheError, ValueError):
    """A block hash from an engine cannot be mapped to a 64-bit key.

    Empty bytes, an int outside [-2**63, 2**64), or a value that is neither int nor bytes. The
    event decoder never lets this escape: it turns it into a ``bad_hash`` rejection.
    """


class InvalidKeyError(IndexOperationError, ValueError):
    """A block key is not an int in [0, 2**64); carries the field and the offending value."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__(f"{field}: {value!r} is not a block key (an int in [0, 2**64))")
        self.field = field
        self.value = value
