"""Scheme names, vLLM version profiles and `make_scheme`."""

from __future__ import annotations

import re
from typing import Final

from kvcache.errors import (
    ConfigError,
    UnknownSchemeError,
)
from kvcache.hashing.llmd import LlmdScheme
from kvcache.hashing.model import ExtraKeyEra, KeyScheme
from kvcache.hashing.sglang import SglangScheme
from kvcache.hashing.vllm import VllmLegacy64Scheme, VllmScheme

# ---------------------------------------------------------------------------------------------
# Factory and version profiles
# ---------------------------------------------------------------------------------------------

SCHEME_NAMES: Final[tuple[str, ...]] = (
    "sha256",
    "sha256_cbor",
    "xxhash",
    "xxhash_cbor",
    "sglang",
    "llmd-fnv64a",
)
LEGACY_SCHEME_NAMES: Final[tuple[str, ...]] = ("sha256_cbor_64bit",)
"""Also accepted by ``make_scheme``: vLLM 0.10.0 – 0.10.1.1's int chain."""

# X.Y[.Z[.W]] plus PEP 440 pre/post/dev/local suffixes ("0.10.1.1", "0.19.0rc1", "0.32.0+cpu").
_VERSION_RE: Final = re.compile(
    r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)?"
    r"(?:\.?post\d*|\.?(?:rc|a|b|dev)\d*|\+[0-9A-Za-z.]+)*"
)


def _parse_version(version: str) -> tuple[int, int, int]:
    if not isinstance(version, str):
        raise ConfigError("vllm_version", f"must be a version string, got {version!r}")
    match = _VERSION_RE.fullmatch(version.strip())
    if match is None:
        raise ConfigError("vllm_version", f"{version!r} is not a vLLM version like '0.32.0'")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def vllm_version_profile(version: str) -> ExtraKeyEra:
    """The extra-key layout of a vLLM release ("0.32", "0.18.1", "0.11.1.post1", ...)."""
    parsed = _parse_version(version)
    if parsed < (0, 10, 2):
        raise ConfigError(
            "vllm_version",
            f"vLLM {version} predates digest-chained block hashes (0.10.2); its hashes are "
            "process-local ints (use scheme 'sha256_cbor_64bit' for 0.10.0-0.10.1 with a seed)",
        )
    if parsed < (0, 11, 1):
        return ExtraKeyEra.INT_ID
    if parsed < (0, 19, 0):
        return ExtraKeyEra.NAME
    if parsed < (0, 31, 0):
        return ExtraKeyEra.OFFSET
    return ExtraKeyEra.TAGGED


def make_scheme(
    name: str,
    *,
    seed: str | None = None,
    block_size: int = 16,
    vllm_version: str | None = None,
) -> KeyScheme:
    """Build a scheme by name (``SCHEME_NAMES``); vLLM schemes honour ``vllm_version``.

    With a version, configurations vLLM cannot reproduce are refused: xxhash before 0.13, and
    no seed before 0.29 (NONE_HASH was random then). SGLang ignores ``seed`` and
    ``vllm_version``; llm-d uses ``seed`` ("" when None) as its hash seed.
    """
    if name in ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor"):
        era = ExtraKeyEra.TAGGED
        if vllm_version is not None:
            era = vllm_version_profile(vllm_version)
            parsed = _parse_version(vllm_version)
            if name.startswith("xxhash") and parsed < (0, 13, 0):
                raise ConfigError("vllm_version", f"{name} exists only in vLLM >= 0.13")
            if seed is None and parsed < (0, 29, 0):
                raise ConfigError(
                    "seed",
                    f"vLLM {vllm_version} draws NONE_HASH from os.urandom when PYTHONHASHSEED is "
                    "unset, so its hashes cannot be reproduced; set PYTHONHASHSEED on the engine "
                    "and pass it as seed",
                )
        return VllmScheme(name, seed=seed, block_size=block_size, era=era)
    if name == "sglang":
        return SglangScheme(block_size)
    if name == "llmd-fnv64a":
        return LlmdScheme(seed="" if seed is None else seed, block_size=block_size)
    if name == "sha256_cbor_64bit":
        return VllmLegacy64Scheme(seed=seed, block_size=block_size)
    raise UnknownSchemeError(
        "scheme", f"unknown key scheme {name!r}; expected one of {list(SCHEME_NAMES)}"
    )
