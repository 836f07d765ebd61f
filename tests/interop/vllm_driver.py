"""Serve a real in-process vLLM engine over a line protocol, one request at a time.

Runs with the vLLM venv's python (never the project venv) and is started by
``test_vllm_interop.py``. The engine publishes its KV-cache events to ``--endpoint``; with a
``tcp://127.0.0.1:PORT`` endpoint vLLM *connects*, so kvcache's SUB must already be bound there.

Protocol: one JSON object per line. Commands arrive on stdin:

* ``{"op": "tokenize", "text": ...}`` -> ``{"ok": true, "token_ids": [...]}``: the ids a router
  gets from the model's ``tokenizer.json`` with the plain ``tokenizers`` library;
* ``{"op": "generate", "text": ..., "max_tokens": n}`` -> ``{"ok": true, "prompt_token_ids",
  "output_token_ids", "num_cached_tokens", "seconds"}``: greedy, ``ignore_eos``;
* ``{"op": "chat", "messages": [...], "chat_template": ..., "add_generation_prompt": bool,
  "continue_final_message": bool, "tools": [...] | null, "max_tokens": n}`` -> the same reply as
  ``generate``: ``LLM.chat()``, i.e. vLLM's own rendering and tokenization of a chat;
* ``{"op": "reset"}`` -> ``{"ok": true, "result": bool}``: ``LLM.reset_prefix_cache()``;
* ``{"op": "quit"}`` -> ``{"ok": true}``, then the engine shuts down.

Replies go to the ORIGINAL stdout only. Right at start-up, file descriptor 1 is duplicated for
the protocol and then pointed at stderr, so everything else written to fd 1 (vLLM's logs, the
engine-core and worker processes it spawns, C libraries) lands in stderr and can never corrupt
the protocol. The first line is ``{"ready": true, ...}`` with the effective engine settings, or
``{"ok": false, "error": ...}`` if the engine could not start. End of stdin also shuts down, so
the engine never outlives a test that died.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any


def _protocol_channel() -> IO[str]:
    """Keep fd 1 for the protocol; send everything else written to fd 1 to stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)  # inherited by vLLM's spawned processes too
    return channel


def _engine_args(options: argparse.Namespace) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": options.model,
        "tokenizer": options.model,
        "load_format": "dummy",  # random weights: nothing to download
        "dtype": "bfloat16",
        "seed": 0,
        "enforce_eager": True,  # torch.compile would add ~1 min of start-up, for nothing here
        "max_model_len": 512,
        "max_num_seqs": 4,
        "block_size": options.block_size,
        "enable_prefix_caching": True,
        # A small cache, so that the workload forces evictions (BlockRemoved events).
        "num_gpu_blocks_override": options.num_blocks,
        # A fraction of host memory on CPU; the GPU default (0.92) is refused there.
        "gpu_memory_utilization": 0.3,
        "kv_events_config": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": options.endpoint,
            "topic": options.topic,
        },
    }
    if options.hash_algo != "default":
        # "default" leaves the option out altogether, to test vLLM's own default.
        args["prefix_caching_hash_algo"] = options.hash_algo
    return args


def _serve(options: argparse.Namespace, reply: Any) -> None:
    started = time.monotonic()
    import vllm  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from tokenizers import Tokenizer  # type: ignore[import-not-found, import-untyped, unused-ignore]

    imported = time.monotonic()
    llm = vllm.LLM(**_engine_args(options))
    ready = time.monotonic()
    cache = llm.llm_engine.vllm_config.cache_config
    router_tokenizer = Tokenizer.from_file(str(Path(options.model) / "tokenizer.json"))
    reply(
        {
            "ready": True,
            "vllm_version": vllm.__version__,
            "block_size": cache.block_size,
            "num_gpu_blocks": cache.num_gpu_blocks,
            "prefix_caching_hash_algo": str(cache.prefix_caching_hash_algo),
            "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
            "import_seconds": round(imported - started, 2),
            "engine_start_seconds": round(ready - imported, 2),
        }
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.get("op")
        try:
            if op == "tokenize":
                ids = router_tokenizer.encode(command["text"]).ids
                reply({"ok": True, "token_ids": list(ids)})
            elif op == "generate":
                params = vllm.SamplingParams(
                    max_tokens=int(command["max_tokens"]), temperature=0.0, ignore_eos=True
                )
                begun = time.monotonic()
                (output,) = llm.generate([command["text"]], params, use_tqdm=False)
                reply(
                    {
                        "ok": True,
                        "prompt_token_ids": list(output.prompt_token_ids),
                        "output_token_ids": list(output.outputs[0].token_ids),
                        "num_cached_tokens": output.num_cached_tokens,
                        "seconds": round(time.monotonic() - begun, 4),
                    }
                )
            elif op == "chat":
                params = vllm.SamplingParams(
                    max_tokens=int(command["max_tokens"]), temperature=0.0, ignore_eos=True
                )
                begun = time.monotonic()
                (output,) = llm.chat(
                    command["messages"],
                    params,
                    use_tqdm=False,
                    chat_template=command["chat_template"],
                    add_generation_prompt=bool(command["add_generation_prompt"]),
                    continue_final_message=bool(command["continue_final_message"]),
                    tools=command.get("tools"),
                )
                reply(
                    {
                        "ok": True,
                        "prompt_token_ids": list(output.prompt_token_ids),
                        "output_token_ids": list(output.outputs[0].token_ids),
                        "num_cached_tokens": output.num_cached_tokens,
                        "seconds": round(time.monotonic() - begun, 4),
                    }
                )
            elif op == "reset":
                reply({"ok": True, "result": bool(llm.reset_prefix_cache())})
            elif op == "quit":
                reply({"ok": True})
                break
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception:  # report it on the channel; the test decides what it means
            reply({"ok": False, "error": traceback.format_exc()})
    # Shut the engine core down explicitly instead of relying on interpreter exit.
    llm.llm_engine.engine_core.shutdown()


def main() -> int:
    channel = _protocol_channel()

    def reply(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--hash-algo", default="default")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--num-blocks", type=int, default=24)
    options = parser.parse_args()
    try:
        _serve(options, reply)
    except Exception:
        reply({"ok": False, "error": traceback.format_exc()})
        return 1
    return 0


# The guard is required: vLLM starts its engine core and worker with spawn, which re-imports
# this module in the children.
if __name__ == "__main__":
    sys.exit(main())
