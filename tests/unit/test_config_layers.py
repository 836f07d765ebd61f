"""Config layers: JSON/YAML files, KVCACHE_* variables, flags, precedence, the Go shape, masking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvcache.config import Config
from kvcache.config_layers import Override, load, read_file
from kvcache.errors import ConfigError
from kvcache.service.cli import build_parser, serve_config

NATIVE_YAML = """\
hashing:
  scheme: sha256_cbor
  seed: "42"
  block_size: 32
index:
  backend: redis
  redis: {url: "valkey://valkey:6379", ttl_seconds: 600}
events:
  zmq_connect: ["tcp://10.0.0.7:5557"]
http: {host: 0.0.0.0, port: 9000}
logging: {format: json}
"""


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _go_file(tmp_path: Path, data: dict[str, Any]) -> str:
    return _write(tmp_path, "upstream.json", json.dumps(data))


# -- files ----------------------------------------------------------------------------------------


def test_yaml_file_sets_the_fields_it_names_and_keeps_defaults_elsewhere(tmp_path: Path) -> None:
    config = Config.from_file(_write(tmp_path, "kvcache.yaml", NATIVE_YAML))
    assert config.hashing.scheme == "sha256_cbor"
    assert config.hashing.seed == "42"
    assert config.hashing.block_size == 32
    assert config.index.backend == "redis"
    assert config.index.redis.url == "valkey://valkey:6379"
    assert config.index.redis.ttl_seconds == 600.0
    assert config.events.zmq_connect == ["tcp://10.0.0.7:5557"]
    assert config.http.host == "0.0.0.0"
    assert config.http.port == 9000
    assert config.logging.format == "json"
    assert config.http.max_pods == Config().http.max_pods
    assert config.events.zmq_bind == ["tcp://*:5557"]


def test_json_yaml_and_sniffed_files_with_the_same_content_load_the_same(tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load(NATIVE_YAML)
    from_yaml = Config.from_file(_write(tmp_path, "a.yml", NATIVE_YAML))
    from_json = Config.from_file(_write(tmp_path, "a.json", json.dumps(data)))
    sniffed_json = Config.from_file(_write(tmp_path, "a.conf", json.dumps(data)))
    sniffed_yaml = Config.from_file(_write(tmp_path, "b.conf", NATIVE_YAML))
    assert from_yaml == from_json == sniffed_json == sniffed_yaml
    assert from_yaml != Config()


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    assert Config.from_file(_write(tmp_path, "empty.yaml", "")) == Config()


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("dup.yaml", "http:\n  port: 1\n  port: 2\n", "duplicate key 'port' at line 3"),
        ("bad.yaml", "http: [unclosed\n", "not valid YAML"),
        ("bad.json", '{"http": ', "not valid JSON"),
        ("list.yaml", "- 1\n- 2\n", "must hold a mapping, not list"),
    ],
)
def test_malformed_files_fail_naming_the_file(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert info.value.field == path
    assert expected in str(info.value)


def test_a_bad_value_in_a_file_names_the_field_and_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.yaml", "http:\n  port: 70000\n")
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert info.value.field == "$.http.port"
    assert path in str(info.value)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.from_file(str(tmp_path / "missing.json"))


# -- environment ----------------------------------------------------------------------------------


def test_environment_values_are_parsed_by_the_field_type() -> None:
    config = load(
        environ={
            "KVCACHE_HTTP__PORT": "9000",
            "KVCACHE_HTTP__HOST": "0.0.0.0",
            "KVCACHE_HASHING__SEED": "42",  # a text field: stays the string "42"
            "KVCACHE_HASHING__SCHEME": "xxhash_cbor",
            "KVCACHE_DISCOVERY__ENABLED": "yes",
            "KVCACHE_EVENTS__DP_RANK_IN_POD_ID": "1",
            "KVCACHE_EVENTS__ZMQ_CONNECT": '["tcp://a:1", "tcp://b:2"]',
            "KVCACHE_GRPC__PORT": "null",
            "KVCACHE_INDEX__REDIS__TIMEOUT_MS": "12.5",
            "KVCACHE_INDEX__REDIS__URL": "rediss://u:p@h:6380/2",
            "KVCACHE_SCORING__TIER_WEIGHTS": '{"gpu": 1, "disk": 0.25}',
            "KVCACHE_INDEX__COST_AWARE__BUDGET": "512MiB",
        }
    ).config
    assert config.http.port == 9000
    assert config.http.host == "0.0.0.0"
    assert config.hashing.seed == "42"
    assert config.hashing.scheme == "xxhash_cbor"
    assert config.discovery.enabled is True
    assert config.events.dp_rank_in_pod_id is True
    assert config.events.zmq_connect == ["tcp://a:1", "tcp://b:2"]
    assert config.grpc.port is None
    assert config.index.redis.timeout_ms == 12.5
    assert config.index.redis.url == "rediss://u:p@h:6380/2"
    assert config.scoring.tier_weights == {"gpu": 1.0, "disk": 0.25}
    assert config.index.cost_aware.budget == "512MiB"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KVCACHE_HTTP__PORT", "abc", "expected integer >= 0 and <= 65535, got 'abc'"),
        ("KVCACHE_HTTP__PORT", "70000", "expected integer >= 0 and <= 65535, got 70000"),
        ("KVCACHE_DISCOVERY__ENABLED", "maybe", "expected boolean, got 'maybe'"),
        ("KVCACHE_INDEX__BACKEND", "cassandra", 'expected one of "cost_aware", "memory"'),
        ("KVCACHE_EVENTS__ZMQ_BIND", "tcp://*:1", "expected list of string"),
        ("KVCACHE_SCORING__TIER_WEIGHTS", '{"gpu": -1}', "expected object of number >= 0.0"),
        ("KVCACHE_HTTP_PORT", "9000", "did you mean KVCACHE_HTTP__PORT?"),
        ("KVCACHE_HTTP__PORTS", "9000", "unknown setting"),
        ("KVCACHE_HTTP__PORT__X", "1", "unknown setting"),
        ("KVCACHE_NOPE__FIELD", "1", "unknown setting"),
        ("KVCACHE_HTTP", '{"port": 1}', "names a section; set its fields, e.g. KVCACHE_HTTP__"),
    ],
)
def test_bad_or_unknown_variables_fail_naming_the_variable(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={name: value})
    assert info.value.field == name
    assert expected in str(info.value)


def test_variables_that_are_not_settings_are_ignored() -> None:
    environ = {
        "KVCACHE_INTEROP_VENV": "/somewhere",
        "KVCACHE_INTEROP_PYTHON": "python3",
        # Service links Kubernetes injects for Services named kvcache and kvcache-zmq:
        "KVCACHE_SERVICE_HOST": "10.96.0.12",
        "KVCACHE_SERVICE_PORT": "8080",
        "KVCACHE_SERVICE_PORT_HTTP": "8080",
        "KVCACHE_PORT": "tcp://10.96.0.12:8080",
        "KVCACHE_PORT_8080_TCP": "tcp://10.96.0.12:8080",
        "KVCACHE_PORT_8080_TCP_PROTO": "tcp",
        "KVCACHE_PORT_8080_TCP_PORT": "8080",
        "KVCACHE_PORT_8080_TCP_ADDR": "10.96.0.12",
        "KVCACHE_ZMQ_PORT": "tcp://10.96.0.13:5557",
        "KVCACHE_ZMQ_SERVICE_HOST": "10.96.0.13",
        "PYTHONHASHSEED": "42",  # never read: it is not the engines' seed here
        "kvcache_http__port": "1",  # lower case: not ours
    }
    assert load(environ=environ).config == Config()


def test_kvcache_config_names_the_file_and_the_flag_wins(tmp_path: Path) -> None:
    env_file = _write(tmp_path, "env.yaml", "http: {port: 1111}\n")
    flag_file = _write(tmp_path, "flag.yaml", "http: {port: 2222}\n")
    assert load(environ={"KVCACHE_CONFIG": env_file}).config.http.port == 1111
    assert load(flag_file, environ={"KVCACHE_CONFIG": env_file}).config.http.port == 2222


# -- precedence -----------------------------------------------------------------------------------


def test_precedence_defaults_file_environment_flags(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "p.yaml",
        "http: {port: 1000, host: 10.0.0.1, max_pods: 7}\nhashing: {block_size: 32}\n",
    )
    environ = {"KVCACHE_HTTP__PORT": "2000", "KVCACHE_HTTP__HOST": "10.0.0.2"}
    flags = [Override(("http", "port"), 3000, "--http-port")]
    config = load(path, environ=environ, overrides=flags).config
    assert config.http.port == 3000  # flag > environment > file
    assert config.http.host == "10.0.0.2"  # environment > file
    assert config.http.max_pods == 7  # file > default
    assert config.hashing.block_size == 32
    assert config.http.max_tokens == 1 << 20  # default


def test_serve_flags_are_the_top_layer(tmp_path: Path) -> None:
    path = _write(tmp_path, "s.json", json.dumps({"events": {"zmq_bind": ["tcp://*:6000"]}}))
    args = build_parser().parse_args(
        [
            *("serve", "--config", path, "--zmq-connect", "tcp://e:1", "--index", "valkey://v:1"),
            *("--log-format", "json", "--log-level", "DEBUG", "--hash-seed", "7"),
        ]
    )
    environ = {"KVCACHE_LOGGING__FORMAT": "text", "KVCACHE_HASHING__SEED": "5"}
    config = serve_config(args, environ)
    assert config.events.zmq_connect == ["tcp://e:1"]
    assert config.events.zmq_bind == []  # --zmq-connect without --zmq-endpoint: dial only
    assert (config.index.backend, config.index.redis.url) == ("redis", "valkey://v:1")
    assert (config.logging.format, config.logging.level) == ("json", "debug")
    assert config.hashing.seed == "7"


def test_a_bad_flag_value_names_the_flag() -> None:
    args = build_parser().parse_args(["serve", "--http-port", "99999"])
    with pytest.raises(ConfigError) as info:
        serve_config(args, {})
    assert info.value.field == "--http-port"


# -- masking --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:hunter2@redis:6379/0", "redis://user:***@redis:6379/0"),
        ("rediss://:hunter2@redis:6380", "rediss://:***@redis:6380"),
        (
            "unix:///run/redis.sock?password=hunter2&db=1",
            "unix:///run/redis.sock?password=***&db=1",
        ),
        ("valkey://valkey:6379", "valkey://valkey:6379"),
    ],
)
def test_secrets_are_masked(url: str, masked: str) -> None:
    config = Config.from_mapping({"index": {"redis": {"url": url}}, "http": {"token": "s3cret"}})
    data = config.redacted_mapping()
    assert data["index"]["redis"]["url"] == masked
    assert data["http"]["token"] == "***"
    assert "hunter2" not in json.dumps(data) and "s3cret" not in json.dumps(data)
    assert config.index.redis.url == url  # only the printed copy is masked


def test_absent_token_stays_null_when_masked() -> None:
    assert Config().redacted_mapping()["http"]["token"] is None


# -- the Go original's shape ---------------------------------------------------------------------

# An llm-d EndpointPickerConfig for precise prefix-cache routing, written from the reference
# (upstream-behaviour.md §2.11 and §3): the scorer plugin's parameters, with other plugins.
EPP_YAML = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig:
      blockSize: 64
      hashSeed: "42"
    indexerConfig:
      kvBlockIndexConfig:
        enableMetrics: true
        metricsLoggingInterval: 60000000000
      tokenizersPoolConfig:
        modelName: Qwen/Qwen3-32B
        hf:
          tokenizersCacheDir: /tmp/tokenizers
    kvEventsConfig:
      topicFilter: "kv@"
      concurrency: 4
      discoverPods: true
      podDiscoveryConfig:
        socketPort: 5556
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
    weight: 3.0
"""


