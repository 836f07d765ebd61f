"""The `kvcache` command line: `keys` and `tokenize` (debug a hash mismatch), `serve`, `config`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn, TextIO

import msgspec

from kvcache.config import Config
from kvcache.config_layers import LoadedConfig, Override, load
from kvcache.errors import KVCacheError
from kvcache.hashing import SCHEME_NAMES, RequestExtras, make_scheme

log = logging.getLogger("kvcache.config")


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one clear line (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _read_token_ids(stream: TextIO) -> list[int]:
    text = stream.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"stdin is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON array of token ids, got {type(data).__name__}")
    for position, value in enumerate(data):
        # bool is an int subclass in Python but never a token id.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"token id at index {position} is not an integer: {value!r}")
        if value < 0:
            raise ValueError(f"token id at index {position} is negative: {value}")
    return data


def _keys_command(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
    scheme = make_scheme(
        args.scheme, seed=args.seed, block_size=args.block_size, vllm_version=args.vllm_version
    )
    tokens = _read_token_ids(stdin)
    extras = None
    if args.lora_name is not None or args.cache_salt is not None:
        extras = RequestExtras(
            lora_name=args.lora_name, lora_path=args.lora_path, cache_salt=args.cache_salt
        )
    keys = scheme.block_keys(tokens, model=args.model, extras=extras)
    stdout.write(json.dumps(keys) + "\n")


def _tokenize_command(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
    # transformers warns on import that torch is missing; tokenizers need no torch.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from kvcache.config import TokenizationConfig
    from kvcache.tokenization import TextTokenizer, prepare_request

    model = args.model or ("default" if args.tokenizer else "")
    if not model:
        raise ValueError("give --model (a name under --models-dir) or --tokenizer PATH")
    config = TokenizationConfig(
        tokenizers={model: args.tokenizer} if args.tokenizer else {},
        models_dir=args.models_dir,
        chat_template=args.chat_template,
        trust_request_chat_template=True,
        prefix_store_bytes=0,
    )
    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        raise ValueError(f"--chat-template: no such file: {args.chat_template}")
    text = TextTokenizer(config)
    data = stdin.read()
    if args.chat:
        try:
            body = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"stdin is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(body, dict):
            raise ValueError("expected a chat-completions request body (a JSON object)")
        body = {**body, "model": model}
        (prompt,) = prepare_request(body, text, kind="chat")
        ids = prompt.token_ids
    else:
        ids = text.tokenize_completion(data, model)
    stdout.write(json.dumps(ids) + "\n")


FIELD_FLAGS: tuple[tuple[str, str], ...] = (
    ("http.host", "--http-host"),
    ("http.port", "--http-port"),
    ("grpc.host", "--grpc-host"),
    ("grpc.port", "--grpc-port"),
    ("hashing.scheme", "--hash-scheme"),
    ("hashing.seed", "--hash-seed"),
    ("hashing.block_size", "--block-size"),
    ("logging.format", "--log-format"),
    ("logging.level", "--log-level"),
)
"""Flags that set one config field as given."""


def config_overrides(args: argparse.Namespace) -> list[Override]:
    """The config fields the command-line flags set (the top layer), each named by its flag."""
    found: list[Override] = []

    def put(path: str, value: object, flag: str) -> None:
        found.append(Override(tuple(path.split(".")), value, flag))

    if args.zmq_endpoint is not None:
        put("events.zmq_bind", [args.zmq_endpoint], "--zmq-endpoint")
    if args.zmq_connect:
        put("events.zmq_connect", list(args.zmq_connect), "--zmq-connect")
        if args.zmq_endpoint is None:
            put("events.zmq_bind", [], "--zmq-connect")
    if args.index is not None:
        if args.index in ("memory", "cost_aware"):
            put("index.backend", args.index, "--index")
        else:
            put("index.backend", "redis", "--index")
            put("index.redis.url", args.index, "--index")
    for path, flag in FIELD_FLAGS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            put(path, value, flag)
    return found


def load_serve_config(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Defaults < config file (--config or KVCACHE_CONFIG) < KVCACHE_* variables < flags."""
    return load(args.config, environ=environ, overrides=config_overrides(args))


def serve_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """The effective config of `kvcache serve` (file warnings are logged)."""
    loaded = load_serve_config(args, environ)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    return loaded.config


