"""SlotTable: the numpy open-addressing table under the in-process backends."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from kvcache.index.table import (
    SEGMENT,
    SlotTable,
    mix,
    mix1,
    round_capacity,
    unmix1,
)

COLUMNS = {"v": np.uint64, "clock": np.uint32}
SPECIAL = [0, 1]  # mixed values stored in the reserved rows


def u64(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def test_mix_is_a_bijection_matching_the_scalar_form() -> None:
    rng = random.Random(1)
    keys = [rng.getrandbits(64) for _ in range(1000)] + [0, 1, 2, (1 << 64) - 1]
    mixed = mix(u64(keys)).tolist()
    assert mixed == [mix1(k) for k in keys]
    assert [unmix1(h) for h in mixed] == keys
    assert mix1(unmix1(0)) == 0 and mix1(unmix1(1)) == 1


def test_consecutive_keys_spread_over_slots() -> None:
    table = SlotTable(1 << 12, COLUMNS, "clock")
    homes = table._home(mix(np.arange(1 << 11, dtype=np.uint64)))
    # a good mix fills about 1 - e**-0.5 of the slots' homes; clustering would fill far fewer
    assert np.unique(homes).size > 0.35 * table.cap


@pytest.mark.parametrize(
    ("n", "down", "expected"),
    [
        (1, False, 16),
        (17, False, 32),
        (SEGMENT, False, SEGMENT),
        (SEGMENT + 1, False, 2 * SEGMENT),
        (SEGMENT + 1, True, SEGMENT),
        (3 * SEGMENT - 1, True, 2 * SEGMENT),
        (100, True, 64),
    ],
)
def test_round_capacity(n: int, down: bool, expected: int) -> None:
    assert round_capacity(n, down=down) == expected


def check_against_model(table: SlotTable, model: dict[int, int]) -> None:
    live = [s for chunk in table.iter_live() for s in chunk.tolist()]
    assert len(live) == table.live == len(model)
    stored = dict(zip(table.mixed_keys(np.array(live, dtype=np.intp)).tolist(), live, strict=True))
    assert set(stored) == set(model)
    for h, slot in stored.items():
        assert int(table.cols["v"][slot]) == model[h]
        assert table.find1(h) == slot


@pytest.mark.parametrize("growable", [True, False])
def test_random_operations_match_a_dict(growable: bool) -> None:
    rng = random.Random(3 if growable else 4)
    table = SlotTable(
        16 if growable else 1024,
        COLUMNS,
        "clock",
        max_load=0.75,
        max_capacity=None if growable else 1024,
    )
    universe = [mix1(k) for k in range(400)] + SPECIAL
    model: dict[int, int] = {}
    for step in range(1500):
        batch = [rng.choice(universe) for _ in range(rng.randrange(1, 48))]
        h = u64(batch)
        op = rng.random()
        if op < 0.45 and (growable or len(model) + len(batch) < 600):
            slots, fresh = table.insert(h)
            assert (slots >= 0).all()
            for key, slot, new in zip(batch, slots.tolist(), fresh.tolist(), strict=True):
                assert new == (key not in model)  # duplicates of a new key are all fresh
                table.cols["v"][slot] = step
            for key in batch:
                model[key] = step
        elif op < 0.75:
            slots = table.find(h)
            table.delete(np.unique(slots[slots >= 0]))
            for key in batch:
                model.pop(key, None)
        else:
            slots = table.find(h)
            for key, slot in zip(batch, slots.tolist(), strict=True):
                assert (slot >= 0) == (key in model)
                if slot >= 0:
                    assert int(table.cols["v"][slot]) == model[key]
        assert table.live == len(model)
        assert table.used <= 0.75 * table.cap
    check_against_model(table, model)
    if not growable:
        assert table.cap == 1024


def test_scalar_insert_and_delete() -> None:
    table = SlotTable(16, COLUMNS, "clock")
    model: dict[int, int] = {}
    for k, h in enumerate([*SPECIAL, *(mix1(k) for k in range(100))]):
        slot, fresh = table.insert1(h)
        assert fresh
        assert table.insert1(h) == (slot, False)
        table.cols["v"][slot] = k
        model[h] = k
    check_against_model(table, model)
    for h in list(model)[::2]:
        table.delete1(table.find1(h))
        del model[h]
    check_against_model(table, model)


def test_locate_reports_insertion_slots() -> None:
    table = SlotTable(64, COLUMNS, "clock")
    present = u64([mix1(k) for k in range(10)])
    table.insert(present)
    absent = u64([mix1(k) for k in range(10, 20)])
    slots, ins = table.locate(np.concatenate([present, absent]))
    assert (slots[:10] >= 0).all() and (ins[:10] == -1).all()
    assert (slots[10:] == -1).all() and (ins[10:] >= 0).all()
    assert (table.keys[ins[10:]] < 2).all()  # free slots


def test_duplicate_keys_in_a_batch_share_a_slot() -> None:
    table = SlotTable(16, COLUMNS, "clock")
    h = u64([mix1(5), mix1(6), mix1(5), mix1(5), mix1(7), mix1(6)])
    slots, fresh = table.insert(h)
    assert fresh.all()
    assert slots[0] == slots[2] == slots[3] and slots[1] == slots[5]
    assert table.live == 3


def test_tombstones_are_purged_without_growth() -> None:
    table = SlotTable(1024, COLUMNS, "clock")
    rng = np.random.default_rng(5)
    for _ in range(200):
        h = mix(rng.integers(0, 1 << 63, 100, dtype=np.uint64))
        slots, _ = table.insert(h)
        table.delete(np.unique(slots))
    assert table.live == 0
    assert table.cap == 1024
    assert table.used <= 0.75 * table.cap


def test_growth_keeps_payload_and_reserved_rows() -> None:
    table = SlotTable(16, COLUMNS, "clock")
    h = u64([0, 1, *[mix1(k) for k in range(5000)]])
    slots, _ = table.insert(h)
    table.cols["v"][slots] = np.arange(h.size, dtype=np.uint64)
    more = u64([mix1(k) for k in range(5000, 20000)])
    table.insert(more)
    assert table.cap > 16
    assert table.cols["v"][table.find(h)].tolist() == list(range(h.size))


def test_bounded_growth_halves_down_from_the_maximum() -> None:
    table = SlotTable(16, COLUMNS, "clock", max_capacity=23 * SEGMENT + 5)
    caps = [table.cap]
    for start in range(0, 2_000_000, 20_000):
        table.insert(u64([mix1(k) for k in range(start, start + 20_000)]))
        if caps[-1] != table.cap:
            caps.append(table.cap)
        if table.live > 0.5 * table.max_capacity:
            break
    assert caps[-1] == table.max_capacity == 23 * SEGMENT
    # every step at most about doubles, so old + new arrays stay <= 1.5 x the final size
    assert all(old + new <= 1.5 * caps[-1] for old, new in itertools.pairwise(caps))
    assert 11 * SEGMENT in caps or caps[-2] <= 11.5 * SEGMENT


def test_fixed_table_refuses_to_overfill() -> None:
    table = SlotTable(64, COLUMNS, "clock", max_capacity=64)
    table.insert(u64([mix1(k) for k in range(40)]))
    with pytest.raises(RuntimeError, match="full"):
        table.insert(u64([mix1(k) for k in range(40, 80)]))


def test_large_segmented_table_wraps_inside_segments() -> None:
    table = SlotTable(2 * SEGMENT, COLUMNS, "clock", max_capacity=2 * SEGMENT)
    assert table.cap == 2 * SEGMENT
    rng = np.random.default_rng(9)
    h = mix(rng.integers(0, 1 << 63, 90_000, dtype=np.uint64))
    slots, fresh = table.insert(h)
    assert fresh.all() and np.unique(slots).size == h.size
    segment_of_home = table._home(h) // SEGMENT
    assert (slots // SEGMENT == segment_of_home).all()
    assert (table.find(h) == slots).all()


def test_rebuilds_keep_clusters_that_wrap_around_a_segment() -> None:
    """Keys whose home is the last slot wrap to the segment's start; purge and growth keep
    them findable (the bulk refill pushes them past the end and re-probes them)."""
    table = SlotTable(16, COLUMNS, "clock", max_capacity=16)
    last = [(0xF << 60) + i for i in range(2, 12)]  # home slot 15 of 16
    slots, _ = table.insert(u64(last))
    assert sorted(slots.tolist()) == [*range(9), 15]
    table.cols["v"][slots] = np.arange(10, dtype=np.uint64)
    table.delete(slots[:2])  # tombstones inside the wrapped cluster
    table._purge()
    assert table.tombstones == 0
    found = table.find(u64(last))
    assert (found[:2] == -1).all()
    assert table.cols["v"][found[2:]].tolist() == list(range(2, 10))
    grown = SlotTable(16, COLUMNS, "clock")
    slots, _ = grown.insert(u64(last))
    grown.cols["v"][slots] = np.arange(10, dtype=np.uint64)
    grown._grow(64)
    assert grown.cols["v"][grown.find(u64(last))].tolist() == list(range(10))
