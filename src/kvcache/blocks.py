"""Value types shared by the read and write paths: block keys, pods and index entries."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple, NewType

BlockKey = NewType("BlockKey", int)
"""A 64-bit unsigned block key, the form engines publish (0 is reserved for "no parent")."""

PodId = NewType("PodId", str)
ModelName = NewType("ModelName", str)

U64_MASK = (1 << 64) - 1

GPU = "gpu"
CPU = "cpu"


class KeyType(Enum):
    """How `Index.evict` interprets the key it is given."""

    ENGINE = "engine"
    """The engine's own block hash: resolved through the engine-to-request map."""
    REQUEST = "request"
    """A request key, used as is (e.g. to drop a speculative entry)."""


class PodEntry(NamedTuple):
    """One copy of a block: which pod holds it, on which tier, and in which KV-cache group.

    The whole tuple is the identity of an entry: the same pod on gpu and on cpu is two entries,
    and eviction matches all fields exactly.
    """

    pod: str
    tier: str = GPU
    speculative: bool = False
    group: int | None = None

    def __str__(self) -> str:
        text = f"{self.pod}@{self.tier}"
        if self.speculative:
            text += "[speculative]"
        if self.group is not None:
            text += f"[group={self.group}]"
        return text
