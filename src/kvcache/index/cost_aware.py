"""A block index with a hard byte budget (the counterpart of upstream's ristretto backend).

Same engine as `MemoryIndex`; the tables grow with the content like there, but only up to sizes
derived from the budget (including the transient old + new arrays of the last growth step),
then the approximate LRU makes room. The Python objects (interned entry sets, memo tables, 1:many
runs) get a fixed reserve that is enforced after each write by collecting unused sets and, if
that is not enough, evicting the oldest keys. A small share is kept back for the transient
buffers of scans, which work chunk by chunk. Upstream admits by TinyLFU; here admission is
always granted and the approximate LRU makes room.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np

from kvcache.errors import ConfigError
from kvcache.index.memory import ENGINE_COLUMNS, MAIN_COLUMNS, TableIndex
from kvcache.index.table import SEGMENT, SlotTable, round_capacity

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtpe", start=1):
    _UNITS[_p] = _UNITS[_p + "b"] = 1000**_i
    _UNITS[_p + "i"] = _UNITS[_p + "ib"] = 1024**_i

MIN_BUDGET = 256 * 1024
_MAX_LOAD = 0.8  # slots used (live + tombstones) before a purge
_MAX_LIVE = 0.7  # live keys before the LRU evicts
_MAX_SCRATCH = 4 << 20
_GROWTH_PEAK = 1.25  # old + new arrays of the last growth step, relative to the final size


def _capacity_within(nbytes: int, slot_bytes: int) -> int:
    """The largest valid slot count whose arrays (plus the 3 reserved rows) fit in nbytes."""
    return round_capacity(nbytes // slot_bytes - 3, down=True)


def parse_size(value: int | str, field: str = "budget_bytes") -> int:
    """Bytes from an int or a human size: "42" = 42, "42 MB" = "42M" = 42e6, "42Mi" = 42 * 2**20.

    Units are case-insensitive: B, K/KB, M/MB, ... (powers of 1000) and Ki/KiB, Mi/MiB, ...
    (powers of 1024); fractions such as "1.5GiB" are allowed.
    """
    if isinstance(value, bool):
        raise ConfigError(field, f"expected a size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)) and m[2].lower() in _UNITS:
        try:
            size = int(Decimal(m[1]) * _UNITS[m[2].lower()])
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
            raise ConfigError(field, f"cannot parse size {value!r}") from exc
    else:
        raise ConfigError(field, f"cannot parse size {value!r} (e.g. 2GiB, 512MB, 1048576)")
    if size <= 0:
        raise ConfigError(field, f"must be positive, got {value!r}")
    return size


class CostAwareIndex(TableIndex):
    """Block index whose own memory (arrays + Python objects) stays within ``budget_bytes``.

    The budget splits into: a reserve for Python objects (1/16, at least 64 KiB), scan scratch
    (1/16, at most 4 MiB), and arrays: ``engine_map_fraction`` of them for the engine-key map,
    the rest for the main table at 16 bytes a slot, filled to at most 70% before evicting. The
    arrays' final sizes leave room for the last growth step (old + new <= 1.25 x final).
    ``pod_cache_size`` optionally caps entries per key (upstream's cost-aware cache has none).
    """

    backend = "cost_aware"

    def __init__(
        self,
        budget_bytes: int | str = "2GiB",
        pod_cache_size: int | None = None,
        *,
        engine_map_fraction: float = 0.2,
        evict_fraction: float = 1 / 256,
        kernels: bool | None = None,
    ) -> None:
        budget = parse_size(budget_bytes)
        if budget < MIN_BUDGET:
            raise ConfigError("budget_bytes", f"must be at least {MIN_BUDGET} bytes, got {budget}")
        if not 0.0 < engine_map_fraction < 1.0:
            raise ConfigError(
                "engine_map_fraction", f"must be in (0, 1), got {engine_map_fraction}"
            )
        self.budget = budget
        self._object_reserve = max(64 * 1024, budget // 16)
        scratch = min(budget // 16, _MAX_SCRATCH)
        arrays = (budget - self._object_reserve - scratch) / _GROWTH_PEAK
        engine_bytes = int(arrays * engine_map_fraction)
        main_bytes = int(arrays) - engine_bytes
        main_cap = _capacity_within(main_bytes, SlotTable.bytes_per_slot(MAIN_COLUMNS))
        engine_cap = _capacity_within(engine_bytes, SlotTable.bytes_per_slot(ENGINE_COLUMNS))
        main = SlotTable(1024, MAIN_COLUMNS, "clock", max_load=_MAX_LOAD, max_capacity=main_cap)
        engine = SlotTable(
            16, ENGINE_COLUMNS, "request", max_load=_MAX_LOAD, max_capacity=engine_cap
        )
        # scans allocate ~40 bytes per slot of a chunk; keep that inside the scratch share
        scan_chunk = int(np.clip(scratch // 40, 4096, 4 * SEGMENT))
        main.scan_chunk = engine.scan_chunk = scan_chunk
        super().__init__(
            main,
            engine,
            max_keys=int(main_cap * _MAX_LIVE),
            max_engine_keys=int(engine_cap * _MAX_LIVE),
            pod_cache_size=pod_cache_size,
            evict_fraction=evict_fraction,
            kernels=kernels,
        )

    def _maintain(self) -> None:
        super()._maintain()
        if self._object_bytes() <= self._object_reserve:
            return
        self._collect_sets()
        # still over: the key space holds too many distinct sets; shed the oldest keys
        while self._object_bytes() > self._object_reserve and self._main.live:
            self._evict_keys(max(1, self._main.live // 8), self._now + 1)
            self._collect_sets()

    def _object_bytes(self) -> int:
        return self._nbytes() - self._main.nbytes - self._engine.nbytes

    def statistics(self) -> dict[str, Any]:
        stats = super().statistics()
        stats["budget_bytes"] = self.budget
        stats["max_slots"] = self._main.max_capacity
        stats["object_bytes_reserve"] = self._object_reserve
        return stats
