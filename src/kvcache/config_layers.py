"""The layers that fill the configuration tree (`kvcache.config`), lowest first: the defaults,
one config file (JSON or YAML, kvcache's tree or the Go original's shape, see
`config_upstream`), environment variables `KVCACHE_<SECTION>__<FIELD>`, then command-line
overrides. This module is the only reader of the environment; it also masks secrets for
printing.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import typing
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgspec

from kvcache import config_upstream
from kvcache.config import Config
from kvcache.errors import ConfigError

log = logging.getLogger("kvcache.config")

ENV_PREFIX = "KVCACHE_"
CONFIG_FILE_VARIABLE = "KVCACHE_CONFIG"
ENV_NOT_SETTINGS: dict[str, str] = {
    CONFIG_FILE_VARIABLE: "path of the config file (the --config flag wins)",
    "KVCACHE_INTEROP_VENV": "virtualenv of the real-vLLM interop job (Makefile, tests/interop)",
    "KVCACHE_INTEROP_PYTHON": "interpreter that creates that virtualenv (scripts/interop-venv.sh)",
}
"""`KVCACHE_*` variables that are not settings and are never an error."""

# Kubernetes injects <SERVICE>_SERVICE_HOST, <SERVICE>_PORT_8080_TCP... for every Service in
# the namespace; a Service named kvcache (or kvcache-*) would otherwise fail the pod at start.
_SERVICE_LINK = re.compile(
    r"KVCACHE_(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT_\d+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)"
)
_SERVICE_LINK_PORT = re.compile(r"KVCACHE_(?:[A-Z0-9_]+_)?PORT")
_SERVICE_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://\S+")

SECRET_FIELDS: tuple[tuple[str, ...], ...] = (("http", "token"),)
"""Fields printed as "***" by `redacted_mapping`."""
URL_FIELDS: tuple[tuple[str, ...], ...] = (("index", "redis", "url"),)
"""URL fields whose password (user info or `password=` query) is printed as "***"."""
MASK = "***"

_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})


class Override(msgspec.Struct, frozen=True):
    """One value set by a layer above the file: its field path and who set it (for errors)."""

    path: tuple[str, ...]
    value: Any
    source: str


class LoadedConfig(msgspec.Struct, frozen=True):
    """The effective config, and what the file asked for that kvcache cannot honour."""

    config: Config
    warnings: tuple[str, ...] = ()


def load(
    path: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[Override] = (),
) -> LoadedConfig:
    """Defaults < config file < environment < overrides (command-line flags).

    `path` falls back to KVCACHE_CONFIG. Each layer is validated on its own, so an error names
    the file field, the environment variable or the flag that is wrong.
    """
    env = os.environ if environ is None else environ
    path = path or env.get(CONFIG_FILE_VARIABLE) or None
    warnings: tuple[str, ...] = ()
    data: dict[str, Any] = {}
    if path is not None:
        file_config, warnings = read_file(path)
        data = file_config.to_mapping()
    for override in (*env_overrides(env), *overrides):
        value = convert_field(override.path, override.value, override.source)
        parent(data, override.path, create=True)[override.path[-1]] = value
    return LoadedConfig(Config.from_mapping(data), warnings)


def read_file(path: str) -> tuple[Config, tuple[str, ...]]:
    """Parse and validate one config file; also returns the Go-shape translation warnings."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read config file: {exc.strerror}") from None
    data = _decode(path, raw)
    origins: dict[str, str] = {}
    warnings: tuple[str, ...] = ()
    if config_upstream.is_upstream_shape(data):
        translation = config_upstream.translate(data, frozenset(Config.__struct_fields__))
        data, origins, warnings = translation.data, translation.origins, translation.warnings
        for field in _overlay(data, translation.native, Config):
            # A kvcache field given next to the Go keys wins, and errors name it, not Go's.
            origins = {
                key: go
                for key, go in origins.items()
                if key != f"$.{field}" and not key.startswith((f"$.{field}.", f"$.{field}["))
            }
    try:
        return Config.from_mapping(data), warnings
    except ConfigError as exc:
        # msgspec names a list item or dict value as `$.path[0]` / `$.path[...]`.
        origin = origins.get(exc.field) or origins.get(re.sub(r"\[[^\]]*\]$", "", exc.field))
        message = str(exc).partition(": ")[2]
        if origin is not None:
            field = exc.field.removeprefix("$.")
            raise ConfigError(origin, f"{message} (kvcache field {field}, in {path})") from None
        raise ConfigError(exc.field, f"{message} (in {path})") from None


