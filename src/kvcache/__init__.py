"""kvcache: KV-cache-aware routing for LLM inference fleets.

The facade is `Indexer`: token ids -> the engine's block keys -> index lookup -> pod scores.
"""

from __future__ import annotations

from kvcache.blocks import CPU, GPU, BlockKey, KeyType, ModelName, PodEntry, PodId
from kvcache.config import Config
from kvcache.errors import (
    ConfigError,
    ExtraKeysError,
    HashingError,
    IndexOperationError,
    InvalidTokenError,
    KVCacheError,
    UnknownKeyError,
    UnknownSchemeError,
)
from kvcache.hashing import KeyScheme, MMItem, RequestExtras, make_scheme
from kvcache.index.protocol import Index
from kvcache.indexer import Indexer
from kvcache.routing import (
    CostModel,
    Decision,
    FleetLoad,
    PodCost,
    PodLoad,
    Router,
)
from kvcache.scoring import LongestPrefixScorer, normalize_scores
from kvcache.vllm_metrics import scrape_vllm_metrics

__version__ = "0.1.0"

__all__ = [
    "CPU",
    "GPU",
    "BlockKey",
    "Config",
    "ConfigError",
    "CostModel",
    "Decision",
    "ExtraKeysError",
    "FleetLoad",
    "HashingError",
    "Index",
    "IndexOperationError",
    "Indexer",
    "InvalidTokenError",
    "KVCacheError",
    "KeyScheme",
    "KeyType",
    "LongestPrefixScorer",
    "MMItem",
    "ModelName",
    "PodCost",
    "PodEntry",
    "PodId",
    "PodLoad",
    "RequestExtras",
    "Router",
    "UnknownKeyError",
    "UnknownSchemeError",
    "__version__",
    "make_scheme",
    "normalize_scores",
    "scrape_vllm_metrics",
]
