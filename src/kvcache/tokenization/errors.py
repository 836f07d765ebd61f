"""Errors of the text read path (all are `KVCacheError`s; most are the caller's input)."""

from __future__ import annotations

from kvcache.errors import KVCacheError


class TokenizationError(KVCacheError, ValueError):
    """A prompt or request could not be turned into the token ids the engine would use."""


class MissingDependencyError(TokenizationError, ImportError):
    """An optional library (tokenizers, transformers, jinja2) is not installed."""

    def __init__(self, library: str) -> None:
        super().__init__(
            f"tokenizing text needs the '{library}' package: install kvcache[hf] "
            "(pip install 'kvcache[hf]')"
        )
        self.library = library


class TokenizerNotFoundError(TokenizationError, LookupError):
    """No tokenizer for the model in any allowed source; the message lists what was tried."""


class ChatTemplateError(TokenizationError):
    """The model has no chat template, or the template rejected the conversation."""


class UnsupportedRequestError(TokenizationError):
    """The request uses a feature whose tokens kvcache cannot reproduce (e.g. raw images)."""


class TokenizationTimeoutError(TokenizationError, TimeoutError):
    """Tokenization did not finish within the configured deadline."""


class PoolOverloadedError(TokenizationError):
    """Too many requests are waiting for a tokenization worker."""


def require(module: str) -> None:
    """Raise MissingDependencyError unless ``module`` imports."""
    try:
        __import__(module)
    except ImportError:
        raise MissingDependencyError(module) from None