def _config_command(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> None:
    if args.config_command == "schema":
        schema = msgspec.json.schema(Config)
        stdout.write(json.dumps(schema, indent=2) + "\n")
        return
    loaded = load_serve_config(args)
    for warning in loaded.warnings:
        stderr.write(f"kvcache config: warning: {warning}\n")
    data = loaded.config.redacted_mapping()
    if args.format == "yaml":
        try:
            import yaml
        except ImportError:
            raise ValueError("--format yaml needs PyYAML: pip install 'kvcache[service]'") from None
        stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        stdout.write(json.dumps(data, indent=2) + "\n")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that build the effective config, shared by `serve` and `config show`."""
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="config file: JSON or YAML, kvcache's tree or the Go original's shape "
        "(default: $KVCACHE_CONFIG, else embedded defaults)",
    )
    parser.add_argument(
        "--zmq-endpoint", default=None, help="endpoint to bind for events (default tcp://*:5557)"
    )
    parser.add_argument(
        "--zmq-connect",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="engine PUB endpoint to dial (repeatable); binds nothing (not even an"
        " events.zmq_bind from the config or environment) unless --zmq-endpoint is given",
    )
    parser.add_argument(
        "--index",
        default=None,
        metavar="BACKEND",
        help="memory (default), cost_aware, or a Redis/Valkey URL (redis://, rediss://, "
        "valkey://, valkeys://, unix://) for an index shared by several routers",
    )
    parser.add_argument("--http-host", default=None, help="HTTP interface (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8080)")
    parser.add_argument("--grpc-host", default=None, help="gRPC interface (default 127.0.0.1)")
    parser.add_argument(
        "--grpc-port", type=int, default=None, help="gRPC port (default: no gRPC listener)"
    )
    parser.add_argument("--hash-scheme", default=None, help=f"one of {', '.join(SCHEME_NAMES)}")
    parser.add_argument("--hash-seed", default=None, help="the engines' PYTHONHASHSEED")
    parser.add_argument("--block-size", type=int, default=None, help="the engines' block size")
    parser.add_argument(
        "--log-format", default=None, choices=("text", "json"), help="log lines (default text)"
    )
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        help="least severe level logged (default info)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    parser = _OneLineParser(prog="kvcache", description="KV-cache-aware routing for LLM fleets.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    keys = commands.add_parser(
        "keys",
        help="print the block keys of token ids read as a JSON array on stdin",
        description=(
            "Read token ids as a JSON array on stdin and print the block keys as a JSON array "
            "of unsigned 64-bit integers, the form engines publish in KV events."
        ),
    )
    keys.add_argument(
        "--scheme", default="sha256", help=f"one of {', '.join(SCHEME_NAMES)} (default sha256)"
    )
    keys.add_argument(
        "--seed",
        default=None,
        help="the engine's PYTHONHASHSEED (default: vLLM's rule, seed 'vllm-none-hash')",
    )
    keys.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    keys.add_argument("--lora-name", default=None, help="LoRA adapter name of the request")
    keys.add_argument(
        "--lora-path", default=None, help="LoRA adapter path (hashed by vLLM >= 0.31)"
    )
    keys.add_argument("--cache-salt", default=None, help="cache_salt of the request")
    keys.add_argument("--model", default="", help="model name (llmd-fnv64a scheme root)")
    keys.add_argument(
        "--vllm-version", default="0.32", help="vLLM release whose extra-key layout to use"
    )
    tokenize = commands.add_parser(
        "tokenize",
        help="print the token ids vLLM would use for a prompt (or chat body with --chat) on stdin",
        description=(
            "Read a completion prompt (plain text, taken exactly as given) on stdin, or with "
            "--chat an OpenAI chat-completions request body (JSON), and print the token ids "
            "vLLM would compute as a JSON array."
        ),
    )
    tokenize.add_argument("--chat", action="store_true", help="stdin is a chat request body")
    tokenize.add_argument("--model", default="", help="model name (found under --models-dir)")
    tokenize.add_argument(
        "--tokenizer", default=None, help="tokenizer directory or tokenizer.json of the model"
    )
    tokenize.add_argument(
        "--chat-template", default=None, metavar="FILE", help="chat template file to use"
    )
    tokenize.add_argument(
        "--models-dir", default=None, help="directory searched for <model>/tokenizer.json"
    )
    serve = commands.add_parser(
        "serve",
        help="run the service: ZMQ event ingest + HTTP scoring API",
        description="Run kvcache: ingest engines' KV events over ZMQ and answer score requests.",
    )
    _add_config_flags(serve)
    config = commands.add_parser(
        "config",
        help="print the effective configuration (show) or its JSON schema (schema)",
        description="Inspect the configuration kvcache serve would run with.",
    )
    config_commands = config.add_subparsers(
        dest="config_command", required=True, parser_class=_OneLineParser
    )
    show = config_commands.add_parser(
        "show",
        help="print the effective config: defaults < file < KVCACHE_* variables < flags",
        description=(
            "Print the config `kvcache serve` would run with, given the same file, environment "
            "and flags. Secrets are printed as ***; warnings about the file go to stderr."
        ),
    )
    show.add_argument(
        "--format", default="json", choices=("json", "yaml"), help="output format (default json)"
    )
    _add_config_flags(show)
    config_commands.add_parser("schema", help="print the JSON schema of the config file")
    _add_sim_command(commands)
    return parser


def _add_sim_command(commands: argparse._SubParsersAction[_OneLineParser]) -> None:
    """`kvcache sim`: the simulated fleet (kvcache.sim.run; docs/simulator.md)."""
    sim = commands.add_parser(
        "sim",
        help="compare routing policies on a simulated vLLM fleet feeding a real kvcache",
        description=(
            "Simulate a fleet of vLLM pods (prefix cache, batching, real KV events over ZMQ "
            "into an in-process kvcache), run every routing policy at each QPS, show the "
            "self-healing demo, and write results.json, results.csv and PNG plots."
        ),
    )
    sim.add_argument("--out", default="sim-results", metavar="DIR", help="output directory")
    sim.add_argument("--qps", default=None, help="comma-separated rates (default 50,100,200)")
    sim.add_argument("--pods", type=int, default=4, help="simulated pods (default 4)")
    sim.add_argument(
        "--workload",
        default="shared-prefix",
        help="shared-prefix (default), chat, long-tail or trace (with --trace)",
    )
    sim.add_argument("--trace", default=None, metavar="FILE", help="JSONL trace to replay")
    sim.add_argument("--requests", type=int, default=800, help="requests per run (default 800)")
    sim.add_argument("--seed", type=int, default=0, help="seed of workloads and faults")
    sim.add_argument("--policies", default=None, help="comma-separated subset of the policies")
    sim.add_argument(
        "--faults",
        default=None,
        help="faults in every run: drop=P,duplicate=P,delay=S,restart=T[@POD] (rates: KIND=V@POD)",
    )
    sim.add_argument(
        "--capacity-blocks", type=int, default=2048, help="KV blocks per pod (default 2048)"
    )
    sim.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    sim.add_argument("--layout", default="vllm-0.32", help="vLLM wire layout of the events")
    sim.add_argument(
        "--timing",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a timing constant, e.g. prefill_per_token=5e-5 (repeatable)",
    )
    sim.add_argument("--no-demo", action="store_true", help="skip the self-healing demo")
    sim.add_argument(
        "--router-tier",
        type=int,
        default=2,
        metavar="N",
        help="also run the highest rate behind N router replicas (default 2; 0 skips it)",
    )
    sim.add_argument(
        "--scrape-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="simulated seconds between the routers' scrapes of each pod's /metrics"
        " (default 0.015; 0 = every decision sees the live load)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kvcache` script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "keys":
            _keys_command(args, sys.stdin, sys.stdout)
        elif args.command == "tokenize":
            _tokenize_command(args, sys.stdin, sys.stdout)
        elif args.command == "config":
            _config_command(args, sys.stdout, sys.stderr)
        elif args.command == "sim":
            from kvcache.sim.run import sim_command

            sim_command(args)
        elif args.command == "serve":
            from kvcache.service.app import serve
            from kvcache.service.logs import configure_logging

            loaded = load_serve_config(args)
            # Logging first, so the file's warnings come out in the configured format.
            configure_logging(loaded.config.logging)
            for warning in loaded.warnings:
                log.warning("%s", warning)
            serve(loaded.config)
    except (KVCacheError, ValueError) as exc:
        print(f"kvcache {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