def test_an_llm_d_endpoint_picker_config_translates(tmp_path: Path) -> None:
    config, warnings = read_file(_write(tmp_path, "epp.yaml", EPP_YAML))
    assert config.hashing.block_size == 64
    assert config.hashing.seed == "42"
    assert config.hashing.scheme == "sha256_cbor"  # what llm-d's engines hash with
    assert config.events.topic_filter == "kv@"
    assert config.events.shards == 4
    assert config.events.zmq_bind == []  # no zmqEndpoint: nothing bound, as in Go
    assert config.discovery.enabled is True
    assert config.discovery.socket_port == 5556
    assert config.discovery.label_selector == "llm-d.ai/inference-serving=true"
    assert config.index.backend == "memory"
    assert config.index.memory.pod_cache_size == 256  # left out: kvcache's default
    ignored = {warning.split(":")[0] for warning in warnings}
    assert ignored == {
        "indexerConfig.kvBlockIndexConfig.metricsLoggingInterval",
        "indexerConfig.tokenizersPoolConfig.modelName",
        "indexerConfig.tokenizersPoolConfig.hf.tokenizersCacheDir",
    }


def test_the_plugin_object_and_its_bare_parameters_translate_alike(tmp_path: Path) -> None:
    parameters = {
        "tokenProcessorConfig": {"blockSizeTokens": 16, "hashSeed": ""},
        "kvEventsConfig": {"zmqEndpoint": "tcp://*:5557", "discoverPods": False},
    }
    plugin = {"type": "precise-prefix-cache-scorer", "parameters": parameters}
    bare = Config.from_file(_go_file(tmp_path, parameters))
    wrapped = Config.from_file(_write(tmp_path, "plugin.json", json.dumps(plugin)))
    assert bare == wrapped
    assert bare.hashing.seed is None  # "" is Go's "no seed"
    assert bare.events.zmq_bind == ["tcp://*:5557"]
    assert bare.discovery.enabled is False


