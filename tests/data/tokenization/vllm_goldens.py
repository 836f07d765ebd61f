"""Produce vllm_goldens.json with real vLLM's renderer (run with the interop venv's python).

    ~/.cache/kvcache-interop/venv/bin/python tests/data/tokenization/vllm_goldens.py

It writes the ChatML test model (tests/unit/tokenization/models.py, BOS-adding post-processor)
plus a tiny Llama config.json to a temporary directory, builds vLLM 0.32's HfRenderer for it
(offline, no engine, no weights) and renders every case through the same request classes and
calls vLLM's OpenAI server uses: CompletionRequest/ChatCompletionRequest.build_tok_params,
ChatCompletionRequest.build_chat_params(...).with_defaults({"tools": ..., "tokenize": False}),
then renderer.render_cmpl / render_chat. The token ids land in the JSON next to each case;
tests/unit/tokenization/test_vllm_goldens.py replays the cases through kvcache.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "unit" / "tokenization"))

import models  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
LONG = "Prefix caching reuses blocks. " * 40

CASES: list[dict[str, Any]] = [
    {"kind": "completion", "body": {"prompt": "Hello, world!"}},
    {"kind": "completion", "body": {"prompt": "Hello, world!", "add_special_tokens": False}},
    {"kind": "completion", "body": {"prompt": "  leading spaces\n\n\ttabs 東京 🙂 <|im_end|> x"}},
    {"kind": "completion", "body": {"prompt": LONG, "truncate_prompt_tokens": 20}},
    {
        "kind": "completion",
        "body": {"prompt": LONG, "truncate_prompt_tokens": 20, "add_special_tokens": False},
    },
    {
        "kind": "completion",
        "body": {"prompt": LONG, "truncate_prompt_tokens": 20, "truncation_side": "left"},
    },
    {
        "kind": "completion",
        "body": {"prompt": LONG, "truncate_prompt_tokens": 20, "truncation_side": "right"},
    },
    {"kind": "completion", "body": {"prompt": [5, 6, 7, 8, 9, 10], "truncate_prompt_tokens": 4}},
    {"kind": "chat", "body": {"messages": [{"role": "user", "content": "Hi there"}]}},
    {
        "kind": "chat",
        "body": {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "part one"},
                        {"type": "text", "text": "part two"},
                    ],
                },
            ]
        },
    },
    {
        "kind": "chat",
        "body": {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": TOOLS,
        },
    },
    {
        "kind": "chat",
        "body": {
            "messages": [{"role": "user", "content": "Think?"}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
    },
    {
        "kind": "chat",
        "body": {
            "messages": [
                {"role": "user", "content": "Finish this:"},
                {"role": "assistant", "content": "The answer is"},
            ],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
    },
    {
        "kind": "chat",
        "body": {
            "messages": [{"role": "user", "content": "With docs"}],
            "documents": [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}],
        },
    },
    {
        "kind": "chat",
        "body": {
            "messages": [
                {"role": "developer", "content": "Dev rules"},
                {"role": "user", "content": "Hello"},
            ]
        },
    },
    {
        "kind": "chat",
        "body": {
            "messages": [{"role": "user", "content": "add special"}],
            "add_special_tokens": True,
        },
    },
    {
        "kind": "chat",
        "body": {"messages": [{"role": "user", "content": LONG}], "truncate_prompt_tokens": 16},
    },
    {
        "kind": "chat",
        "body": {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            "chat_template": models.STRING_TEMPLATE,
        },
    },
]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.config import ModelConfig, VllmConfig  # type: ignore[import-not-found]
    from vllm.entrypoints.openai.chat_completion.protocol import (  # type: ignore[import-not-found]
        ChatCompletionRequest,
    )
    from vllm.entrypoints.openai.completion.protocol import (  # type: ignore[import-not-found]
        CompletionRequest,
    )
    from vllm.renderers.registry import renderer_from_config  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = models.write_chatml_model(Path(tmp) / "chatml", add_bos=True)
        sys.path.insert(0, str(HERE.parents[1] / "interop"))
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 130000,
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,
            "max_position_embeddings": 4096, "torch_dtype": "float32",
        }  # fmt: skip
        (model_dir / "config.json").write_text(json.dumps(config))
        model_config = ModelConfig(model=str(model_dir), max_model_len=4096)
        renderer = renderer_from_config(VllmConfig(model_config=model_config))
        out = []
        for case in CASES:
            body = {"model": "m", **case["body"]}
            if case["kind"] == "completion":
                request = CompletionRequest(**body)
                prompt = body["prompt"]
                dict_prompt = (
                    {"prompt_token_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
                )
                (engine,) = renderer.render_cmpl(
                    [dict_prompt], request.build_tok_params(model_config)
                )
            else:
                request = ChatCompletionRequest(**body)
                tools = [tool.model_dump() for tool in request.tools] if request.tools else None
                chat_params = request.build_chat_params(None, "auto").with_defaults(
                    {"tools": tools, "tokenize": False}
                )
                _, (engine,) = renderer.render_chat(
                    [request.messages], chat_params, request.build_tok_params(model_config)
                )
            out.append({**case, "token_ids": list(engine["prompt_token_ids"])})
    import transformers
    import vllm  # type: ignore[import-not-found]

    meta = {
        "produced_by": "tests/data/tokenization/vllm_goldens.py",
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "model": "models.write_chatml_model(add_bos=True), max_model_len=4096",
    }
    (HERE / "vllm_goldens.json").write_text(
        json.dumps({"meta": meta, "cases": out}, ensure_ascii=False, indent=1) + "\n",
        encoding="utf-8",
    )
    print(f"wrote {len(out)} cases")


if __name__ == "__main__":
    main()
