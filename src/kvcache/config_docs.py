"""Generate docs/configuration.md from the config tree's field docstrings.

`python -m kvcache.config_docs > docs/configuration.md`; a unit test keeps the checked-in file
equal to this output. A field without a docstring is an error, so every field stays documented.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import msgspec

from kvcache import config_upstream
from kvcache.config import Config
from kvcache.config_layers import (
    CONFIG_FILE_VARIABLE,
    ENV_NOT_SETTINGS,
    MASK,
    SECRET_FIELDS,
    URL_FIELDS,
    describe_type,
    env_name,
)


def field_docs(cls: type[msgspec.Struct]) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _sections(
    cls: type[msgspec.Struct], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], type[msgspec.Struct]]]:
    """Every section of the tree, parents before children."""
    yield prefix, cls
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    for item in info.fields:
        if isinstance(item.type, msgspec.inspect.StructType):
            yield from _sections(item.type.cls, (*prefix, item.name))


def _nested_structs(info: msgspec.inspect.Type) -> Iterator[type[msgspec.Struct]]:
    """Structs inside a dict or list field (e.g. each value of `lora_adapters`)."""
    if isinstance(info, msgspec.inspect.DictType):
        yield from _nested_structs(info.value_type)
    elif isinstance(info, msgspec.inspect.ListType):
        yield from _nested_structs(info.item_type)
    elif isinstance(info, msgspec.inspect.StructType):
        yield info.cls


def _cell(text: str) -> str:
    """One table cell: one line, `|` escaped, `<...>` outside code spans kept visible."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside `code`
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _default(item: msgspec.inspect.Field) -> str:
    if item.required:
        return "required"
    value = item.default_factory() if item.default is msgspec.NODEFAULT else item.default
    return f"`{json.dumps(msgspec.to_builtins(value))}`"


def _field_table(
    cls: type[msgspec.Struct], prefix: tuple[str, ...], with_env: bool
) -> tuple[list[str], list[tuple[str, type[msgspec.Struct]]]]:
    docs = field_docs(cls)
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    header = "| field | type | default |" + (" environment |" if with_env else "") + " meaning |"
    lines = [header, "|---|---|---|" + ("---|" if with_env else "") + "---|"]
    nested: list[tuple[str, type[msgspec.Struct]]] = []
    hints = _hints(cls)
    for item in info.fields:
        if isinstance(item.type, msgspec.inspect.StructType):
            continue  # a subsection: documented under its own heading
        if item.name not in docs:
            raise ValueError(f"{cls.__qualname__}.{item.name} has no docstring")
        path = (*prefix, item.name)
        env = f" `{env_name(path)}` |" if with_env else ""
        lines.append(
            f"| `{item.name}` | {_cell(describe_type(hints[item.name]))} | {_default(item)} |"
            f"{env} {_cell(docs[item.name])} |"
        )
        nested.extend((".".join(path), struct) for struct in _nested_structs(item.type))
    return lines, nested


def _hints(cls: type[msgspec.Struct]) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls, include_extras=True)


