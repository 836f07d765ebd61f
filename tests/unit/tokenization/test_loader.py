"""Tokenizer sources: explicit paths, models-dir discovery, HF cache layout, hub gating, LRU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import shutil

import models

from kvcache.tokenization import (
    TokenizerNotFoundError,
    TokenizerRegistry,
    TokenizerResolver,
    discover_models,
    load_tokenizer,
)


@pytest.fixture
def chatml_dir() -> Path:
    return models.chatml_dir()


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_discovery_maps_cache_layout_and_relative_dirs(chatml_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    _copy(chatml_dir, root / "org" / "plain")
    snap = root / "models--acme--chat" / "snapshots"
    _copy(chatml_dir, snap / "old")
    _copy(chatml_dir, snap / "abc123")
    (root / "models--acme--chat" / "refs").mkdir()
    (root / "models--acme--chat" / "refs" / "main").write_text("abc123")
    found = discover_models(root)
    assert found == {"org/plain": root / "org" / "plain", "acme/chat": snap / "abc123"}
    assert discover_models(tmp_path / "missing") == {}


def test_resolution_order_and_clear_offline_error(
    chatml_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    _copy(chatml_dir, cache / "models--org--cached" / "snapshots" / "r1")
    resolver = TokenizerResolver(
        {"explicit": str(chatml_dir / "tokenizer.json")},
        models_dir=str(tmp_path / "none"),
        hf_cache=str(cache),
        allow_hub=True,
    )
    assert resolver.resolve("explicit").origin == "explicit"
    assert resolver.resolve("org/cached").origin == "hf_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerNotFoundError) as info:
        resolver.resolve("org/absent")
    message = str(info.value)
    assert "org/absent" in message and "HF cache" in message and "HF_HUB_OFFLINE" in message
    closed = TokenizerResolver(models_dir=None, hf_cache=str(cache))
    with pytest.raises(TokenizerNotFoundError, match="hub disabled"):
        closed.resolve("org/absent")
    with pytest.raises(TokenizerNotFoundError, match=r"has no tokenizer\.json"):
        TokenizerResolver({"bad": str(tmp_path)}).resolve("bad")


def test_registry_loads_once_and_is_bounded(chatml_dir: Path) -> None:
    resolver = TokenizerResolver({"a": str(chatml_dir), "b": str(chatml_dir)}, models_dir=None)
    registry = TokenizerRegistry(resolver, capacity=1)
    first = registry.get("a")
    assert registry.get("a") is first
    registry.get("b")
    assert registry.loaded() == ["b"]
    assert registry.loads == 2


def test_bare_tokenizer_json_without_transformers(chatml_dir: Path) -> None:
    resolver = TokenizerResolver({"m": str(chatml_dir / "tokenizer.json")}, models_dir=None)
    bare = load_tokenizer(resolver.resolve("m"), use_transformers=False)
    assert bare.hf is None
    assert bare.chat_template is not None  # read from tokenizer_config.json
    assert bare.encode("Hello", add_special_tokens=True)[0] == 0  # BOS from the post-processor
