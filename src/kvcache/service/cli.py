"""The `kvcache` command line: `keys` and `tokenize` (debug a hash mismatch) and `serve`."""

from __future__ import annotations

import argparse
import json
import os
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
    if args.index is not None:
        data["index"]["backend"] = args.index if args.index in ("memory", "cost_aware") else "redis"
        if data["index"]["backend"] == "redis":
            data["index"]["redis"]["url"] = args.index
    for section, key, value in (
        ("http", "host", args.http_host),
        ("http", "port", args.http_port),
        ("grpc", "host", args.grpc_host),
        ("grpc", "port", args.grpc_port),
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
    serve.add_argument(
        "--index",
        default=None,
        metavar="BACKEND",
        help="memory (default), cost_aware, or a Redis/Valkey URL (redis://, rediss://, "
        "valkey://, valkeys://, unix://) for an index shared by several routers",
    )
    serve.add_argument("--http-host", default=None, help="HTTP interface (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8080)")
    serve.add_argument("--grpc-host", default=None, help="gRPC interface (default 127.0.0.1)")
    serve.add_argument(
        "--grpc-port", type=int, default=None, help="gRPC port (default: no gRPC listener)"
    )
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
        elif args.command == "tokenize":
            _tokenize_command(args, sys.stdin, sys.stdout)
        elif args.command == "serve":
            from kvcache.service.app import serve

            serve(serve_config(args))
    except (KVCacheError, ValueError) as exc:
        print(f"kvcache {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