def _fields_part() -> list[str]:
    out: list[str] = []
    for prefix, cls in _sections(Config):
        if not prefix:
            continue
        out += ["", f"### `{'.'.join(prefix)}`", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        table, nested = _field_table(cls, prefix, with_env=True)
        out += table
        for owner, struct in nested:
            out += ["", f"Each value of `{owner}`: {inspect.cleandoc(struct.__doc__ or '')}", ""]
            out += _field_table(struct, (), with_env=False)[0]
    return out


def _flags_part() -> list[str]:
    from kvcache.service.cli import FIELD_FLAGS

    out = ["| flag | sets |", "|---|---|"]
    out += [
        "| `--config FILE` | the file layer (else `$KVCACHE_CONFIG`) |",
        "| `--zmq-endpoint E` | `events.zmq_bind` = `[E]` |",
        "| `--zmq-connect E` (repeatable) | `events.zmq_connect`; also `events.zmq_bind` = `[]` "
        "unless `--zmq-endpoint` is given |",
        "| `--index memory\\|cost_aware\\|URL` | `index.backend`; a Redis/Valkey URL sets "
        "`index.backend` = `redis` and `index.redis.url` |",
    ]
    out += [f"| `{flag}` | `{path}` |" for path, flag in FIELD_FLAGS]
    return out


def _upstream_part() -> list[str]:
    out = ["| Go field | kvcache field | notes |", "|---|---|---|"]
    for rule in config_upstream.RULES:
        target = (
            f"`{rule.target}`"
            if rule.target
            else "none: " + ("warned when set" if rule.warn else "accepted")
        )
        if rule.quiet and not rule.target:
            target += " (unless " + ", ".join(json.dumps(v) for v in rule.quiet) + ")"
        out.append(f"| `{rule.go}` | {target} | {_cell(rule.note)} |")
    return out


_INTRO = """\
# Configuration

<!-- Generated by `python -m kvcache.config_docs > docs/configuration.md` from the field
docstrings in src/kvcache/config.py (and src/kvcache/discovery/config.py). Do not edit by hand:
tests/unit/test_config_docs.py fails when this file and the generator disagree. -->

`kvcache serve` builds one typed config tree (`kvcache.config.Config`) from four layers, each
overriding the one before:

1. the defaults listed below;
2. one config file: `--config FILE`, else the file named by `$KVCACHE_CONFIG`;
3. environment variables `KVCACHE_<SECTION>__<FIELD>`;
4. command-line flags.

`kvcache config show [--config FILE] [--format json|yaml] [serve flags...]` prints the effective
config exactly as `kvcache serve` with the same file, environment and flags would run with it.
Secrets are printed as `{mask}`: {secrets}, and the password in {urls}.
`kvcache config schema` prints the JSON schema of the file. Each layer is validated on its
own, so an error names the file field (`$.http.port`, or the Go field it came from), the
variable or the flag, and the service does not start.

## The config file

JSON or YAML: `.json` is JSON, `.yaml` / `.yml` YAML, anything else JSON when it starts with `{{`
and YAML otherwise. YAML is read with PyYAML's safe loader (the `service` extra), and a key given
twice is an error. Sections and fields left out take their defaults; an unknown key or a value
out of range is an error naming its path. The file holds either kvcache's tree:

```yaml
hashing: {{scheme: sha256_cbor, seed: "42", block_size: 16}}
index:
  backend: redis
  redis: {{url: "valkey://valkey:6379"}}
http: {{host: 0.0.0.0}}
logging: {{format: json}}
```

or the Go original's shape (below), optionally with kvcache sections next to it.

## Environment variables

`KVCACHE_` + the field path in upper case, sections joined by a double underscore:
`KVCACHE_HTTP__PORT=9000`, `KVCACHE_INDEX__REDIS__URL=valkey://valkey:6379`,
`KVCACHE_HTTP__TOKEN=...`. A value is parsed by the field's type: text fields take it as is
(there is no way to set such a field to null from the environment); booleans accept
`true/false`, `1/0`, `yes/no`, `on/off`; numbers, `null`, lists and objects are JSON
(`KVCACHE_EVENTS__ZMQ_CONNECT='["tcp://10.0.0.7:5557"]'`). Lists and objects replace the file's
value as a whole. A variable naming a section, an unknown field or a value of the wrong type is
an error naming the variable.

`KVCACHE_*` names that are not settings and are never an error:

| variable | meaning |
|---|---|
{allowed}
{service_links}

Other variables are never read as settings. In particular `PYTHONHASHSEED` is not the
engines' seed: in the kvcache process it only seeds Python's own `str` hashing, and reading it
implicitly would tie kvcache's keys to an unrelated interpreter setting. The Go examples'
variables are not read either (their names are generic and would be picked up from unrelated
environments); set the kvcache variable instead:

| Go example variable | kvcache variable |
|---|---|
| `PYTHONHASHSEED` (the engines' seed) | `KVCACHE_HASHING__SEED` |
| `BLOCK_SIZE` | `KVCACHE_HASHING__BLOCK_SIZE` |
| `ZMQ_ENDPOINT` | `KVCACHE_EVENTS__ZMQ_BIND` (a JSON list) |
| `ZMQ_TOPIC` | `KVCACHE_EVENTS__TOPIC_FILTER` |
| `POOL_CONCURRENCY` | `KVCACHE_EVENTS__SHARDS` |
| `REDIS_ADDR` | `KVCACHE_INDEX__BACKEND=redis` and `KVCACHE_INDEX__REDIS__URL` |
| `HTTP_PORT` | `KVCACHE_HTTP__PORT` |
| `LOCAL_TOKENIZER_DIR` | `KVCACHE_TOKENIZATION__MODELS_DIR` |
| `HF_TOKEN` | read by the Hugging Face libraries themselves, never part of the config |

## Command-line flags

The flags of `kvcache serve` (and `kvcache config show`) that set config fields:

"""

_FIELDS_INTRO = """
## Fields

Types: "integer >= 1" and the like are validated bounds; "one of" lists the accepted strings.
"""

_UPSTREAM_INTRO = """
## The Go original's shape

A file is read in the Go original's shape when its top level has `indexerConfig`,
`kvEventsConfig`, `tokenProcessorConfig`, `speculativeIndexing` or `speculativeTTL` (the
parameters of llm-d's `{plugin}` scheduler plugin), when it is that plugin's object
(`{{"type": "{plugin}", "parameters": {{...}}}}`), or when it is a whole `EndpointPickerConfig`
holding exactly one such plugin. kvcache sections (`http`, `logging`, ...) may sit next to the
Go keys in the same object and win over the translation. Environment variables and flags apply
on top, as for any file.

How it is translated:

* Every Go field with a kvcache equivalent is mapped (table below). A field kvcache cannot
  honour, or does not know, is ignored with one warning naming it (logged at start, printed
  by `kvcache config show` on stderr). Values the Go original refuses are errors here too:
  a negative `blockSizeTokens`, an unknown `engineType`, a cost-aware size that does not parse.
* **Backend.** The Go original takes the first section present in the order
  `costAwareMemoryConfig`, `valkeyConfig`, `redisConfig`, `inMemoryConfig`; the translation
  sets `index.backend` the same way (a warning names the sections it ignores). In kvcache's own
  tree the backend is always explicit (`index.backend`), and the other sections are ignored.
  A Redis or Valkey section without `address` gets the Go default address.
* **Keys.** The Go original keys its index with its own FNV-1a request keys seeded by
  `hashSeed`; they never need to match the engines' hashes. kvcache's index holds the engines'
  own keys when it can reproduce them (identity mode), so the translation sets
  `hashing.scheme` to `{scheme}`, the algorithm llm-d deploys on its engines, and takes
  `hashSeed` as the engines' `PYTHONHASHSEED` (llm-d's guides set both to the same value;
  `""` means unset). If the engines hash differently, kvcache says which scheme they use and
  falls back to dual keys with the same scores. Set `hashing.scheme: llmd-fnv64a` (in the file
  next to the Go keys, or `KVCACHE_HASHING__SCHEME`) to key the index exactly as the Go
  original does.
* **Defaults.** Go fields left out take kvcache's defaults, with one exception: where events
  come from follows the Go defaults, so an existing deployment keeps its event source. Without
  `zmqEndpoint` nothing is bound (`events.zmq_bind: []`), and without `discoverPods` pod
  discovery is on (`discovery.enabled: true`). The kvcache defaults that differ from Go's are
  `podCacheSize` (256, Go 10), `topicFilter` ("", Go "kv@"; "" also takes llm-d's `kv@...`
  topics), `concurrency` (1 shard, Go 4; one shard ingests fastest in CPython) and
  `hf.enabled` (false, Go true).

"""

_LOGGING_PART = """
## Logs

Logs go to stderr; the banner saying where the service listens goes to stdout. With
`logging.format: text` a record is one line, `<time> <LEVEL> <logger>: <message>`, followed by
its context as `[pod=... seq=...]`. With `json` it is one JSON object per line:

```json
{"ts": "2026-01-02T03:04:05.678Z", "level": "warning", "logger": "kvcache.events.apply",
 "message": "...", "pod": "10.0.0.7:8000", "seq": 42}
```

`ts` is UTC, `level` is lower case, and every field a log call passes as `extra` (`pod`, `seq`,
`rank`, ...) is a key of its own; a traceback is in `exc_info`. Records of libraries (grpc,
zmq) and Python warnings go through the same handler.
"""


_SERVICE_LINKS = (
    "| `KVCACHE_…_SERVICE_HOST`, `KVCACHE_…_SERVICE_PORT…`, `KVCACHE_…_PORT_<n>_TCP…`, and "
    "`KVCACHE_…_PORT` whose value is a `tcp://`, `udp://` or `sctp://` URL | the service links "
    "Kubernetes injects for a Service named `kvcache` or `kvcache-…` |"
)


def render() -> str:
    """The whole of docs/configuration.md."""
    allowed = "\n".join(f"| `{name}` | {note} |" for name, note in ENV_NOT_SETTINGS.items())
    intro = _INTRO.format(
        secrets=", ".join(f"`{'.'.join(path)}`" for path in SECRET_FIELDS),
        urls=", ".join(f"`{'.'.join(path)}`" for path in URL_FIELDS),
        mask=MASK,
        allowed=allowed,
        service_links=_SERVICE_LINKS,
    )
    assert CONFIG_FILE_VARIABLE in ENV_NOT_SETTINGS
    upstream_intro = _UPSTREAM_INTRO.format(
        plugin=config_upstream.PLUGIN_TYPE, scheme=config_upstream.UPSTREAM_SCHEME
    )
    lines = [
        intro.rstrip("\n"),
        "",
        *_flags_part(),
        _FIELDS_INTRO.rstrip("\n"),
        *_fields_part(),
        upstream_intro.rstrip("\n"),
        "",
        *_upstream_part(),
        _LOGGING_PART.rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
