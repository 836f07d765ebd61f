"""The `kvcache` command line: `kvcache keys` (debug a hash mismatch) and, later, `serve`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from kvcache.config import Config
from kvcache.errors import KVCacheError
from kvcache.hashing import SCHEME_NAMES, RequestExtras, make_scheme


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


def serve_config(args: argparse.Namespace) -> Config:
    """The config file (or embedded defaults) with the command-line flags applied on top."""
    config = Config.from_file(args.config) if args.config else Config()
    data = config.to_mapping()
    if args.zmq_endpoint is not None:
        data["events"]["zmq_bind"] = [args.zmq_endpoint]
    if args.zmq_connect:
        data["events"]["zmq_connect"] = list(args.zmq_connect)
        if args.zmq_endpoint is None:
            data["events"]["zmq_bind"] = []
    for section, key, value in (
        ("http", "host", args.http_host),
        ("http", "port", args.http_port),
        ("hashing", "scheme", args.hash_scheme),
        ("hashing", "seed", args.hash_seed),
        ("hashing", "block_size", args.block_size),
    ):
        if value is not None:
            data[section][key] = value
    return Config.from_mapping(data)


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
    serve = commands.add_parser(
        "serve",
        help="run the service: ZMQ event ingest + HTTP scoring API",
        description="Run kvcache: ingest engines' KV events over ZMQ and answer score requests.",
    )
    serve.add_argument("--config", default=None, help="JSON config file (defaults embedded)")
    serve.add_argument(
        "--zmq-endpoint", default=None, help="endpoint to bind for events (default tcp://*:5557)"
    )
    serve.add_argument(
        "--zmq-connect",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="engine PUB endpoint to dial (repeatable); disables the default bind",
    )
    serve.add_argument("--http-host", default=None, help="HTTP interface (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8080)")
    serve.add_argument("--hash-scheme", default=None, help=f"one of {', '.join(SCHEME_NAMES)}")
    serve.add_argument("--hash-seed", default=None, help="the engines' PYTHONHASHSEED")
    serve.add_argument("--block-size", type=int, default=None, help="the engines' block size")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kvcache` script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "keys":
            _keys_command(args, sys.stdin, sys.stdout)
        elif args.command == "serve":
            from kvcache.service.app import serve

            serve(serve_config(args))
    except (KVCacheError, ValueError) as exc:
        print(f"kvcache {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
