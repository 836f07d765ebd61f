"""The typed config tree: defaults, validation with field paths, round trip."""

from __future__ import annotations

import pytest

from kvcache.config import Config
from kvcache.errors import ConfigError


def test_defaults_are_documented_values() -> None:
    config = Config()
    assert config.hashing.scheme == "sha256"
    assert config.hashing.seed is None
    assert config.hashing.block_size == 16
    assert config.index.backend == "memory"
    assert config.index.memory.size == 100_000_000
    assert config.index.memory.pod_cache_size == 256
    assert config.scoring.tier_weights == {"gpu": 1.0, "cpu": 0.8}


def test_round_trip_through_plain_data() -> None:
    config = Config.from_mapping({"hashing": {"scheme": "sha256_cbor", "seed": "42"}})
    assert Config.from_mapping(config.to_mapping()) == config


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"hashing": {"block_size": 0}}, "$.hashing.block_size"),
        ({"hashing": {"scheme": "md5"}}, "$.hashing.scheme"),
        ({"hashing": {"bogus": 1}}, "$.hashing"),
        ({"index": {"backend": "cassandra"}}, "$.index.backend"),
        ({"scoring": {"tier_weights": {"gpu": -1}}}, "$.scoring.tier_weights[...]"),
    ],
)
def test_invalid_values_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data)
    assert info.value.field == field
    assert field in str(info.value)
