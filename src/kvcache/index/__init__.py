"""Block index backends behind the narrow `Index` protocol.

* `MemoryIndex` — the default, bounded by key count (numpy hash tables, approximate LRU).
* `CostAwareIndex` — the same engine under a hard byte budget (``"2GiB"``, ``"512MB"``...).
"""

from __future__ import annotations

from kvcache.index.cost_aware import CostAwareIndex, parse_size
from kvcache.index.memory import MemoryIndex
from kvcache.index.protocol import Index

__all__ = ["CostAwareIndex", "Index", "MemoryIndex", "parse_size"]