def test_an_endpoint_picker_config_without_the_scorer_is_an_error(tmp_path: Path) -> None:
    text = "kind: EndpointPickerConfig\nplugins:\n- type: max-score-picker\n"
    with pytest.raises(ConfigError, match="expected one plugin of type precise-prefix-cache"):
        Config.from_file(_write(tmp_path, "epp.yaml", text))


def test_go_index_sections_map_to_the_index(tmp_path: Path) -> None:
    data = {
        "indexerConfig": {
            "kvBlockIndexConfig": {"inMemoryConfig": {"size": 5000, "podCacheSize": 10}},
            "kvCacheBackendConfigs": [
                {"name": "gpu", "weight": 1.0},
                {"name": "cpu", "weight": 0.5},
            ],
        },
    }
    config, warnings = read_file(_go_file(tmp_path, data))
    assert warnings == ()
    assert config.index.backend == "memory"
    assert config.index.memory.size == 5000
    assert config.index.memory.pod_cache_size == 10
    assert config.scoring.tier_weights == {"gpu": 1.0, "cpu": 0.5}


@pytest.mark.parametrize(
    ("sections", "backend", "url"),
    [
        ({"costAwareMemoryConfig": {"size": "1GiB"}, "redisConfig": {}}, "cost_aware", None),
        (
            {"valkeyConfig": {"address": "valkey://v:1"}, "redisConfig": {"address": "r:2"}},
            "redis",
            "valkey://v:1",
        ),
        ({"redisConfig": {}, "inMemoryConfig": {"size": 10}}, "redis", "redis://127.0.0.1:6379"),
        ({"valkeyConfig": {"backendType": "valkey"}}, "redis", "valkey://127.0.0.1:6379"),
        ({"inMemoryConfig": {"size": 10}, "redisConfig": None}, "memory", None),
    ],
)
def test_the_backend_is_chosen_in_the_go_order(
    tmp_path: Path, sections: dict[str, Any], backend: str, url: str | None
) -> None:
    data = {"indexerConfig": {"kvBlockIndexConfig": sections}}
    config, warnings = read_file(_go_file(tmp_path, data))
    assert config.index.backend == backend
    if url is not None:
        assert config.index.redis.url == url
    present = [name for name, value in sections.items() if value is not None]
    # Every section beyond the first one present is named as ignored.
    assert any("the other backends are ignored" in w for w in warnings) == (len(present) > 1)


