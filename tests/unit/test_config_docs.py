"""docs/configuration.md is generated from the config tree and stays in sync with it."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from kvcache import config_docs, config_upstream
from kvcache.config_layers import env_name, iter_fields

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_checked_in_configuration_doc_is_the_generated_one() -> None:
    assert DOC.read_text(encoding="utf-8") == config_docs.render(), (
        "docs/configuration.md is stale: run "
        "`.venv/bin/python -m kvcache.config_docs > docs/configuration.md`"
    )


def test_every_field_is_documented_with_its_environment_variable() -> None:
    text = config_docs.render()
    for path, _ in iter_fields():
        assert f"`{env_name(path)}`" in text
    assert "`KVCACHE_HTTP__PORT`" in text and "`KVCACHE_INDEX__REDIS__URL`" in text


def test_a_field_without_a_docstring_fails_the_generator() -> None:
    class Undocumented(msgspec.Struct):
        """A section."""

        documented: int = 1
        """Has one."""
        bare: int = 2

    assert config_docs.field_docs(Undocumented) == {"documented": "Has one."}
    with pytest.raises(ValueError, match=r"Undocumented\.bare has no docstring"):
        config_docs._field_table(Undocumented, (), with_env=False)


def test_every_go_rule_targets_a_real_kvcache_field() -> None:
    fields = {".".join(path) for path, _ in iter_fields()}
    targets = {rule.target for rule in config_upstream.RULES if rule.target}
    assert targets <= fields
    assert "index.redis.url" in targets and "discovery.socket_port" in targets
