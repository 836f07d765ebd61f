"""DiscoveryConfig: defaults, strictness, and the example in docs/discovery.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from kvcache.discovery import DiscoveryConfig

DOC = Path(__file__).resolve().parents[3] / "docs" / "discovery.md"


def test_defaults_follow_llm_d() -> None:
    config = DiscoveryConfig()
    assert not config.enabled
    assert config.label_selector == "llm-d.ai/inference-serving=true"
    assert config.socket_port == 5557 and config.namespace == ""
    assert config.pod_identity == "ip_port" and config.identity_port == 8000
    assert config.dial


def test_the_documented_example_is_a_valid_section() -> None:
    block = re.search(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert block is not None
    section = json.loads(block.group(1))["discovery"]
    config = msgspec.convert(section, DiscoveryConfig)
    assert config.enabled and config.namespace == "llm"


@pytest.mark.parametrize(
    "section",
    [
        {"enabeld": True},
        {"pod_identity": "uid"},
        {"socket_port": 0},
        {"socket_port": 65536},
        {"resync_seconds": -1},
        {"retry_seconds": 0},
    ],
)
def test_bad_settings_are_refused(section: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(section, DiscoveryConfig)


def test_every_field_is_documented_in_the_source() -> None:
    source = (Path(__file__).resolve().parents[3] / "src/kvcache/discovery/config.py").read_text()
    for field in DiscoveryConfig.__struct_fields__:
        assert re.search(rf"\n    {field}: .*\n    \"\"\"", source), f"{field} lacks a docstring"