def test_go_cost_aware_sizes_use_go_humanize_units(tmp_path: Path) -> None:
    from kvcache.index.cost_aware import parse_size

    data = {"indexerConfig": {"kvBlockIndexConfig": {"costAwareMemoryConfig": {"size": "42 MB"}}}}
    config = Config.from_file(_go_file(tmp_path, data))
    assert config.index.backend == "cost_aware"
    assert parse_size(config.index.cost_aware.budget) == 42 * 10**6  # go-humanize: MB = 10**6


@pytest.mark.parametrize(
    ("data", "field", "expected"),
    [
        (
            {"tokenProcessorConfig": {"blockSizeTokens": -4}},
            "tokenProcessorConfig.blockSizeTokens",
            "blockSizeTokens must be greater than 0, got -4",
        ),
        (
            {"kvEventsConfig": {"engineType": "trtllm"}},
            "kvEventsConfig.engineType",
            "unknown engine type 'trtllm'",
        ),
        (
            {"indexerConfig": {"kvBlockIndexConfig": {"costAwareMemoryConfig": {"size": "lots"}}}},
            "indexerConfig.kvBlockIndexConfig.costAwareMemoryConfig.size",
            "cannot parse size 'lots'",
        ),
        (
            {"indexerConfig": {"kvBlockIndexConfig": {"inMemoryConfig": {"size": "big"}}}},
            "indexerConfig.kvBlockIndexConfig.inMemoryConfig.size",
            "kvcache field index.memory.size",
        ),
        (
            {"kvEventsConfig": {"podDiscoveryConfig": {"socketPort": 0}}},
            "kvEventsConfig.podDiscoveryConfig.socketPort",
            "kvcache field discovery.socket_port",
        ),
        (
            {"indexerConfig": {"kvCacheBackendConfigs": [{"name": "gpu", "weight": -1}]}},
            "indexerConfig.kvCacheBackendConfigs",
            "kvcache field scoring.tier_weights",
        ),
        (
            {"indexerConfig": {"kvCacheBackendConfigs": [{"weight": 1}]}},
            "indexerConfig.kvCacheBackendConfigs[0]",
            "expected {name: string, weight: number}",
        ),
        ({"indexerConfig": 5}, "indexerConfig", "expected an object, got int"),
    ],
)
def test_go_values_the_go_original_refuses_fail_naming_the_go_field(
    tmp_path: Path, data: dict[str, Any], field: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_file(_go_file(tmp_path, data))
    assert info.value.field == field
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("processor", "size"),
    [
        ({"blockSizeTokens": 32, "blockSize": 64}, 32),  # blockSizeTokens wins
        ({"blockSizeTokens": 0, "blockSize": 64}, 64),  # 0 means "not set"
        ({"blockSize": 64}, 64),
        ({}, 16),
    ],
)
def test_go_block_size_rules(tmp_path: Path, processor: dict[str, int], size: int) -> None:
    config = Config.from_file(_go_file(tmp_path, {"tokenProcessorConfig": processor}))
    assert config.hashing.block_size == size