def _overlay(base: dict[str, Any], top: Mapping[str, Any], cls: Any) -> list[str]:
    """Set `top` over `base` field by field (sections merge, other values replace)."""
    hints = _field_types(cls)
    replaced: list[str] = []
    for key, value in top.items():
        hint = hints.get(key)
        if _is_section(hint) and isinstance(value, dict) and isinstance(base.get(key), dict):
            replaced.extend(f"{key}.{path}" for path in _overlay(base[key], value, hint))
        else:
            base[key] = value
            replaced.append(key)
    return replaced


def _decode(path: str, raw: bytes) -> dict[str, Any]:
    """JSON or YAML by extension; otherwise JSON when it starts with "{", else YAML."""
    extension = os.path.splitext(path)[1].lower()
    is_json = extension == ".json" or (
        extension not in (".yaml", ".yml") and raw.lstrip()[:1] == b"{"
    )
    if is_json:
        try:
            data = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ConfigError(path, f"not valid JSON: {exc}") from None
    else:
        data = _decode_yaml(path, raw)
        if data is None:  # an empty file: every default
            data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"the config file must hold a mapping, not {type(data).__name__}")
    return data


def _decode_yaml(path: str, raw: bytes) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            path, "reading YAML needs PyYAML: pip install 'kvcache[service]' (or use JSON)"
        ) from None

    class StrictLoader(yaml.SafeLoader):
        """`safe_load`, and a key given twice is an error instead of the last one winning."""

    def mapping(loader: StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(path, f"duplicate key {key!r} at line {line}")
            seen.add(key)
        return loader.construct_mapping(node)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(raw, Loader=StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML: {exc}") from None


def env_overrides(environ: Mapping[str, str]) -> list[Override]:
    """The settings among `KVCACHE_*` variables; unknown names are a ConfigError."""
    found: list[Override] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS:
            continue
        value = environ[name]
        if "__" not in name and _is_service_link(name, value):
            continue
        found.append(Override(_env_path(name), value, name))
    return found


def _is_service_link(name: str, value: str) -> bool:
    if _SERVICE_LINK.fullmatch(name):
        return True
    # <SERVICE>_PORT=tcp://10.0.0.1:8080; KVCACHE_HTTP_PORT=9000 is a typo of a setting.
    return bool(_SERVICE_LINK_PORT.fullmatch(name) and _SERVICE_LINK_URL.fullmatch(value))


def _env_path(name: str) -> tuple[str, ...]:
    path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
    cls: Any = Config
    for depth, part in enumerate(path):
        hints = _field_types(cls) if _is_section(cls) else {}
        if part not in hints:
            break
        cls = hints[part]
        if depth == len(path) - 1:
            if _is_section(cls):
                example = env_name((*path, next(iter(_field_types(cls)))))
                raise ConfigError(name, f"names a section; set its fields, e.g. {example}")
            return path
    known = [env_name(field) for field, _ in iter_fields()]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(
        name,
        "unknown setting: expected KVCACHE_<SECTION>__<FIELD> naming a field of the config "
        f"tree (docs/configuration.md){hint}",
    )


def env_name(path: Sequence[str]) -> str:
    """The environment variable of a field: `("http", "port")` -> `KVCACHE_HTTP__PORT`."""
    return ENV_PREFIX + "__".join(part.upper() for part in path)


def convert_field(path: Sequence[str], value: Any, source: str) -> Any:
    """Validate one value for the field at `path`; a string is parsed by the field's type.

    Text fields take a string as is; booleans also accept 1/0, yes/no, on/off; anything else
    is parsed as JSON (numbers, `null`, lists, objects).
    """
    hint = _field_type(path)
    info = msgspec.inspect.type_info(hint)
    if isinstance(value, str) and not _takes_text(info):
        word = value.strip().lower()
        if _takes_bool(info) and word in _TRUE_WORDS | _FALSE_WORDS:
            value = word in _TRUE_WORDS
        else:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(
                    source, f"expected {_describe(info)}, got {value!r} (not a JSON value)"
                ) from None
    try:
        return msgspec.to_builtins(msgspec.convert(value, hint))
    except msgspec.ValidationError:
        raise ConfigError(source, f"expected {_describe(info)}, got {value!r}") from None


def iter_fields(
    cls: type[msgspec.Struct] = Config, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every leaf field of the tree (not sections), depth first, with its type annotation."""
    for name, hint in _field_types(cls).items():
        if _is_section(hint):
            yield from iter_fields(hint, (*prefix, name))
        else:
            yield (*prefix, name), hint


def redact_url(url: str) -> str:
    """`url` with its password (user info or a `password` query parameter) as "***"."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        user, _, host = parts.netloc.rpartition("@")
        url = url.replace(parts.netloc, f"{user.partition(':')[0]}:{MASK}@{host}", 1)
    return re.sub(r"([?&]password=)[^&#]*", rf"\g<1>{MASK}", url)


def _field_types(cls: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {name: hints[name] for name in cls.__struct_fields__}


def _field_type(path: Sequence[str]) -> Any:
    hint: Any = Config
    for part in path:
        hint = _field_types(hint)[part]
    return hint


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, msgspec.Struct)


def _takes_text(info: msgspec.inspect.Type) -> bool:
    if isinstance(info, msgspec.inspect.UnionType):
        return any(_takes_text(member) for member in info.types)
    if isinstance(info, msgspec.inspect.LiteralType):
        return all(isinstance(value, str) for value in info.values)
    return isinstance(info, msgspec.inspect.StrType)


def _takes_bool(info: msgspec.inspect.Type) -> bool:
    if isinstance(info, msgspec.inspect.UnionType):
        return any(_takes_bool(member) for member in info.types)
    return isinstance(info, msgspec.inspect.BoolType)


def _describe(info: msgspec.inspect.Type) -> str:
    """A short human name of a type, for error messages and the generated docs."""
    inspect = msgspec.inspect
    if isinstance(info, inspect.UnionType):
        return " or ".join(_describe(member) for member in info.types)
    if isinstance(info, inspect.LiteralType):
        return "one of " + ", ".join(json.dumps(value) for value in info.values)
    if isinstance(info, inspect.ListType):
        return f"list of {_describe(info.item_type)}"
    if isinstance(info, inspect.DictType):
        return f"object of {_describe(info.value_type)}"
    if isinstance(info, inspect.StructType):
        return "object"
    bounds = [
        f"{symbol} {bound}"
        for symbol, bound in (
            (">=", getattr(info, "ge", None)),
            (">", getattr(info, "gt", None)),
            ("<=", getattr(info, "le", None)),
            ("<", getattr(info, "lt", None)),
        )
        if bound is not None
    ]
    names = {
        inspect.IntType: "integer",
        inspect.FloatType: "number",
        inspect.BoolType: "boolean",
        inspect.StrType: "string",
        inspect.NoneType: "null",
        inspect.AnyType: "any JSON value",
    }
    name = names.get(type(info), type(info).__name__)
    return f"{name} {' and '.join(bounds)}" if bounds else name


def describe_type(hint: Any) -> str:
    """`_describe` of an annotation (used by the docs generator)."""
    return _describe(msgspec.inspect.type_info(hint))


def parent(data: dict[str, Any], path: Sequence[str], create: bool = False) -> dict[str, Any]:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {}) if create else node[part]
    return node