def test_the_old_token_processor_location_is_read_unless_the_new_one_is_set(
    tmp_path: Path,
) -> None:
    old = {"indexerConfig": {"tokenProcessorConfig": {"blockSize": 48, "hashSeed": "7"}}}
    config, warnings = read_file(_go_file(tmp_path, old))
    assert (config.hashing.block_size, config.hashing.seed, warnings) == (48, "7", ())
    both = {**old, "tokenProcessorConfig": {"blockSize": 96}}
    config, warnings = read_file(_go_file(tmp_path, both))
    assert (config.hashing.block_size, config.hashing.seed) == (96, None)
    assert any("the old location" in warning for warning in warnings)


def test_go_tokenizer_settings_map_and_the_rest_is_warned(tmp_path: Path) -> None:
    data = {
        "indexerConfig": {
            "tokenizersPoolConfig": {
                "workersCount": 3,
                "local": {
                    "autoDiscoveryDir": "/models",
                    "autoDiscoveryTokenizerFileName": "tokenizer.json",
                    "modelTokenizerMap": {"a/b": "/models/a-b"},
                },
                "uds": {"socketFile": "/tmp/t.sock", "modelTokenizerMap": {"c/d": "/m/c"}},
                "hf": {"enabled": True, "huggingFaceToken": "hf_secret"},
            }
        }
    }
    config, warnings = read_file(_go_file(tmp_path, data))
    assert config.tokenization.workers == 3
    assert config.tokenization.models_dir == "/models"
    assert config.tokenization.tokenizers == {"a/b": "/models/a-b", "c/d": "/m/c"}
    assert config.tokenization.allow_hub is True
    ignored = {warning.split(":")[0] for warning in warnings}
    assert ignored == {
        "indexerConfig.tokenizersPoolConfig.uds.socketFile",
        "indexerConfig.tokenizersPoolConfig.hf.huggingFaceToken",
    }
    assert not any("hf_secret" in warning for warning in warnings)


def test_unknown_and_unsupported_go_fields_are_warned_not_dropped(tmp_path: Path) -> None:
    data = {
        "speculativeIndexing": True,
        "speculativeTTL": "2s",
        "kvEventsConfig": {"zmqEndpoint": "tcp://*:5557", "discoverPods": False, "typo": 1},
        "indexerConfig": {"kvBlockIndexConfig": {"redisConfig": {"enableRDMA": True}}},
    }
    _, warnings = read_file(_go_file(tmp_path, data))
    ignored = {warning.split(":")[0] for warning in warnings}
    assert ignored == {
        "speculativeIndexing",
        "speculativeTTL",
        "kvEventsConfig.typo",
        "indexerConfig.kvBlockIndexConfig.redisConfig.enableRDMA",
    }


def test_quiet_go_values_produce_no_warning(tmp_path: Path) -> None:
    data = {
        "speculativeIndexing": False,
        "indexerConfig": {
            "kvBlockIndexConfig": {
                "enableMetrics": False,
                "metricsLoggingInterval": 0,
                "redisConfig": {"enableRDMA": False, "backendType": "redis"},
            }
        },
        "kvEventsConfig": {"engineType": "sglang"},
    }
    assert read_file(_go_file(tmp_path, data))[1] == ()


def test_kvcache_sections_next_to_go_keys_win(tmp_path: Path) -> None:
    data = {
        "tokenProcessorConfig": {"blockSize": 64, "hashSeed": "42"},
        "kvEventsConfig": {"discoverPods": False},
        "hashing": {"scheme": "llmd-fnv64a"},
        "events": {"zmq_bind": ["tcp://*:7000"]},
        "http": {"port": 9100},
    }
    config = Config.from_file(_go_file(tmp_path, data))
    assert config.hashing.scheme == "llmd-fnv64a"
    assert (config.hashing.block_size, config.hashing.seed) == (64, "42")  # still from Go
    assert config.events.zmq_bind == ["tcp://*:7000"]
    assert config.http.port == 9100


def test_a_bad_kvcache_value_next_to_go_keys_names_the_kvcache_field(tmp_path: Path) -> None:
    data = {"tokenProcessorConfig": {"blockSize": 64}, "hashing": {"block_size": 0}}
    with pytest.raises(ConfigError) as info:
        Config.from_file(_go_file(tmp_path, data))
    assert info.value.field == "$.hashing.block_size"


def test_environment_applies_over_a_go_shaped_file(tmp_path: Path) -> None:
    path = _go_file(tmp_path, {"tokenProcessorConfig": {"blockSize": 64, "hashSeed": "42"}})
    environ = {"KVCACHE_HASHING__SCHEME": "llmd-fnv64a", "KVCACHE_DISCOVERY__ENABLED": "false"}
    config = load(path, environ=environ).config
    assert (config.hashing.scheme, config.hashing.seed) == ("llmd-fnv64a", "42")
    assert config.discovery.enabled is False
